"""Submitting rayft jobs to a Ray cluster through the Ray Jobs API.

A submitted job is an ordinary Ray job: its entrypoint runs ``python -m rayft.cluster.cli
train|tune spec.yaml`` on the head node (Ray sets ``RAY_ADDRESS`` for it), inside a runtime environment
whose ``working_dir`` carries

* ``spec.yaml``: the job spec, with ``storage`` set and local data paths rewritten,
* ``data/``: copies of the local data files the spec names (size-limited: big data
  belongs on shared storage or behind an ``s3://`` / ``gs://`` URI),
* the rayft packages (``cluster/``, ``trainers/``, ``raytune/``, ``serving/``) unless the
  cluster's image already has rayft installed (``--code installed``).

On the cluster the job's driver first leaves that working directory: it runs from a
private copy and reads the shipped data from the job's storage (``cluster/job_start.py``).

Building the runtime environment is pure (files in, a directory and a dict out), so it
is tested without Ray; only :func:`submit_job` talks to a cluster.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rayft.cluster.errors import ClusterError, UserError
from rayft.cluster.job_start import JOB_ENV, SHIPPED_DATA_DIR, SPEC_NAME
from rayft.trainers.config import JobSpec, validate_spec
from rayft.trainers.driver import new_run_id
from rayft.trainers.storage import is_uri

DEFAULT_MAX_UPLOAD_MB = 100.0
"""Data shipped with a job travels through the head node's object store; Ray itself
refuses working directories over 500 MiB, and anything near that belongs on shared storage."""

CODE_PACKAGES = ("cluster", "trainers", "raytune", "serving")
CODE_SUFFIXES = (".py", ".yaml", ".json")
DATA_DIR = SHIPPED_DATA_DIR

# Metadata keys on every rayft job: how ``rayft jobs`` finds the run behind a Ray job.
META_KIND = "rayft_kind"
META_RUN_ID = "rayft_run_id"
META_STORAGE = "rayft_storage"
META_RESUMED = "rayft_resumed"


class SubmitError(UserError):
    """A job that cannot be submitted as asked; the message says what to change (exit 2)."""


@dataclass
class JobPackage:
    """Everything one submission sends: a staged directory, its runtime env and entrypoint."""

    workdir: Path
    runtime_env: dict[str, Any]
    entrypoint: str
    submission_id: str
    metadata: dict[str, str]
    run_id: str
    kind: str
    shipped_files: list[str] = field(default_factory=list)
    upload_bytes: int = 0


# ----------------------------------------------------------------- addresses and tokens


def jobs_address(address: str | None) -> str:
    """The Jobs API address to use: ``--address``, else ``$RAY_ADDRESS``.

    Raises:
        SubmitError: neither is set; a submitted job needs a running cluster.
    """
    address = address or os.environ.get("RAY_ADDRESS")
    if not address or address in ("local", "embedded"):
        raise SubmitError(
            "this command talks to a running Ray cluster's Jobs API: pass --address "
            "http://HEAD:8265 or set RAY_ADDRESS (to train on this machine, use `rayft train`)"
        )
    return address.rstrip("/")


def resolve_token(token_file: str | None = None) -> str | None:
    """The Ray auth token to send, in Ray's own order of precedence.

    ``--token-file`` first, then ``$RAY_AUTH_TOKEN``, ``$RAY_AUTH_TOKEN_PATH`` and
    ``~/.ray/auth_token``. Returns None when no token is configured (a cluster without
    token authentication).

    Raises:
        SubmitError: a named token file is missing or empty.
    """
    if token_file:
        return _read_token(Path(token_file).expanduser(), "--token-file")
    value = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if value:
        return value
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path:
        return _read_token(Path(path).expanduser(), "RAY_AUTH_TOKEN_PATH")
    default = Path.home() / ".ray" / "auth_token"
    if default.is_file():
        return default.read_text().strip() or None
    return None


def _read_token(path: Path, source: str) -> str:
    if not path.is_file():
        raise SubmitError(f"{source}: token file {path} not found")
    token = path.read_text().strip()
    if not token:
        raise SubmitError(f"{source}: token file {path} is empty")
    return token


def auth_headers(token: str | None) -> dict[str, str]:
    """HTTP headers carrying ``token`` the way Ray's dashboard expects it."""
    return {"Authorization": f"Bearer {token}"} if token else {}


@contextmanager
def jobs_client(address: str | None, token_file: str | None = None) -> Iterator[Any]:
    """A ``JobSubmissionClient`` for ``address`` whose errors read as user errors.

    An unreachable address, a missing or rejected token and an unknown job id become
    :class:`SubmitError` with a message saying what to do; they exit with code 2.
    """
    from ray.dashboard.modules.job.sdk import JobSubmissionClient
    from ray.exceptions import AuthenticationError

    url = jobs_address(address)
    headers = auth_headers(resolve_token(token_file))
    try:
        client = JobSubmissionClient(url, headers=headers)
        yield client
    except AuthenticationError as err:
        state = (
            "rejected the token"
            if "403" in str(err) or "invalid" in str(err)
            else ("requires a token and none was sent")
        )
        raise SubmitError(
            f"the Ray cluster at {url} {state}: set RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH, "
            "or --token-file) to the cluster's token; `ray get-auth-token` prints it on the head "
            "node"
        ) from None
    except ConnectionError:
        raise SubmitError(
            f"cannot reach the Ray Jobs API at {url}: check that the head node is running and "
            "its dashboard port (default 8265) is reachable from here; for a remote cluster "
            "forward the port over SSH or `kubectl port-forward` (see docs/cluster.md)"
        ) from None
    except RuntimeError as err:
        # The SDK reports HTTP errors (an unknown job id, a refused request) as RuntimeError.
        text = str(err)
        if "does not exist" in text or "404" in text:
            raise SubmitError(f"{text.strip()} (list jobs with `rayft jobs list`)") from None
        if text.startswith("Request failed with status code"):
            raise ClusterError(f"the Ray Jobs API at {url} refused the request: {text}") from None
        raise


# ----------------------------------------------------------------- the runtime environment


def source_root() -> Path:
    """The directory holding the rayft packages this process runs from."""
    return Path(__file__).resolve().parent.parent


def job_kind(spec: JobSpec, kind: str = "auto") -> str:
    """``train`` or ``tune``: ``auto`` picks ``tune`` when the spec has a ``tune:`` section."""
    if kind == "auto":
        return "tune" if spec.tune is not None else "train"
    if kind not in ("train", "tune"):
        raise SubmitError(f"--kind must be train, tune or auto, got {kind!r}")
    if kind == "tune" and spec.tune is None:
        raise SubmitError("--kind tune needs a tune: section (search_space, num_samples, ...)")
    return kind


def resolve_storage(spec: JobSpec, storage: str | None) -> str:
    """Where the job keeps runs, checkpoints and adapters: ``--storage`` or ``storage:``.

    A submitted job's driver and workers run on other machines, so a default under the
    job's temporary working directory would vanish with it: storage is required.
    """
    root = storage or spec.storage
    if not root:
        raise SubmitError(
            "storage: a submitted job needs storage every node can reach: set storage: in "
            "the job spec or pass --storage (a shared directory such as /mnt/shared/rayft, or "
            "an s3:// / gs:// URI)"
        )
    if root.startswith("file://"):
        root = root[len("file://") :]
    return root if is_uri(root) else str(Path(root).expanduser().absolute())


def _data_paths(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def _is_under(path: Path, root: str) -> bool:
    if is_uri(root):
        return False
    try:
        path.resolve().relative_to(Path(root).resolve())
        return True
    except ValueError:
        return False


def _human(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def plan_data(
    spec: JobSpec, storage: str, cwd: Path, max_bytes: int
) -> tuple[dict[str, Any], list[tuple[Path, str]]]:
    """Decide which data files travel with the job and where the spec will find them.

    URIs and paths under ``storage`` stay as they are; every other path is a local file
    (relative to ``cwd``) that is copied to ``data/<key>-<i>-<name>`` in the working dir.

    Args:
        spec: The validated job spec.
        storage: The job's storage root (shared paths there are not copied).
        cwd: Directory relative data paths are resolved against.
        max_bytes: Upper bound for all copied data together.

    Returns:
        The spec's ``data`` section with paths rewritten, and ``(source, relative target)``
        pairs to copy.

    Raises:
        SubmitError: a local file is missing, or the files together exceed ``max_bytes``.
    """
    data = spec.to_dict()["data"]
    copies: list[tuple[Path, str]] = []
    total = 0
    for key in ("train", "eval"):
        value = data.get(key)
        rewritten: list[str] = []
        for i, raw in enumerate(_data_paths(value)):
            if is_uri(raw):
                rewritten.append(raw)
                continue
            local = raw[len("file://") :] if raw.startswith("file://") else raw
            path = Path(local).expanduser()
            path = path if path.is_absolute() else cwd / path
            if _is_under(path, storage):
                rewritten.append(str(path))
                continue
            if not path.exists():
                raise SubmitError(
                    f"data.{key}: {raw}: file not found (relative paths are read from {cwd}); "
                    "fix the path, or point it at shared storage or an s3:// / gs:// URI"
                )
            total += _size(path)
            name = re.sub(r"[^A-Za-z0-9._-]", "_", path.name) or "data"
            target = f"{DATA_DIR}/{key}-{i}-{name}"
            copies.append((path, target))
            rewritten.append(target)
        if value is not None:
            data[key] = rewritten[0] if isinstance(value, str) else rewritten
    if total > max_bytes:
        raise SubmitError(
            f"data: the local data files total {_human(total)}, over the {_human(max_bytes)} a "
            "submitted job may carry; copy them to shared storage (a directory under "
            "storage: that every node mounts) or an s3:// / gs:// URI and point data.train / "
            "data.eval there, or raise --max-upload-mb"
        )
    return data, copies


def _copy_code(dest: Path) -> list[str]:
    # Shipped as a regular ``rayft`` package: on the job's path it takes precedence over
    # whatever rayft the cluster's image has installed.
    root = source_root()
    (dest / "rayft").mkdir(parents=True, exist_ok=True)
    # The package root: the Python API (``rayft.train``, ...) and the ``py.typed`` marker.
    init = root / "__init__.py"
    (dest / "rayft" / "__init__.py").write_text(init.read_text() if init.is_file() else "")
    copied = ["rayft/__init__.py"]
    for package in CODE_PACKAGES:
        src = root / package
        if not src.is_dir():
            continue
        for path in sorted(src.rglob("*")):
            if "__pycache__" in path.parts or not path.is_file():
                continue
            if path.suffix not in CODE_SUFFIXES:
                continue
            rel = Path("rayft") / path.relative_to(root)
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dest / rel)
            copied.append(str(rel))
    return copied


def build_entrypoint(
    kind: str, run_id: str, storage: str, resume: bool = False, python: str = "python"
) -> str:
    """The shell command the job runs on the head node.

    ``python -m rayft.cluster.cli`` rather than the ``rayft`` script, so that it works both from
    shipped code (the working dir is the current directory) and from an installed rayft.
    """
    base = [python, "-m", "rayft.cluster.cli", kind]
    if kind == "train" and resume:
        args = ["--resume", run_id, "--storage", storage]
    elif kind == "train":
        args = [SPEC_NAME, "--run-id", run_id]
    else:
        # The sweep id is the run id chosen here, so `rayft jobs status` finds its results.
        args = [SPEC_NAME, "--id", run_id]
    # No --address: Ray's job supervisor sets RAY_ADDRESS for the entrypoint, and
    # ``connect`` uses it, so the job joins the cluster it was submitted to.
    return shlex.join([*base, *args])


def build_package(
    spec: JobSpec,
    *,
    storage: str | None = None,
    kind: str = "auto",
    code: str = "ship",
    resume: str | None = None,
    env: dict[str, str] | None = None,
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
    cwd: Path | None = None,
    staging_parent: Path | None = None,
    python: str = "python",
) -> JobPackage:
    """Stage the working directory and build the runtime env and entrypoint of one job.

    Args:
        spec: The validated job spec (overrides already applied).
        storage: ``--storage``; overrides ``storage:`` in the spec.
        kind: ``train``, ``tune`` or ``auto``.
        code: ``ship`` copies the rayft packages into the working dir; ``installed``
            relies on rayft being installed in the cluster's image.
        resume: A run id to continue from its newest checkpoint instead of a new run.
        env: Extra environment variables for the job.
        max_upload_mb: Limit for the local data files copied into the job.
        cwd: Directory relative data paths are resolved against (default: the current one).
        staging_parent: Where to create the staging directory (default: the system temp dir).
        python: The Python executable the entrypoint calls on the cluster.

    Returns:
        A :class:`JobPackage`; the caller removes ``workdir`` once submitted.
    """
    if code not in ("ship", "installed"):
        raise SubmitError(f"--code must be ship or installed, got {code!r}")
    kind = job_kind(spec, kind)
    if resume and kind != "train":
        raise SubmitError("--resume continues a training run; sweeps resume with `rayft tune`")
    root = resolve_storage(spec, storage)
    cwd = cwd or Path.cwd()
    data, copies = plan_data(spec, root, cwd, int(max_upload_mb * 1024 * 1024))
    spec_dict = spec.to_dict()
    spec_dict["data"] = data
    spec_dict["storage"] = root
    # The rewritten spec must still be valid: fail here rather than on the cluster.
    validate_spec(spec_dict, source="submitted spec")

    workdir = Path(tempfile.mkdtemp(prefix="rayft-submit-", dir=staging_parent))
    try:
        shipped = []
        for src, target in copies:
            dest = workdir / target
            dest.parent.mkdir(parents=True, exist_ok=True)
            if src.is_dir():
                shutil.copytree(src, dest)
            else:
                shutil.copy2(src, dest)
            shipped.append(target)
        (workdir / SPEC_NAME).write_text(yaml.safe_dump(spec_dict, sort_keys=False))
        shipped.append(SPEC_NAME)
        if code == "ship":
            shipped += _copy_code(workdir)
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise

    # Chosen at submit time, so ``rayft jobs`` can find the run in storage.
    run_id = resume or new_run_id(spec.output.name or spec.method)
    suffix = f"-resume-{time.strftime('%H%M%S')}-{os.urandom(2).hex()}" if resume else ""
    submission_id = f"{run_id}{suffix}" if kind == "train" else f"sweep-{run_id}"
    env_vars = {
        # connect() passes its own env_vars to ray.init; without this Ray refuses to merge
        # them with the job's even when the values agree.
        "RAY_OVERRIDE_JOB_RUNTIME_ENV": "1",
        "PYTHONUNBUFFERED": "1",
        # The job's driver leaves Ray's working directory first (cluster/job_start.py).
        JOB_ENV: "1",
        **(env or {}),
    }
    runtime_env: dict[str, Any] = {"working_dir": str(workdir), "env_vars": env_vars}
    metadata = {META_KIND: kind, META_RUN_ID: run_id, META_STORAGE: root}
    if resume:
        metadata[META_RESUMED] = "1"
    return JobPackage(
        workdir=workdir,
        runtime_env=runtime_env,
        entrypoint=build_entrypoint(kind, run_id, root, bool(resume), python),
        submission_id=submission_id,
        metadata=metadata,
        run_id=run_id,
        kind=kind,
        shipped_files=shipped,
        upload_bytes=_size(workdir),
    )


def parse_env(pairs: list[str]) -> dict[str, str]:
    """``KEY=VALUE`` pairs from ``--env``."""
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise SubmitError(f"--env {pair!r}: write KEY=VALUE")
        if key.startswith("RAY_AUTH"):
            # Job runtime envs are readable through the Jobs API: never put the token there.
            raise SubmitError(
                f"--env {key}: the cluster's nodes already hold the auth token; a job's "
                "environment is visible to anyone who can list jobs"
            )
        env[key] = value
    return env


# ----------------------------------------------------------------- talking to the cluster


NO_AGENT = "No available agent"
AGENT_WAIT_S = 60.0
AGENT_POLL_S = 2.0


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def submit_package(
    client: Any,
    package: JobPackage,
    wait_for_agent_s: float = AGENT_WAIT_S,
    poll_s: float = AGENT_POLL_S,
    say: Callable[[str], None] = _stderr,
) -> str:
    """Submit ``package`` with ``client`` (a ``JobSubmissionClient``); returns the job id.

    A head node that has just started answers "No available agent" until its job agent
    is up: that is retried every ``poll_s`` for up to ``wait_for_agent_s``, with one line
    per attempt through ``say``.

    Raises:
        ClusterError: the agent was still not ready when the time was up.
    """
    deadline = time.monotonic() + wait_for_agent_s
    attempt = 0
    while True:
        attempt += 1
        try:
            return client.submit_job(
                entrypoint=package.entrypoint,
                submission_id=package.submission_id,
                runtime_env=package.runtime_env,
                metadata=package.metadata,
            )
        except RuntimeError as err:
            if NO_AGENT not in str(err):
                raise
            left = deadline - time.monotonic()
            if left <= 0:
                raise ClusterError(
                    f"the Ray cluster has no job agent ready to take the job after "
                    f"{wait_for_agent_s:.0f} s and {attempt} attempt(s); the head node may "
                    "still be starting or its dashboard agent may have failed (see "
                    "`ray status` and the dashboard_agent log on the head node), then "
                    "submit again"
                ) from None
            say(
                f"rayft: the cluster's job agent is not ready yet (attempt {attempt}); "
                f"retrying for up to {left:.0f} s"
            )
            time.sleep(min(poll_s, left))


def load_submit_spec(config: str, overrides: list[str]) -> JobSpec:
    """Read and validate the job spec to submit (``CONFIG`` plus ``key=value`` overrides)."""
    from rayft.trainers.config import load_spec

    return load_spec(config, overrides)
