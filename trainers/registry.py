"""The artifact registry: published adapters and fine-tuned models under the rayft root.

Every artifact carries ``rayft.json`` describing where it came from. Publishing is
crash-safe: a reader always finds the previous complete artifact or the new complete
one, never a mix and never nothing.

* Local root: the files of each published version live in
  ``<folder>/.versions/<name>/<version>/``; ``<folder>/<name>`` is a symbolic link to the
  current one, swapped with one ``os.replace`` (``storage.swap_dir``). Plain
  ``peft.PeftModel.from_pretrained(adapters/<name>)`` follows the link.
* URI root (``s3://``, ``gs://``): a version is uploaded to the new prefix
  ``<folder>/.versions/<name>/<version>/``, then ``<folder>/<name>/rayft.json`` (the
  manifest, naming the version) is written last, in one PUT: it is the pointer readers
  follow. ``sync_artifact`` brings the pointed-to version into this machine's mirror,
  which uses the local layout.

Publishers of one name take turns (``trainers.locks.held`` on
``<folder>/.versions/<name>.lock``): under the lock a publisher checks ``overwrite``
again, stages, switches the name and prunes the versions that are neither the new one nor
the one it replaced, so two runs never both take a free name and no name points at a
pruned version.

A ``rayft.json`` that does not parse hides its artifact from listings (logged once)
and makes resolving it raise ``ManifestError``. The manifest is the typed
``ArtifactManifest`` (``trainers.manifest``); every path comes from ``trainers.storage``.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rayft.trainers.config import valid_name
from rayft.trainers.locks import held
from rayft.trainers.manifest import (
    MANIFEST,
    ArtifactManifest,
    ManifestError,
    ParentRecord,
    RegistryError,
    SweepNote,
)
from rayft.trainers.storage import (
    VERSIONS,
    StorageRoot,
    artifact_lock_relpath,
    artifact_manifest_relpath,
    artifact_relpath,
    artifact_version_relpath,
    artifact_versions_relpath,
    new_version,
    new_version_dir,
    registry_folder,
    staging_dir,
    swap_dir,
)

__all__ = [
    "MANIFEST",
    "ArtifactManifest",
    "ManifestError",
    "ParentRecord",
    "RegistryError",
    "SweepNote",
]
# How long a mirrored adapter is trusted before the URI root is asked again.
SYNC_TTL_S = float(os.environ.get("RAYFT_REGISTRY_TTL_S", "2"))
_synced: dict[tuple[str, str, str], float] = {}
_sync_lock = threading.Lock()
_reported_corrupt: set[tuple[str, str]] = set()
log = logging.getLogger("rayft.registry")

# How long a publisher waits while another one publishes the same name (uploads included).
PUBLISH_WAIT_S = 1800.0


def checked_name(name: str) -> str:
    """Return ``name`` if it is one safe path component, else raise ``RegistryError``."""
    if not isinstance(name, str) or not valid_name(name):
        raise RegistryError(
            f"invalid artifact name {name!r}: use letters, digits, '.', '_', ':' and '-' "
            "(no path separators, no '..')"
        )
    return name


def _inside(parent: Path, name: str) -> Path:
    path = parent.resolve() / checked_name(name)
    if path.parent != parent.resolve():
        raise RegistryError(f"artifact name {name!r} leaves the registry")
    return path


def artifact_path(kind: str, name: str, root: StorageRoot) -> Path:
    """Local directory (a link to the current version) of the published artifact ``name``."""
    return _inside(root.registry(kind), name)


def adapter_path(name: str, root: StorageRoot) -> Path:
    """Directory of the published adapter ``name`` (which may not exist yet)."""
    return artifact_path("adapter", name, root)


def model_path(name: str, root: StorageRoot) -> Path:
    return artifact_path("model", name, root)


def artifact_location(kind: str, name: str, root: StorageRoot, local: Path | None) -> str | None:
    """Where a published artifact lives for every machine: under the URI for a URI root."""
    if local is None:
        return None
    return root.url(artifact_relpath(kind, name)) if root.is_remote else str(local)


def check_publishable(kind: str, name: str, overwrite: bool, root: StorageRoot) -> Path:
    """Fail early, before any training, when publishing ``name`` would be refused."""
    target = artifact_path(kind, name, root)
    where = str(target)
    exists = target.exists()
    if root.is_remote:
        where = root.url(artifact_relpath(kind, name))
        exists = root.read(artifact_manifest_relpath(kind, name)) is not None
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
    manifest: ArtifactManifest | Mapping[str, Any],
    overwrite: bool,
    root: StorageRoot,
    base_dir: Path | None = None,
    checked: bool = False,
) -> Path:
    """Publish the finished artifact files in ``src`` under ``name``, crash-safely.

    The files are copied once, into a new version directory; the previous version
    stays what readers see until the new one is complete. Under a URI root the
    version is uploaded first and the pointer written last.

    Args:
        src: A directory holding the artifact files (read, not changed; a
            ``rayft.json`` in it is replaced by ``manifest``).
        kind: ``adapter`` or ``model``.
        name: Registry name.
        manifest: Written as ``rayft.json`` next to the weights, with ``kind``,
            ``name``, ``version`` and ``published_at`` set here (a mapping is read as
            the manifest's fields).
        overwrite: Replace an existing artifact of that name.
        root: The rayft root.
        base_dir: The base model the artifact was trained from. When given, the
            artifact must serve before anything is published (``trainers.servable``:
            it loads and gives finite logits, an adapter on this base), and the base's
            weights fingerprint is recorded as ``base_fingerprint``.
        checked: The servability check already passed where the files were made (rank 0
            at export, ``trainers.loop.check_export``): only the fingerprint is recorded.

    Returns:
        The artifact's local path (``<folder>/<name>``).

    Raises:
        UnservableError: The servability check failed; nothing was published.
    """
    fields = dict(manifest.model_dump() if isinstance(manifest, ArtifactManifest) else manifest)
    check_publishable(
        kind, name, overwrite or _published_by_run(root, kind, name, fields.get("run_id")), root
    )
    if base_dir is not None:
        from rayft.trainers.servable import base_fingerprint, check_servable

        if not checked:
            check_servable(Path(src), kind, Path(base_dir))
        fields["base_fingerprint"] = base_fingerprint(base_dir, root.models)
    # One publisher of a name at a time, from the overwrite check to the pruning: two
    # runs publishing one name never both pass the check, and nobody prunes a version
    # another publisher is still staging or has just pointed the name at.
    with held(root, artifact_lock_relpath(kind, name), PUBLISH_WAIT_S):
        # A resumed run may replace what its own earlier attempt published.
        mine = overwrite or _published_by_run(root, kind, name, fields.get("run_id"))
        try:
            target = check_publishable(kind, name, mine, root)
        except RegistryError as err:
            raise RegistryError(
                f"{err} (checked again when publishing: another run published it after this "
                f"one started; nothing of this one was published, its files stay in {src})"
            ) from None
        version = new_version()
        fields.update(kind=kind, name=name, published_at=time.time(), version=version)
        checked = ArtifactManifest.model_validate(fields)
        staged = stage_version(Path(src), new_version_dir(target, version), checked)
        previous = pointed_version(root, kind, name) if root.is_remote else None
        if root.is_remote:
            upload_version(root, kind, name, staged)
            write_pointer(root, kind, name, checked)
        swap_dir(staged, target)
        if root.is_remote:
            retire_remote_versions(root, kind, name, keep=version, previous=previous)
            with _sync_lock:
                _synced[(root.location, kind, name)] = time.monotonic()
    return target


def _published_by_run(root: StorageRoot, kind: str, name: str, run_id: str | None) -> bool:
    """Whether ``name`` is published now by the run ``run_id``."""
    if not run_id:
        return False
    relpath = artifact_manifest_relpath(kind, name)
    raw = root.read(relpath) if root.is_remote else None
    if not root.is_remote:
        local = artifact_path(kind, name, root) / MANIFEST
        raw = local.read_text() if local.is_file() else None
    if raw is None:
        return False
    try:
        return ArtifactManifest.parse(raw, relpath).run_id == run_id
    except ManifestError:
        return False


def pointed_version(root: StorageRoot, kind: str, name: str) -> str | None:
    """The version the URI root's pointer of ``name`` names (``None``: none, or unreadable)."""
    relpath = artifact_manifest_relpath(kind, name)
    raw = root.read(relpath)
    if raw is None:
        return None
    try:
        return ArtifactManifest.parse(raw, root.url(relpath)).version or None
    except ManifestError:
        return None


def stage_version(src: Path, version_dir: Path, manifest: ArtifactManifest) -> Path:
    """Copy the artifact files into the empty ``version_dir``; its manifest is written last."""
    for item in sorted(src.iterdir()):
        if item.name == MANIFEST:
            continue
        if item.is_dir():
            shutil.copytree(item, version_dir / item.name)
        else:
            shutil.copy2(item, version_dir / item.name)
    manifest.write(version_dir)
    return version_dir


def upload_version(root: StorageRoot, kind: str, name: str, version_dir: Path) -> None:
    """Upload a staged version to its own new prefix under the URI root."""
    relpath = artifact_version_relpath(kind, name, version_dir.name)
    root.upload_dir(version_dir, relpath, last=MANIFEST)


def write_pointer(root: StorageRoot, kind: str, name: str, manifest: ArtifactManifest) -> None:
    """Make ``manifest.version`` the published one: one PUT of ``<folder>/<name>/rayft.json``."""
    root.upload(artifact_manifest_relpath(kind, name), manifest.to_json())


def retire_remote_versions(
    root: StorageRoot, kind: str, name: str, keep: str, previous: str | None = None
) -> None:
    """Delete old versions at the URI, keeping ``keep`` (pointed at now) and ``previous``.

    The version pointed at before stays a round because a reader that read the previous
    pointer may still be downloading it. Only call it holding the name's publish lock
    and after the pointer names ``keep``: no other version is then being staged.
    """
    relpath = artifact_versions_relpath(kind, name)
    if previous is None:  # unknown: the newest older version stands in for it
        older = [v for v in root.list_dirs(relpath) if v < keep]
        previous = older[-1] if older else None
    for version in root.list_dirs(relpath):
        if version not in (keep, previous):
            root.delete(f"{relpath}/{version}")


def write_manifest(path: Path, manifest: ArtifactManifest, root: StorageRoot) -> None:
    """Replace the manifest of the published artifact at ``path`` (locally and at a URI root)."""
    manifest.write(Path(path).resolve())
    if root.is_remote:
        kind = "adapter" if (path / "adapter_config.json").is_file() else "model"
        text = manifest.to_json()
        if manifest.version:
            relpath = artifact_version_relpath(kind, path.name, manifest.version)
            root.upload(f"{relpath}/{MANIFEST}", text)
        root.upload(artifact_manifest_relpath(kind, path.name), text)


def remove_artifact(kind: str, name: str, root: StorageRoot) -> None:
    """Unpublish ``name``: remove it locally and from a URI root (its pointer first)."""
    local = artifact_path(kind, name, root)
    with held(root, artifact_lock_relpath(kind, name), PUBLISH_WAIT_S):
        if local.is_symlink():
            local.unlink()
        else:
            shutil.rmtree(local, ignore_errors=True)
        shutil.rmtree(local.parent / VERSIONS / name, ignore_errors=True)
        root.delete(artifact_relpath(kind, name))
        root.delete(artifact_versions_relpath(kind, name))
    with _sync_lock:
        _synced.pop((root.location, kind, name), None)


def _hide_corrupt(root: StorageRoot, name: str, err: ManifestError) -> None:
    key = (root.location, str(err))
    if key not in _reported_corrupt:
        _reported_corrupt.add(key)
        log.warning("adapter %r is not listed: %s", name, err)


def list_adapters(root: StorageRoot) -> list[ArtifactManifest]:
    """Every published adapter's manifest (``name`` is the registry name), sorted by name.

    An adapter whose ``rayft.json`` is unreadable is left out (and logged once); one
    published without a manifest is listed with only its kind and name.
    """
    out = []
    if root.is_remote:
        for name in root.list_dirs(registry_folder("adapter")):
            relpath = artifact_manifest_relpath("adapter", name)
            raw = root.read(relpath)
            if name.startswith(".") or raw is None:
                continue  # hidden, or never completely published
            try:
                manifest = ArtifactManifest.parse(raw, root.url(relpath))
            except ManifestError as err:
                _hide_corrupt(root, name, err)
                continue
            out.append(manifest.model_copy(update={"name": name}))
        return out
    if not root.adapters.is_dir():
        return []
    for path in sorted(root.adapters.iterdir()):
        if path.name.startswith(".") or not (path / "adapter_config.json").is_file():
            continue
        try:
            manifest = ArtifactManifest.find(path) or ArtifactManifest(kind="adapter")
        except ManifestError as err:
            _hide_corrupt(root, path.name, err)
            continue
        out.append(manifest.model_copy(update={"name": path.name}))
    return out


def resolve_adapter(name: str, root: StorageRoot) -> Path:
    """The directory of a published adapter.

    Raises:
        RegistryError: There is no adapter of that name.
        ManifestError: Its ``rayft.json`` is corrupt.
    """
    path = sync_adapter(name, root)
    if not (path / "adapter_config.json").is_file():
        raise RegistryError(f"no adapter named {name!r} in {path.parent}")
    ArtifactManifest.find(path)
    return path


def published_manifest(path: Path) -> ArtifactManifest | None:
    """The manifest of the published artifact at ``path``: ``None`` when nothing is
    published there, a manifest with only ``kind`` for one published without a manifest.

    Raises:
        ManifestError: Its ``rayft.json`` is corrupt.
    """
    path = Path(path)
    kind = next(
        (
            k
            for f, k in (("adapter_config.json", "adapter"), ("config.json", "model"))
            if (path / f).is_file()
        ),
        None,
    )
    if kind is None:
        return None
    return ArtifactManifest.find(path) or ArtifactManifest(kind=kind, name=path.name)


def sync_adapter(name: str, root: StorageRoot) -> Path:
    """The local directory of adapter ``name``, refreshed from a URI root when needed."""
    return sync_artifact("adapter", name, root)


def sync_artifact(kind: str, name: str, root: StorageRoot) -> Path:
    """The local directory of a published artifact, refreshed from a URI root when needed.

    For a local root this is just the artifact's path. For a URI root the published
    pointer is compared with the local copy's version (at most every
    ``RAYFT_REGISTRY_TTL_S`` seconds); a newer or missing version is downloaded and
    swapped in, and an artifact no longer published at the URI is removed locally.

    Raises:
        RegistryError: ``name`` is not a safe artifact name.
        ManifestError: The published ``rayft.json`` is corrupt.
        StorageError: The URI root cannot be read.
    """
    path = artifact_path(kind, name, root)
    if not root.is_remote:
        return path
    with _sync_lock:
        checked = _synced.get((root.location, kind, name))
        fresh = checked is not None and time.monotonic() - checked < SYNC_TTL_S
        if fresh and (path / MANIFEST).is_file():
            return path
        relpath = artifact_manifest_relpath(kind, name)
        raw = root.read(relpath)
        if raw is None:
            if path.is_symlink():
                path.unlink()
            shutil.rmtree(path, ignore_errors=True)
            shutil.rmtree(path.parent / VERSIONS / name, ignore_errors=True)
            return path
        published = ArtifactManifest.parse(raw, root.url(relpath), directory=path)
        if _local_stamp(path) != published.stamp:
            _download(root, kind, name, published, path)
        _synced[(root.location, kind, name)] = time.monotonic()
    return path


def _local_stamp(path: Path) -> Any:
    try:
        manifest = ArtifactManifest.find(path)
    except ManifestError:
        return None  # a torn mirror copy is simply downloaded again
    return manifest.stamp if manifest is not None else None


def _download(
    root: StorageRoot, kind: str, name: str, published: ArtifactManifest, path: Path
) -> None:
    version = published.version
    # Artifacts published before versioned prefixes keep their files next to the pointer.
    relpath = (
        artifact_version_relpath(kind, name, version) if version else artifact_relpath(kind, name)
    )
    final = path.parent / VERSIONS / name / (version or new_version())
    if not final.is_dir():
        # Downloaded into a private directory and renamed: a version directory is
        # always complete, even with several processes syncing one mirror at once.
        staging = staging_dir(final)
        try:
            root.download_dir(relpath, staging)
            staging.rename(final)
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
            if not final.is_dir():
                raise  # not a concurrent download that finished first
    swap_dir(final, path)
