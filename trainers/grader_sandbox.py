"""Run a ``python`` grader's ``grade(sample, item)`` in a separate, limited process.

Each call starts one interpreter (``python -I -S``: no site-packages, no ``PYTHON*``
variables, no user site) with an empty environment in a new temporary working directory,
which is deleted afterwards. A trusted bootstrap (``_BOOTSTRAP``) runs first and confines
the process before it compiles the grader's source:

* limits (``resource.setrlimit``): CPU seconds (``RLIMIT_CPU``), address space
  (``RLIMIT_AS``), the size of any file written (``RLIMIT_FSIZE``), open files
  (``RLIMIT_NOFILE``), no new processes (``RLIMIT_NPROC`` 0) and no core files;
* the parent kills the whole process group at the wall-clock limit, and when the result
  it prints passes ``output_bytes``;
* when rayft runs as root: a private network namespace (no interface but a down
  loopback, so every connection fails), a private mount namespace in which the working
  directory is a tmpfs of ``file_bytes`` (total disk use is bounded) and every path of
  ``hidden_paths`` (``/tmp``, ``/home``, the storage root ...) is covered by an empty
  read-only tmpfs, and then an unprivileged user (``nobody``) with no supplementary
  groups. As ``nobody`` the interpreter cannot read rayft's Python installation when it
  sits under ``/root``, so the grader can import only the standard modules the bootstrap
  loads first (``PRELOADED``).
* when rayft does not run as root: the same namespaces are asked for inside a new user
  namespace, which Linux allows unprivileged users unless the administrator disabled it
  (``kernel.unprivileged_userns_clone`` / ``user.max_user_namespaces``); where it is refused
  the grader runs with the service's user, its files and its network. ``SandboxResult``
  says which isolation the call got (``isolation``).

Files every user may read (``/etc/passwd``, the Python standard library, world-readable
parts of the file system outside ``hidden_paths``) stay readable: no chroot is made.

A grader that breaks a limit, raises, or returns something other than a finite number
yields a ``SandboxResult`` whose ``error`` names what happened; the call never outlives
``wall_s`` by more than the time to kill and reap the process.
"""

from __future__ import annotations

import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Literal

NOBODY = 65534
"""The uid and gid a grader runs as when rayft runs as root."""

PRELOADED = (
    "bisect",
    "collections",
    "copy",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "encodings.idna",
    "enum",
    "fractions",
    "functools",
    "heapq",
    "itertools",
    "json",
    "math",
    "operator",
    "random",
    "re",
    # Importable so that the network namespace, not a missing module, is what refuses a
    # connection (and a test can show it).
    "socket",
    "statistics",
    "string",
    "textwrap",
    "typing",
    "unicodedata",
)
"""Standard modules loaded before the grader runs (all it may import once privileges drop)."""

SandboxError = Literal[
    "source_limit",
    "runtime_error",
    "timeout",
    "cpu_limit",
    "memory_limit",
    "file_size_limit",
    "output_limit",
    "bad_score",
    "crashed",
]


@dataclass(frozen=True)
class SandboxLimits:
    """What one python grader call may use.

    Attributes:
        cpu_s: CPU seconds (``RLIMIT_CPU``; SIGXCPU at the limit, SIGKILL a second later).
        wall_s: Seconds from start to kill, whatever the process does.
        memory_bytes: Address space (``RLIMIT_AS``); an allocation past it is a MemoryError.
        file_bytes: Largest file the grader may write (``RLIMIT_FSIZE``), and the size of
            its working directory when the mount namespace is had.
        open_files: File descriptors (``RLIMIT_NOFILE``).
        output_bytes: Largest result the process may print; more kills it.
        source_chars: Largest ``source`` accepted.
        hidden_paths: Directories covered by an empty read-only tmpfs (mount namespace).
    """

    cpu_s: int = 10
    wall_s: float = 20.0
    memory_bytes: int = 1 << 30
    file_bytes: int = 16 << 20
    open_files: int = 32
    output_bytes: int = 64 << 10
    source_chars: int = 256 * 1024
    hidden_paths: tuple[str, ...] = ("/tmp", "/var/tmp", "/dev/shm", "/home", "/root", "/run")


@dataclass(frozen=True)
class SandboxResult:
    """What one call returned: a finite ``score``, or an ``error`` with its ``details``."""

    score: float | None
    error: SandboxError | None = None
    details: str | None = None
    isolation: dict[str, bool] = field(default_factory=dict)
    elapsed_s: float = 0.0


# The bootstrap runs as ``python -I -S -c _BOOTSTRAP CONFIG`` with the payload on stdin.
# It is trusted code: it reads the payload, confines the process, then runs the grader.
# Its result is one JSON object written to a duplicate of the original stdout; the
# grader's own prints go to stderr.
_BOOTSTRAP = r"""
import ctypes, json, os, resource, sys, traceback
os.environ.clear()  # the interpreter's locale coercion may have set LC_CTYPE
cfg = json.loads(sys.argv[1])
payload = json.load(sys.stdin)
result_fd = os.dup(1)
os.dup2(2, 1)
iso = {"network": False, "mounts": False, "user": False}
root = os.geteuid() == 0
libc = ctypes.CDLL(None, use_errno=True)
NEWNET, NEWNS, NEWUSER = 0x40000000, 0x00020000, 0x10000000
RDONLY, NOSUID, NODEV, NOEXEC, REC, PRIVATE = 1, 2, 4, 8, 16384, 1 << 18
# Before the mounts: hiding /root may hide the interpreter's own standard library.
for name in cfg["preload"]:
    try:
        __import__(name)
    except ImportError:
        pass
flags = NEWNET | NEWNS | (0 if root else NEWUSER)
if libc.unshare(flags) == 0:
    iso["network"] = True
    if libc.mount(b"none", b"/", None, REC | PRIVATE, None) == 0:
        owner = ",uid=%d,gid=%d" % (cfg["nobody"], cfg["nobody"]) if root else ""
        opts = ("size=%d,mode=0700%s" % (cfg["file_bytes"], owner)).encode()
        cwd = os.getcwd().encode()
        iso["mounts"] = libc.mount(b"tmpfs", cwd, b"tmpfs", NOSUID | NODEV, opts) == 0
        os.chdir(cwd)
        for path in cfg["hidden"]:
            if os.path.isdir(path):
                ok = libc.mount(b"tmpfs", path.encode(), b"tmpfs",
                                RDONLY | NOSUID | NODEV | NOEXEC, b"size=4k,mode=0555") == 0
                iso["mounts"] = iso["mounts"] and ok
R = resource
R.setrlimit(R.RLIMIT_CORE, (0, 0))
R.setrlimit(R.RLIMIT_CPU, (cfg["cpu_s"], cfg["cpu_s"] + 1))
R.setrlimit(R.RLIMIT_FSIZE, (cfg["file_bytes"], cfg["file_bytes"]))
R.setrlimit(R.RLIMIT_NOFILE, (cfg["open_files"], cfg["open_files"]))
if root:
    os.setgroups([])
    os.setgid(cfg["nobody"])
    os.setuid(cfg["nobody"])
    iso["user"] = True
R.setrlimit(R.RLIMIT_NPROC, (0, 0))
R.setrlimit(R.RLIMIT_AS, (cfg["memory_bytes"], cfg["memory_bytes"]))

def finish(out):
    out["isolation"] = iso
    os.write(result_fd, json.dumps(out).encode())
    os._exit(0)

def failure(err):
    text = "".join(traceback.format_exception_only(type(err), err)).strip()
    tb = traceback.extract_tb(err.__traceback__)
    lines = [f"line {f.lineno} in {f.name}" for f in tb if f.filename == "<grader>"]
    where = (" (" + lines[-1] + ")") if lines else ""
    return (text + where)[:2000]

try:
    namespace = {"__name__": "grader"}
    exec(compile(payload["source"], "<grader>", "exec"), namespace)
    grade = namespace.get("grade")
    if not callable(grade):
        finish({"error": "runtime_error",
                "details": "the source defines no function grade(sample, item)"})
    score = grade(payload["sample"], payload["item"])
    if isinstance(score, bool) or not isinstance(score, (int, float)):
        finish({"error": "bad_score",
                "details": "grade() returned %s, not a number" % type(score).__name__})
    finish({"score": float(score)})
except MemoryError as err:
    finish({"error": "memory_limit", "details": failure(err)})
except OSError as err:
    kind = "file_size_limit" if err.errno == 27 else "runtime_error"
    finish({"error": kind, "details": failure(err)})
except BaseException as err:
    finish({"error": "runtime_error", "details": failure(err)})
"""


def run_python_grader(
    source: str, sample: Any, item: Any, limits: SandboxLimits | None = None
) -> SandboxResult:
    """Call ``grade(sample, item)`` defined by ``source`` in a new confined process.

    Args:
        source: Python source defining ``grade(sample, item) -> float``.
        sample: The ``sample`` namespace (JSON-serialisable).
        item: The dataset item (JSON-serialisable).
        limits: What the call may use (``SandboxLimits()`` when not given).

    Returns:
        The score, or the error that stopped it (never raises for the grader's faults).
    """
    limits = limits or SandboxLimits()
    if len(source) > limits.source_chars:
        return SandboxResult(
            None,
            "source_limit",
            f"the source is {len(source)} characters; at most {limits.source_chars} are allowed",
        )
    started = time.monotonic()
    workdir = tempfile.mkdtemp(prefix="rayft-grader-")
    try:
        if os.geteuid() == 0:
            os.chown(workdir, NOBODY, NOBODY)
        with tempfile.TemporaryFile() as payload:
            payload.write(json.dumps({"source": source, "sample": sample, "item": item}).encode())
            payload.seek(0)
            out, err, failure = _run(_command(limits), payload, workdir, limits)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return _result(out, err, failure, limits, time.monotonic() - started)


def _command(limits: SandboxLimits) -> list[str]:
    config = {
        "cpu_s": max(1, int(limits.cpu_s)),
        "memory_bytes": int(limits.memory_bytes),
        "file_bytes": int(limits.file_bytes),
        "open_files": int(limits.open_files),
        "hidden": list(limits.hidden_paths),
        "preload": list(PRELOADED),
        "nobody": NOBODY,
    }
    return [sys.executable, "-I", "-S", "-c", _BOOTSTRAP, json.dumps(config)]


def _run(
    command: list[str], stdin: Any, workdir: str, limits: SandboxLimits
) -> tuple[bytes, bytes, SandboxError | None]:
    """Run ``command``; its stdout (bounded), the tail of its stderr, and why it was killed."""
    process = subprocess.Popen(  # noqa: S603 - a fixed interpreter and bootstrap
        command,
        stdin=stdin,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=workdir,
        env={},
        start_new_session=True,  # its own process group, killed whole
        close_fds=True,
    )
    deadline = time.monotonic() + limits.wall_s
    out, err, failure = bytearray(), bytearray(), None
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ, out)
        selector.register(process.stderr, selectors.EVENT_READ, err)
        while selector.get_map() and failure is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                failure = "timeout"
                break
            for key, _ in selector.select(min(remaining, 0.5)):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    selector.unregister(key.fileobj)
                    continue
                key.data.extend(chunk)
                if len(out) > limits.output_bytes:
                    failure = "output_limit"
                del err[:-8192]  # keep the tail of stderr only
    try:
        process.wait(timeout=0 if failure else max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        failure = failure or "timeout"
    _kill_group(process)
    process.stdout.close()
    process.stderr.close()
    if failure is None and process.returncode in (-signal.SIGXCPU, -signal.SIGKILL):
        failure = "cpu_limit"
    return bytes(out), bytes(err), failure


def _kill_group(process: subprocess.Popen) -> None:
    """Kill ``process`` and anything in its process group, and reap it."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    process.wait()


_LIMIT_TEXT = {
    "timeout": "the grader ran past the wall-clock limit of {wall_s:g} s and was killed",
    "cpu_limit": "the grader used more than its {cpu_s} CPU seconds and was killed",
    "output_limit": "the grader printed more than {output_bytes} bytes of result and was killed",
}


def _result(
    out: bytes, err: bytes, failure: SandboxError | None, limits: SandboxLimits, elapsed: float
) -> SandboxResult:
    if failure is not None:
        return SandboxResult(
            None, failure, _LIMIT_TEXT[failure].format(**vars(limits)), {}, elapsed
        )
    try:
        reply = json.loads(out.decode("utf-8"))
        if not isinstance(reply, dict):
            raise ValueError("not an object")
    except ValueError:
        tail = err.decode("utf-8", "replace").strip().splitlines()[-1:] or ["no output"]
        return SandboxResult(
            None, "crashed", f"the grader's process ended without a result: {tail[0]}", {}, elapsed
        )
    isolation = {k: bool(v) for k, v in (reply.get("isolation") or {}).items()}
    if reply.get("error"):
        kind = reply["error"] if reply["error"] in _KINDS else "runtime_error"
        return SandboxResult(None, kind, str(reply.get("details"))[:2000], isolation, elapsed)
    score = reply.get("score")
    if (
        not isinstance(score, (int, float))
        or score != score
        or score in (float("inf"), -float("inf"))
    ):
        return SandboxResult(
            None,
            "bad_score",
            f"grade() returned {score!r}, not a finite number",
            isolation,
            elapsed,
        )
    return SandboxResult(float(score), None, None, isolation, elapsed)


_KINDS = set(SandboxError.__args__)  # type: ignore[attr-defined]
