"""Where rayft keeps things: one root for models, runs, adapters and sweeps.

The root is ``storage:`` from the job spec, else ``$RAYFT_HOME``, else ``./.rayft``.
A root may be a local/shared directory or a pyarrow-filesystem URI (``s3://``, ``gs://``).

With a URI root the URI is the source of truth: Ray Train writes checkpoints there,
run records and published artifacts are uploaded there, and every machine keeps a
local mirror (``local_home``) that it fills on demand. Base models are always cached
on local disk (``models_dir``), since every node converts or copies its own.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any

DEFAULT_HOME = ".rayft"
DEFAULT_CACHE = "~/.cache/rayft"


def is_uri(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def home(storage: str | None = None) -> str:
    """The artifact root as an absolute local path or a URI."""
    root = storage or os.environ.get("RAYFT_HOME") or DEFAULT_HOME
    if root.startswith("file://"):
        root = root[len("file://") :]
    if is_uri(root):
        return root.rstrip("/")
    return str(Path(root).expanduser().resolve())


def cache_root() -> Path:
    """Local directory for base models and mirrors of URI roots.

    ``$RAYFT_CACHE`` if set, else ``$RAYFT_HOME`` when that is local, else ``~/.cache/rayft``.
    """
    explicit = os.environ.get("RAYFT_CACHE")
    if explicit:
        return Path(explicit).expanduser().resolve()
    default = home(None)
    return Path(DEFAULT_CACHE).expanduser() if is_uri(default) else Path(default)


def local_home(storage: str | None = None) -> Path:
    """The artifact root as a local path; a URI root gets its own mirror under ``cache_root``."""
    root = home(storage)
    if is_uri(root):
        return cache_root() / "mirror" / _slug(root)
    return Path(root)


def _slug(uri: str) -> str:
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", uri)[:80]
    return f"{readable}-{hashlib.sha1(uri.encode()).hexdigest()[:8]}"


def remote_root(storage: str | None = None) -> str | None:
    """The URI of the root when it is remote, else ``None``."""
    root = home(storage)
    return root if is_uri(root) else None


def subdir(kind: str, storage: str | None = None) -> str:
    root = home(storage)
    return f"{root}/{kind}"


def models_dir(storage: str | None = None) -> Path:
    root = home(storage)
    base = cache_root() if is_uri(root) else Path(root)
    return Path(os.environ.get("RAYFT_MODEL_CACHE") or (base / "models"))


def runs_dir(storage: str | None = None) -> str:
    return subdir("runs", storage)


def adapters_dir(storage: str | None = None) -> Path:
    return local_home(storage) / "adapters"


def sweeps_dir(storage: str | None = None) -> Path:
    return local_home(storage) / "sweeps"


# ----------------------------------------------------------------- remote roots


def filesystem(uri: str) -> tuple[Any, str]:
    """The pyarrow filesystem and in-filesystem path of a URI.

    Raises:
        StorageError: pyarrow cannot open the URI (unknown scheme, no credentials).
    """
    import pyarrow.fs as pafs

    try:
        return pafs.FileSystem.from_uri(uri)
    except (OSError, ValueError) as err:
        raise StorageError(
            f"cannot open storage {uri!r}: {err}; check the URI and the credentials "
            "(for s3: AWS_* environment variables or an instance role)"
        ) from None


class StorageError(OSError):
    """A remote storage root cannot be read or written."""


def remote_path(storage: str | None, relpath: str) -> tuple[Any, str] | None:
    """``(filesystem, path)`` of ``relpath`` under a URI root; ``None`` for local roots."""
    root = remote_root(storage)
    if root is None:
        return None
    fs, base = filesystem(root)
    return fs, f"{base.rstrip('/')}/{relpath.strip('/')}"


def read_remote(storage: str | None, relpath: str) -> bytes | None:
    """Bytes of ``relpath`` under a URI root; ``None`` when absent or the root is local."""
    target = remote_path(storage, relpath)
    if target is None:
        return None
    fs, path = target
    try:
        with fs.open_input_stream(path) as handle:
            return handle.read()
    except FileNotFoundError:
        return None
    except OSError as err:
        if "not found" in str(err).lower() or "no such" in str(err).lower():
            return None
        raise StorageError(f"cannot read {relpath} from {home(storage)}: {err}") from None


def write_remote(storage: str | None, relpath: str, data: bytes) -> None:
    """Write ``data`` to ``relpath`` under a URI root (no-op for local roots)."""
    target = remote_path(storage, relpath)
    if target is None:
        return
    fs, path = target
    try:
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(path) as handle:
            handle.write(data)
    except OSError as err:
        raise StorageError(f"cannot write {relpath} to {home(storage)}: {err}") from None


def mirror_file(storage: str | None, relpath: str) -> None:
    """Upload the local mirror's copy of ``relpath`` to a URI root (no-op for local roots)."""
    if remote_root(storage) is None:
        return
    write_remote(storage, relpath, (local_home(storage) / relpath).read_bytes())


def upload_dir(local: Path, storage: str | None, relpath: str, last: str | None = None) -> None:
    """Copy a local directory to ``relpath`` under a URI root, replacing what was there.

    Args:
        last: A file name to upload after every other file; readers treat its presence
            as "complete" (object stores have no atomic directory rename).
    """
    target = remote_path(storage, relpath)
    if target is None:
        return
    fs, path = target
    try:
        fs.create_dir(path, recursive=True)
        fs.delete_dir_contents(path, missing_dir_ok=True)
        files = sorted(p for p in local.rglob("*") if p.is_file())
        files.sort(key=lambda p: p.name == last)
        for file in files:
            dest = f"{path}/{file.relative_to(local).as_posix()}"
            fs.create_dir(dest.rsplit("/", 1)[0], recursive=True)
            with fs.open_output_stream(dest) as handle:
                handle.write(file.read_bytes())
    except OSError as err:
        raise StorageError(f"cannot upload {local} to {home(storage)}/{relpath}: {err}") from None


def download_dir(storage: str | None, relpath: str, local: Path) -> None:
    """Copy ``relpath`` under a URI root into the (new or empty) local directory ``local``."""
    import pyarrow.fs as pafs

    target = remote_path(storage, relpath)
    if target is None:
        return
    fs, path = target
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
        for info in infos:
            if info.type != pafs.FileType.File:
                continue
            dest = local / info.path[len(path) :].lstrip("/")
            dest.parent.mkdir(parents=True, exist_ok=True)
            with fs.open_input_stream(info.path) as handle:
                dest.write_bytes(handle.read())
    except OSError as err:
        raise StorageError(f"cannot download {home(storage)}/{relpath}: {err}") from None


def sync_file(storage: str | None, relpath: str) -> Path:
    """The local path of file ``relpath``, refreshed from a URI root when that copy changed.

    For a local root this is just the path. Under a URI root a file that is missing
    there is removed from the mirror; one whose size or modification time differs from
    the mirror's copy is downloaded to a temporary sibling and renamed into place.

    Raises:
        StorageError: The URI root cannot be read.
    """
    import pyarrow.fs as pafs

    local = local_home(storage) / relpath
    target = remote_path(storage, relpath)
    if target is None:
        return local
    fs, path = target
    try:
        info = fs.get_file_info(path)
        if info.type != pafs.FileType.File:
            if local.is_file():
                local.unlink()
            return local
        stamp = info.mtime.timestamp() if info.mtime is not None else None
        if local.is_file() and local.stat().st_size == info.size and stamp is not None:
            if abs(local.stat().st_mtime - stamp) < 1e-3:
                return local
        local.parent.mkdir(parents=True, exist_ok=True)
        staging = local.with_name(f".{local.name}.{os.getpid()}.sync")
        with fs.open_input_stream(path) as handle:
            staging.write_bytes(handle.read())
        if stamp is not None:
            os.utime(staging, (stamp, stamp))
        staging.replace(local)
    except OSError as err:
        raise StorageError(f"cannot read {home(storage)}/{relpath}: {err}") from None
    return local


def delete_remote_dir(storage: str | None, relpath: str) -> None:
    """Remove ``relpath`` and everything under it from a URI root (no-op when absent)."""
    import pyarrow.fs as pafs

    target = remote_path(storage, relpath)
    if target is None:
        return
    fs, path = target
    try:
        if fs.get_file_info(path).type != pafs.FileType.NotFound:
            fs.delete_dir(path)
    except OSError as err:
        raise StorageError(f"cannot delete {home(storage)}/{relpath}: {err}") from None


def list_remote_dirs(storage: str | None, relpath: str) -> list[str]:
    """Names of the directories directly under ``relpath`` of a URI root."""
    import pyarrow.fs as pafs

    target = remote_path(storage, relpath)
    if target is None:
        return []
    fs, path = target
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except OSError as err:
        raise StorageError(f"cannot list {home(storage)}/{relpath}: {err}") from None
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)
