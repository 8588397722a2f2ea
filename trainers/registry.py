"""The artifact registry: published adapters and fine-tuned models under the rayft root.

Publishing is atomic (write to a temporary sibling, then rename), so a reader never
sees half an artifact and a failed publish leaves the previous one intact. Every
artifact carries ``rayft.json`` describing where it came from.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from trainers.config import valid_name
from trainers.storage import adapters_dir, models_dir

MANIFEST = "rayft.json"


class RegistryError(ValueError):
    """A bad artifact name, a missing artifact or a refused overwrite."""


def checked_name(name: str) -> str:
    """Return ``name`` if it is one safe path component, else raise ``RegistryError``."""
    if not isinstance(name, str) or not valid_name(name):
        raise RegistryError(
            f"invalid artifact name {name!r}: use letters, digits, '.', '_' and '-' "
            "(no path separators, no '..')"
        )
    return name


def _inside(root: Path, name: str) -> Path:
    path = (root / checked_name(name)).resolve()
    if path.parent != root.resolve():
        raise RegistryError(f"artifact name {name!r} leaves the registry")
    return path


def adapter_path(name: str, storage: str | None = None) -> Path:
    """Directory of the published adapter ``name`` (which may not exist yet)."""
    return _inside(adapters_dir(storage), name)


def model_path(name: str, storage: str | None = None) -> Path:
    return _inside(models_dir(storage), name)


def check_publishable(kind: str, name: str, overwrite: bool, storage: str | None = None) -> Path:
    """Fail early, before any training, when publishing ``name`` would be refused."""
    target = adapter_path(name, storage) if kind == "adapter" else model_path(name, storage)
    if target.exists() and not overwrite:
        raise RegistryError(
            f"{kind} {name!r} is already published at {target}; set output.name to a new "
            "name or output.overwrite=true to replace it"
        )
    return target


def publish_dir(
    src: Path, kind: str, name: str, manifest: dict[str, Any], overwrite: bool,
    storage: str | None = None,
) -> Path:
    """Move the finished artifact directory ``src`` into the registry as ``name``.

    Args:
        src: A directory holding the artifact files (consumed).
        kind: ``adapter`` or ``model``.
        name: Registry name.
        manifest: Written as ``rayft.json`` next to the weights.
        overwrite: Replace an existing artifact of that name.
        storage: The rayft root.
    """
    target = check_publishable(kind, name, overwrite, storage)
    target.parent.mkdir(parents=True, exist_ok=True)
    manifest = {"kind": kind, "name": name, "published_at": time.time(), **manifest}
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        for item in src.iterdir():
            shutil.move(str(item), staging / item.name)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
        if target.exists():
            retired = target.with_name(f".{name}-retired-{int(time.time() * 1000)}")
            target.rename(retired)
            staging.rename(target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def read_manifest(path: Path) -> dict[str, Any]:
    manifest = path / MANIFEST
    if not manifest.is_file():
        return {}
    return json.loads(manifest.read_text())


def list_adapters(storage: str | None = None) -> list[dict[str, Any]]:
    """Every published adapter with its manifest, sorted by name."""
    root = adapters_dir(storage)
    if not root.is_dir():
        return []
    out = []
    for path in sorted(root.iterdir()):
        if path.name.startswith(".") or not (path / "adapter_config.json").is_file():
            continue
        out.append({"name": path.name, "path": str(path), **read_manifest(path)})
    return out


def resolve_adapter(name: str, storage: str | None = None) -> Path:
    """The directory of a published adapter, or ``RegistryError`` if there is none."""
    path = adapter_path(name, storage)
    if not (path / "adapter_config.json").is_file():
        raise RegistryError(f"no adapter named {name!r} in {path.parent}")
    return path
