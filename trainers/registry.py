"""The artifact registry: published adapters and fine-tuned models under the rayft root.

Publishing is atomic (write to a temporary sibling, then rename), so a reader never
sees half an artifact and a failed publish leaves the previous one intact. Every
artifact carries ``rayft.json`` describing where it came from.

With a URI root (``s3://``, ``gs://``) the registry lives at the URI: a publish is also
uploaded there with ``rayft.json`` written last (an artifact without it is incomplete),
listings read the URI, and ``sync_adapter`` refreshes this machine's mirror of an
adapter when the published one is newer.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from rayft.trainers.config import valid_name
from rayft.trainers.storage import (
    adapters_dir,
    delete_remote_dir,
    download_dir,
    list_remote_dirs,
    models_dir,
    read_remote,
    remote_root,
    upload_dir,
    write_remote,
)

MANIFEST = "rayft.json"
# How long a mirrored adapter is trusted before the URI root is asked again.
SYNC_TTL_S = float(os.environ.get("RAYFT_REGISTRY_TTL_S", "2"))
_synced: dict[tuple[str, str], float] = {}
_sync_lock = threading.Lock()


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
    where = str(target)
    exists = target.exists()
    if remote_root(storage) is not None:
        where = f"{remote_root(storage)}/{_folder(kind)}/{name}"
        exists = read_remote(storage, f"{_folder(kind)}/{name}/{MANIFEST}") is not None
    if exists and not overwrite:
        raise RegistryError(
            f"{kind} {name!r} is already published at {where}; set output.name to a new "
            "name or output.overwrite=true to replace it"
        )
    return target


def publish_dir(
    src: Path,
    kind: str,
    name: str,
    manifest: dict[str, Any],
    overwrite: bool,
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
    if remote_root(storage) is not None:
        upload_dir(target, storage, f"{_folder(kind)}/{name}", last=MANIFEST)
        with _sync_lock:
            _synced[(remote_root(storage), kind, name)] = time.monotonic()
    return target


def _folder(kind: str) -> str:
    return "adapters" if kind == "adapter" else "models"


def write_manifest(path: Path, manifest: dict[str, Any], storage: str | None = None) -> None:
    """Replace the manifest of the published artifact at ``path`` (locally and at a URI root)."""
    tmp = path / f"{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, default=str))
    tmp.replace(path / MANIFEST)
    kind = "adapter" if (path / "adapter_config.json").is_file() else "model"
    write_remote(storage, f"{_folder(kind)}/{path.name}/{MANIFEST}", (path / MANIFEST).read_bytes())


def remove_artifact(kind: str, name: str, storage: str | None = None) -> None:
    """Unpublish ``name``: remove it locally and from a URI root."""
    local = adapter_path(name, storage) if kind == "adapter" else model_path(name, storage)
    shutil.rmtree(local, ignore_errors=True)
    delete_remote_dir(storage, f"{_folder(kind)}/{name}")
    with _sync_lock:
        _synced.pop((remote_root(storage), kind, name), None)


def read_manifest(path: Path) -> dict[str, Any]:
    manifest = path / MANIFEST
    if not manifest.is_file():
        return {}
    return json.loads(manifest.read_text())


def list_adapters(storage: str | None = None) -> list[dict[str, Any]]:
    """Every published adapter with its manifest, sorted by name."""
    if remote_root(storage) is not None:
        out = []
        for name in list_remote_dirs(storage, "adapters"):
            raw = read_remote(storage, f"adapters/{name}/{MANIFEST}")
            if name.startswith(".") or raw is None:
                continue  # hidden, or an upload still in progress
            path = adapters_dir(storage) / name
            out.append({"name": name, "path": str(path), **json.loads(raw)})
        return out
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
    path = sync_adapter(name, storage)
    if not (path / "adapter_config.json").is_file():
        raise RegistryError(f"no adapter named {name!r} in {path.parent}")
    return path


def sync_adapter(name: str, storage: str | None = None) -> Path:
    """The local directory of adapter ``name``, refreshed from a URI root when needed."""
    return sync_artifact("adapter", name, storage)


def sync_artifact(kind: str, name: str, storage: str | None = None) -> Path:
    """The local directory of a published artifact, refreshed from a URI root when needed.

    For a local root this is just the artifact's path. For a URI root the published
    manifest is compared with the local copy's (at most every ``RAYFT_REGISTRY_TTL_S``
    seconds); a newer or missing copy is downloaded into a temporary sibling and renamed
    into place, and an artifact no longer published at the URI is removed locally.

    Raises:
        RegistryError: ``name`` is not a safe artifact name.
        StorageError: The URI root cannot be read.
    """
    path = adapter_path(name, storage) if kind == "adapter" else model_path(name, storage)
    root = remote_root(storage)
    if root is None:
        return path
    with _sync_lock:
        checked = _synced.get((root, kind, name))
        fresh = checked is not None and time.monotonic() - checked < SYNC_TTL_S
        if fresh and (path / MANIFEST).is_file():
            return path
        raw = read_remote(storage, f"{_folder(kind)}/{name}/{MANIFEST}")
        if raw is None:
            if path.exists():
                shutil.rmtree(path, ignore_errors=True)
            return path
        if read_manifest(path).get("published_at") != json.loads(raw).get("published_at"):
            _download(storage, f"{_folder(kind)}/{name}", path)
        _synced[(root, kind, name)] = time.monotonic()
    return path


def _download(storage: str | None, relpath: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}-sync-", dir=path.parent))
    retired = path.with_name(f".{path.name}-retired-{int(time.time() * 1000)}")
    try:
        download_dir(storage, relpath, staging)
        if path.exists():
            path.rename(retired)
        staging.rename(path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if retired.exists() and not path.exists():
            retired.rename(path)
        raise
    shutil.rmtree(retired, ignore_errors=True)
