"""Where rayft keeps things: one root for models, runs, adapters and sweeps.

The root is ``storage:`` from the job spec, else ``$RAYFT_HOME``, else ``./.rayft``.
A root may be a local/shared directory or a pyarrow-filesystem URI (``s3://``, ``gs://``).
``StorageRoot.resolve`` turns that string into a ``StorageRoot`` once, at the edge (the
CLI, the driver, the serving engine); everything inside is handed the object.

With a URI root the URI is the source of truth: Ray Train writes checkpoints there,
run records and published artifacts are uploaded there, and every machine keeps a
local mirror (``StorageRoot.local``) that it fills on demand. Base models are always
cached on local disk (``StorageRoot.models``), since every node converts or copies its own.

This module also holds the two file primitives the rest of rayft builds on: URI and
filesystem access (``filesystem``) and the atomic file write (``atomic_write``), and
the atomic switch of a directory published under a name (``swap_dir``).
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_HOME = ".rayft"
DEFAULT_CACHE = "~/.cache/rayft"
# Published directories keep their versions here, next to the name that links to one.
VERSIONS = ".versions"
# A hidden staging directory untouched for this long belongs to a process that died.
STALE_STAGING_S = 3600.0


class StorageError(OSError):
    """A remote storage root cannot be read or written."""


class StorageFullError(StorageError):
    """A run stopped because its storage had no space left (``ENOSPC``). Its message says
    what to do; the error it replaces (a worker's, often only as text) is its cause."""

    explains_cause = True
    """Shown to the user in place of its cause (``cluster.errors.root_cause``)."""


NO_SPACE = "No space left on device"
"""``strerror(ENOSPC)``: how a full disk reads in an error a Ray worker sent as text."""


def is_storage_full(err: BaseException) -> bool:
    """True when ``err``, or an error it was raised from, is a full disk: an ``OSError``
    with ``errno.ENOSPC`` here, or its message in a worker's error (Ray Train's
    ``WorkerGroupError`` carries the workers' tracebacks as text)."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno == errno.ENOSPC:
            return True
        if NO_SPACE in str(current):
            return True
        current = current.__cause__ or current.__context__
    return False


# ----------------------------------------------------------------- primitives


def is_uri(path: str) -> bool:
    """True for a remote URI (``s3://``, ``gs://``, ...); ``file://`` paths are local."""
    return "://" in path and not path.startswith("file://")


def local_path(path: str) -> Path:
    """A local path or ``file://`` URI as an absolute path (``~`` expanded)."""
    return Path(path.removeprefix("file://")).expanduser().absolute()


def filesystem(path: str) -> tuple[Any, str]:
    """The pyarrow filesystem and in-filesystem path of a local path or URI.

    Raises:
        StorageError: pyarrow cannot open the URI (unknown scheme, no credentials).
    """
    import pyarrow.fs as pafs

    if not is_uri(path):
        return pafs.LocalFileSystem(), str(local_path(path))
    try:
        return pafs.FileSystem.from_uri(path)
    except (OSError, ValueError) as err:
        raise StorageError(
            f"cannot open storage {path!r}: {err}; check the URI and the credentials "
            "(for s3: AWS_* environment variables or an instance role)"
        ) from None


def atomic_write(path: Path, data: bytes | str) -> Path:
    """Write ``data`` to ``path`` so that a reader sees the old file or the new one, whole.

    The bytes go to a temporary sibling that is flushed to disk and renamed over
    ``path``; a crash leaves at most a stray ``.*.tmp`` file, never a torn ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(raw)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def swap_dir(staging: Path, target: Path) -> None:
    """Put the complete directory ``staging`` in place of ``target`` (which may exist).

    ``target`` becomes a symbolic link to ``staging`` swapped in with one ``os.replace``,
    so a reader opening ``target`` finds the old directory or the new one, whole; a
    crash at any point leaves one of the two. The directory ``target`` pointed to
    before is kept one more round (a reader may still be inside it) and the one before
    that is removed. ``staging`` must live in the same directory tree as ``target``.
    """
    target = Path(target)
    staging = Path(staging)
    previous = target.resolve() if target.is_symlink() else None
    link = target.with_name(f".{target.name}.link-{os.getpid()}-{os.urandom(3).hex()}")
    os.symlink(os.path.relpath(staging, target.parent), link)
    try:
        if target.is_dir() and not target.is_symlink():
            # A directory published before versioned names: it cannot be replaced by a
            # link in one step, so it is moved aside first (the only non-atomic case).
            target.rename(staging.with_name(f"{staging.name}.legacy"))
        os.replace(link, target)
    except BaseException:
        link.unlink(missing_ok=True)
        raise
    _prune_versions(staging.parent, keep={staging.name, previous.name if previous else ""})


def _prune_versions(versions: Path, keep: set[str]) -> None:
    now = time.time()
    for old in versions.iterdir():
        if old.name in keep:
            continue
        # ``.``-names are downloads in progress (``staging_dir``); only long-dead ones go.
        if old.name.startswith(".") and now - old.stat().st_mtime < STALE_STAGING_S:
            continue
        shutil.rmtree(old, ignore_errors=True)


def staging_dir(final: Path) -> Path:
    """A private, hidden sibling of ``final`` to fill before renaming it to ``final``."""
    path = final.with_name(f".{final.name}.partial-{os.getpid()}-{os.urandom(3).hex()}")
    path.mkdir(parents=True)
    return path


def new_version() -> str:
    """A version name that sorts by creation time and never repeats."""
    return f"{time.time_ns():020d}-{os.urandom(3).hex()}"


def new_version_dir(target: Path, version: str | None = None) -> Path:
    """A new, empty directory for the next version of ``target``, for ``swap_dir``."""
    path = Path(target).parent / VERSIONS / Path(target).name / (version or new_version())
    path.mkdir(parents=True)
    return path


def _slug(uri: str) -> str:
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", uri)[:80]
    return f"{readable}-{hashlib.sha1(uri.encode()).hexdigest()[:8]}"


def cache_root() -> Path:
    """Local directory for base models and mirrors of URI roots.

    ``$RAYFT_CACHE`` if set, else ``$RAYFT_HOME`` when that is local, else ``~/.cache/rayft``.
    """
    explicit = os.environ.get("RAYFT_CACHE")
    if explicit:
        return Path(explicit).expanduser().resolve()
    default = os.environ.get("RAYFT_HOME") or DEFAULT_HOME
    if is_uri(default):
        return Path(DEFAULT_CACHE).expanduser()
    return local_path(default).resolve()


# ----------------------------------------------------------------- the layout
# Every place under the root, as a path relative to it (``StorageRoot.url``/``path``/
# ``read`` take these). Nothing outside this module spells these paths out.

MANIFEST_FILE = "rayft.json"
ADAPTERS_DIR = "adapters"
MODELS_DIR = "models"
RUNS_DIR = "runs"
SWEEPS_DIR = "sweeps"
DATASETS_DIR = "datasets"
FILE_RECORDS_DIR = f"{DATASETS_DIR}/.files"
JOB_DATASETS_DIR = f"{DATASETS_DIR}/jobs"
JOBS_DIR = "fine_tuning/jobs"
EVALS_DIR = "evals"
REQUEST_LOGS_DIR = "request_logs"
AUTH_DIR = "auth"


def registry_folder(kind: str) -> str:
    """The registry folder of an artifact kind: ``adapters`` for adapters, else ``models``."""
    return ADAPTERS_DIR if kind == "adapter" else MODELS_DIR


def artifact_relpath(kind: str, name: str) -> str:
    """``adapters/<name>`` or ``models/<name>``: the published name (a link to its version)."""
    return f"{registry_folder(kind)}/{name}"


def artifact_manifest_relpath(kind: str, name: str) -> str:
    """``<folder>/<name>/rayft.json``: under a URI root, the pointer readers follow."""
    return f"{artifact_relpath(kind, name)}/{MANIFEST_FILE}"


def artifact_versions_relpath(kind: str, name: str) -> str:
    """``<folder>/.versions/<name>``: every stored version of a published artifact."""
    return f"{registry_folder(kind)}/{VERSIONS}/{name}"


def artifact_lock_relpath(kind: str, name: str) -> str:
    """``<folder>/.versions/<name>.lock``: the lock its publishers take (``trainers.locks``)."""
    return f"{registry_folder(kind)}/{VERSIONS}/{name}.lock"


def artifact_version_relpath(kind: str, name: str, version: str) -> str:
    """``<folder>/.versions/<name>/<version>``: the files of one published version."""
    return f"{artifact_versions_relpath(kind, name)}/{version}"


def run_relpath(run_id: str, *parts: str) -> str:
    """``runs/<run_id>`` or a file/folder under it (``run_relpath(id, "events.jsonl")``)."""
    return "/".join((RUNS_DIR, run_id, *parts))


def sweep_relpath(sweep_id: str, *parts: str) -> str:
    """``sweeps/<sweep_id>`` or a file/folder under it."""
    return "/".join((SWEEPS_DIR, sweep_id, *parts))


def dataset_relpath(name: str) -> str:
    """``datasets/<name>``: an uploaded file's bytes or a registry dataset."""
    return f"{DATASETS_DIR}/{name}"


def file_record_relpath(file_id: str) -> str:
    """``datasets/.files/<file_id>.json``: an uploaded file's record."""
    return f"{FILE_RECORDS_DIR}/{file_id}.json"


def job_dataset_relpath(key: str, filename: str) -> str:
    """``datasets/jobs/<key>/<filename>``: a submitted job's local data file, uploaded."""
    return f"{JOB_DATASETS_DIR}/{key}/{filename}"


def job_relpath(job_id: str, suffix: str = ".json") -> str:
    """``fine_tuning/jobs/<job_id>.json`` (or another ``suffix``): a fine-tuning job's record."""
    return f"{JOBS_DIR}/{job_id}{suffix}"


def eval_relpath(eval_id: str, *parts: str) -> str:
    """``evals/<eval_id>.json``, or a file under ``evals/<eval_id>/`` (``eval_relpath(id,
    "runs", "<run_id>.json")``): an eval's record, its runs and their output items."""
    if not parts:
        return f"{EVALS_DIR}/{eval_id}.json"
    return "/".join((EVALS_DIR, eval_id, *parts))


def request_log_relpath(day: str, writer: str) -> str:
    """``request_logs/<day>/<writer>.jsonl``: one writer's request log of one day."""
    return f"{REQUEST_LOGS_DIR}/{day}/{writer}.jsonl"


def request_log_part_relpath(day: str, writer: str, offset: int) -> str:
    """``request_logs/<day>/<writer>.parts/<offset>.jsonl``: the lines of one writer's log
    from byte ``offset`` on, as uploaded to a URI root (one object per upload)."""
    return f"{REQUEST_LOGS_DIR}/{day}/{writer}.parts/{offset:015d}.jsonl"


def keys_relpath() -> str:
    """``auth/keys.json``: the API key store (salted hashes of project keys, never a secret)."""
    return f"{AUTH_DIR}/keys.json"


# ----------------------------------------------------------------- the root


@dataclass(frozen=True)
class StorageRoot:
    """One resolved rayft root: a local directory, or a URI with this machine's mirror.

    Build it with ``StorageRoot.resolve``. It pickles as its ``location`` and is
    rebuilt on unpickling, so a worker on another machine gets its own mirror path.

    Attributes:
        location: The root as an absolute local path or a URI (no trailing ``/``).
        local: The root's local directory: the root itself, or the mirror of a URI root.
        models: Local cache of base models and published full models.
    """

    location: str
    local: Path
    models: Path

    @classmethod
    def resolve(cls, storage: str | StorageRoot | None = None) -> StorageRoot:
        """The root named by ``storage`` (``storage:``), else ``$RAYFT_HOME``, else ``./.rayft``.

        A ``StorageRoot`` is returned as it is.
        """
        if isinstance(storage, StorageRoot):
            return storage
        root = storage or os.environ.get("RAYFT_HOME") or DEFAULT_HOME
        if is_uri(root):
            location = root.rstrip("/")
            local = cache_root() / "mirror" / _slug(location)
            models_base = cache_root()
        else:
            local = local_path(root).resolve()
            location = str(local)
            models_base = local
        models = Path(os.environ.get("RAYFT_MODEL_CACHE") or (models_base / "models"))
        return cls(location, local, models)

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (StorageRoot.resolve, (self.location,))

    def __str__(self) -> str:
        return self.location

    @property
    def uri(self) -> str | None:
        """The URI of a remote root, ``None`` for a local one."""
        return self.location if is_uri(self.location) else None

    @property
    def is_remote(self) -> bool:
        return self.uri is not None

    # ------------------------------------------------------------- places

    def url(self, relpath: str) -> str:
        """Where ``relpath`` lives for every machine: under the URI, or the local path."""
        return f"{self.location}/{relpath.strip('/')}"

    def path(self, relpath: str) -> Path:
        """The local path (the mirror's, for a URI root) of ``relpath``."""
        return self.local / relpath.strip("/")

    @property
    def runs(self) -> str:
        """Ray Train's ``storage_path``: ``runs/`` under the URI or the local root."""
        return self.url(RUNS_DIR)

    def run(self, run_id: str) -> Path:
        """The local directory of run ``run_id`` (records, TensorBoard, data order)."""
        return self.path(run_relpath(run_id))

    def run_dir(self, run_id: str) -> Path:
        """The local directory of run ``run_id`` (same as ``run``)."""
        return self.run(run_id)

    @property
    def adapters(self) -> Path:
        return self.path(ADAPTERS_DIR)

    def adapter_dir(self, name: str) -> Path:
        """The local path of the published adapter ``name`` (unchecked name)."""
        return self.path(artifact_relpath("adapter", name))

    def artifact_dir(self, kind: str, name: str) -> Path:
        """The local path of the published ``kind`` ``name`` (unchecked name)."""
        return self.registry(kind) / name

    def registry(self, kind: str) -> Path:
        """The local folder of published artifacts of ``kind`` (full models share the model cache)."""
        return self.adapters if kind == "adapter" else self.models

    @property
    def files(self) -> Path:
        """Uploaded files and registry datasets (``datasets/``)."""
        return self.path(DATASETS_DIR)

    @property
    def sweeps(self) -> Path:
        return self.path(SWEEPS_DIR)

    def sweep_dir(self, sweep_id: str) -> Path:
        """The local directory of sweep ``sweep_id`` (Tune state, tables, plot)."""
        return self.path(sweep_relpath(sweep_id))

    # ------------------------------------------------------------- operations

    def remote(self, relpath: str) -> tuple[Any, str] | None:
        """``(filesystem, path)`` of ``relpath`` under a URI root; ``None`` for local roots."""
        if self.uri is None:
            return None
        fs, base = filesystem(self.uri)
        return fs, f"{base.rstrip('/')}/{relpath.strip('/')}"

    def read(self, relpath: str) -> bytes | None:
        """Bytes of ``relpath`` from the root's source of truth; ``None`` when absent.

        Raises:
            StorageError: The URI root cannot be read.
        """
        target = self.remote(relpath)
        if target is None:
            local = self.path(relpath)
            return local.read_bytes() if local.is_file() else None
        fs, path = target
        try:
            with fs.open_input_stream(path) as handle:
                return handle.read()
        except FileNotFoundError:
            return None
        except OSError as err:
            if "not found" in str(err).lower() or "no such" in str(err).lower():
                return None
            raise StorageError(f"cannot read {self.url(relpath)}: {err}") from None

    def write(self, relpath: str, data: bytes | str) -> Path:
        """Write ``relpath`` atomically to the local root (or mirror) and to a URI root."""
        local = atomic_write(self.path(relpath), data)
        self.mirror(relpath)
        return local

    def upload(self, relpath: str, data: bytes | str) -> None:
        """Write ``data`` to ``relpath`` under a URI root only (no-op for local roots).

        One object store PUT: readers see the old object or the new one.
        """
        target = self.remote(relpath)
        if target is None:
            return
        fs, path = target
        raw = data.encode() if isinstance(data, str) else data
        try:
            fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
            with fs.open_output_stream(path) as handle:
                handle.write(raw)
        except OSError as err:
            raise StorageError(f"cannot write {self.url(relpath)}: {err}") from None

    def mirror(self, relpath: str) -> None:
        """Upload the local mirror's copy of ``relpath`` to a URI root (no-op for local roots)."""
        if self.is_remote:
            self.upload(relpath, self.path(relpath).read_bytes())

    def upload_dir(self, local: Path, relpath: str, last: str | None = None) -> None:
        """Copy a local directory to the new prefix ``relpath`` under a URI root.

        Nothing under ``relpath`` is deleted first: publishing uploads to a fresh prefix
        and switches a pointer afterwards (``rayft.trainers.registry``).

        Args:
            last: A file name to upload after every other file.
        """
        if self.remote(relpath) is None:
            return
        files = sorted(p for p in Path(local).rglob("*") if p.is_file())
        files.sort(key=lambda p: p.name == last)
        for file in files:
            self.upload(f"{relpath}/{file.relative_to(local).as_posix()}", file.read_bytes())

    def download_dir(self, relpath: str, local: Path) -> None:
        """Copy ``relpath`` under a URI root into the (new or empty) local directory ``local``."""
        import pyarrow.fs as pafs

        target = self.remote(relpath)
        if target is None:
            return
        fs, path = target
        try:
            infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
            for info in infos:
                if info.type != pafs.FileType.File:
                    continue
                dest = Path(local) / info.path[len(path) :].lstrip("/")
                dest.parent.mkdir(parents=True, exist_ok=True)
                with fs.open_input_stream(info.path) as handle:
                    dest.write_bytes(handle.read())
        except OSError as err:
            raise StorageError(f"cannot download {self.url(relpath)}: {err}") from None

    def sync_file(self, relpath: str) -> Path:
        """The local path of file ``relpath``, refreshed from a URI root when that copy changed.

        For a local root this is just the path. Under a URI root a file that is missing
        there is removed from the mirror; one whose size or modification time differs
        from the mirror's copy is downloaded and renamed into place.

        Raises:
            StorageError: The URI root cannot be read.
        """
        import pyarrow.fs as pafs

        local = self.path(relpath)
        target = self.remote(relpath)
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
            with fs.open_input_stream(path) as handle:
                atomic_write(local, handle.read())
            if stamp is not None:
                os.utime(local, (stamp, stamp))
        except OSError as err:
            raise StorageError(f"cannot read {self.url(relpath)}: {err}") from None
        return local

    def delete(self, relpath: str) -> None:
        """Remove the file or directory ``relpath`` from a URI root (no-op when absent)."""
        import pyarrow.fs as pafs

        target = self.remote(relpath)
        if target is None:
            return
        fs, path = target
        try:
            kind = fs.get_file_info(path).type
            if kind == pafs.FileType.File:
                fs.delete_file(path)
            elif kind != pafs.FileType.NotFound:
                fs.delete_dir(path)
        except OSError as err:
            raise StorageError(f"cannot delete {self.url(relpath)}: {err}") from None

    def list_dirs(self, relpath: str) -> list[str]:
        """Names of the directories directly under ``relpath`` (at the URI for a URI root)."""
        import pyarrow.fs as pafs

        target = self.remote(relpath)
        if target is None:
            local = self.path(relpath)
            return sorted(p.name for p in local.iterdir() if p.is_dir()) if local.is_dir() else []
        fs, path = target
        try:
            infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
        except OSError as err:
            raise StorageError(f"cannot list {self.url(relpath)}: {err}") from None
        return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)
