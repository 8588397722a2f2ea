"""Locks that hold across processes and machines, on a local root and on a URI root.

``held(root, relpath)`` serialises the writers of one thing in the rayft root: the
publishers of one registry name, the writers of one job record. Whoever holds it may
read, decide and write knowing nobody else does the same at once.

- A local root takes an ``fcntl`` lock on the file ``relpath``: the kernel releases it
  when its holder exits, however it exits.
- A URI root (object storage, which has no lock and whose conditional writes pyarrow does
  not expose) uses entries: a contender writes its own object under ``relpath/``, then
  lists them. With nothing else live there it holds the lock; otherwise it removes its
  entry and tries again after a random pause. Object stores list what was written before
  (S3 has been strongly consistent since 2020), so of two contenders at least the later
  to list sees the other: two can never both hold it. A holder rewrites its entry every
  ``LEASE_S / 4`` seconds; an entry not rewritten for ``LEASE_S`` seconds, or written by
  a process of this machine that is gone, belongs to a crashed holder and is ignored
  and removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rayft.trainers.storage import StorageError, StorageRoot

LEASE_S = 60.0
POLL_S = (0.02, 0.2)


class LockTimeout(StorageError):
    """A lock was held by another writer for longer than the caller would wait."""


@contextlib.contextmanager
def held(root: StorageRoot, relpath: str, wait_s: float = 60.0) -> Iterator[None]:
    """Hold the lock named ``relpath`` of ``root`` for the body of the ``with``.

    Args:
        root: The rayft root whose writers it serialises.
        relpath: The lock's path in the root (a file locally, a prefix at a URI).
        wait_s: How long to wait for another holder.

    Raises:
        LockTimeout: Another writer held it for longer than ``wait_s``.
        StorageError: The URI root cannot be written.
    """
    if root.is_remote:
        with _remote(root, relpath, wait_s):
            yield
    else:
        with _local(root.path(relpath), wait_s):
            yield


def _busy(what: str, wait_s: float) -> LockTimeout:
    return LockTimeout(
        f"{what} is locked by another writer (waited {wait_s:g} s); retry once it finishes"
    )


@contextlib.contextmanager
def _local(path: Path, wait_s: float) -> Iterator[None]:
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + wait_s
    # Each holder opens its own file description, so threads of one process exclude too.
    with open(path, "a+b") as handle:
        while True:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise _busy(str(path), wait_s) from None
                time.sleep(random.uniform(*POLL_S))
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


class _Entry:
    """This holder's object under the lock's prefix, rewritten while it holds the lock."""

    def __init__(self, fs: Any, prefix: str) -> None:
        self.fs = fs
        self.name = f"{time.time_ns():020d}-{os.urandom(4).hex()}"
        self.path = f"{prefix}/{self.name}"
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def write(self) -> None:
        body = {"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}
        with self.fs.open_output_stream(self.path) as out:
            out.write(json.dumps(body).encode())

    def remove(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        with contextlib.suppress(OSError):
            self.fs.delete_file(self.path)

    def keep_alive(self) -> None:
        def beat() -> None:
            while not self._stop.wait(LEASE_S / 4):
                with contextlib.suppress(OSError):  # the next beat tries again
                    self.write()

        self._beat = threading.Thread(target=beat, name="rayft-lock-lease", daemon=True)
        self._beat.start()


def _live_others(fs: Any, prefix: str, mine: str) -> list[str]:
    """Entries of other holders that are not stale; stale ones are removed."""
    import pyarrow.fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(prefix, allow_not_found=True))
    live = []
    for info in infos:
        if info.type != pafs.FileType.File or info.base_name == mine:
            continue
        if _stale(fs, info.path):
            with contextlib.suppress(OSError):
                fs.delete_file(info.path)
            continue
        live.append(info.base_name)
    return live


def _stale(fs: Any, path: str) -> bool:
    try:
        with fs.open_input_stream(path) as handle:
            body = json.loads(handle.read())
        written, host, pid = float(body["time"]), body["host"], int(body["pid"])
    except FileNotFoundError:
        return False  # released between the listing and this read
    except (OSError, ValueError, KeyError, TypeError):
        return False  # being written: judged on the next round
    if time.time() - written > LEASE_S:
        return True
    return host == socket.gethostname() and pid != os.getpid() and not _alive(pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def _remote(root: StorageRoot, relpath: str, wait_s: float) -> Iterator[None]:
    target = root.remote(relpath)
    assert target is not None
    fs, prefix = target
    deadline = time.monotonic() + wait_s
    entry = _Entry(fs, prefix)
    try:
        while True:
            entry.write()
            if not _live_others(fs, prefix, entry.name):
                break
            fs.delete_file(entry.path)
            if time.monotonic() > deadline:
                raise _busy(root.url(relpath), wait_s)
            time.sleep(random.uniform(*POLL_S))
    except OSError as err:
        if isinstance(err, LockTimeout):
            raise
        raise StorageError(f"cannot take the lock {root.url(relpath)}: {err}") from None
    entry.keep_alive()
    try:
        yield
    finally:
        entry.remove()
