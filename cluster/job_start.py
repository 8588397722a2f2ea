"""What a submitted job does first on the cluster: leave Ray's working directory.

Ray starts a job's entrypoint inside the job's ``working_dir``, unpacked by the node's
runtime-env agent into ``runtime_resources/working_dir_files/_ray_pkg_<hash>``. That
directory is not the job's to keep: when several nodes share one session directory (a
head and worker nodes on one machine, as ``ray.cluster_utils.Cluster`` or a laptop
try-out runs them), every node's agent unpacks the job into the same path, removing
what is there first. A driver whose current directory was removed fails on its next
``os.getcwd()`` (a ``FileNotFoundError`` without a file name) or relative path.

So before anything else the job's driver:

1. copies the working directory (spec, shipped data, rayft's code) into a private
   directory of its own,
2. puts the shipped data files on the job's shared storage (``datasets/jobs/<id>/``),
   where every node reads them, and points the spec there,
3. re-executes itself from the private copy with the spec's absolute path, so that no
   later import, file or ``os.getcwd()`` touches Ray's directory again.

Only a job started by ``rayft submit`` does this (``build_package`` sets
:data:`JOB_ENV`); the private copy is removed when the job's driver exits. The job's
workers leave the directory too, at start (:func:`leave_ray_working_dir`, Ray's
``worker_process_setup_hook``).
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from rayft.trainers.storage import JOB_DATASETS_DIR, job_dataset_relpath

JOB_ENV = "RAYFT_SUBMITTED_JOB"
"""Set to ``1`` in a submitted job's runtime environment."""
COPY_ENV = "RAYFT_JOB_COPY"
"""The private copy a job's driver runs from, once it has left Ray's working directory."""
SPEC_NAME = "spec.yaml"
SHIPPED_DATA_DIR = "data"
DATASETS_PREFIX = JOB_DATASETS_DIR


def is_submitted_job() -> bool:
    """True in the driver of a job ``rayft submit`` started, before it left Ray's directory."""
    return os.environ.get(JOB_ENV) == "1" and not os.environ.get(COPY_ENV)


def job_key(argv: list[str]) -> str:
    """The run or sweep id the entrypoint names (``--run-id`` / ``--id`` / ``--resume``)."""
    for flag in ("--run-id", "--id", "--resume"):
        if flag in argv[:-1]:
            return argv[argv.index(flag) + 1]
    return f"job-{os.getpid()}"


def spec_argument(argv: list[str]) -> int | None:
    """Index of the shipped spec's name in a ``train``/``tune`` entrypoint, if it has one."""
    return argv.index(SPEC_NAME) if SPEC_NAME in argv else None


def stage_job(source: Path, private: Path, argv: list[str]) -> list[str]:
    """Copy ``source`` into ``private``, move the shipped data to storage, rewrite the spec.

    Args:
        source: The job's working directory (the current directory at start-up).
        private: An empty directory that belongs to this job's driver.
        argv: The entrypoint's arguments after ``rayft.cluster.cli``.

    Returns:
        ``argv`` with the spec's path made absolute inside ``private``.
    """
    shutil.copytree(source, private, dirs_exist_ok=True, symlinks=True)
    argv = list(argv)
    index = spec_argument(argv)
    if index is None:
        return argv
    spec_path = private / argv[index]
    if spec_path.is_file():
        _ship_data_to_storage(spec_path, private, job_key(argv))
    argv[index] = str(spec_path)
    return argv


def _ship_data_to_storage(spec_path: Path, private: Path, key: str) -> None:
    import yaml

    from rayft.trainers.storage import StorageRoot

    spec: dict[str, Any] = yaml.safe_load(spec_path.read_text()) or {}
    data = spec.get("data") or {}
    storage = spec.get("storage")
    if not storage or not isinstance(data, dict):
        return
    root = StorageRoot.resolve(storage)
    changed = False
    for field in ("train", "eval"):
        value = data.get(field)
        paths = [value] if isinstance(value, str) else list(value or [])
        moved = [_to_storage(root, private, p, key) for p in paths]
        if moved != paths:
            data[field] = moved[0] if isinstance(value, str) else moved
            changed = True
    if changed:
        spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))


def _to_storage(root: Any, private: Path, path: str, key: str) -> str:
    """A shipped ``data/...`` path as a path or URI on storage; other paths unchanged."""
    if not path.startswith(f"{SHIPPED_DATA_DIR}/"):
        return path  # a URI or a path on shared storage: every node reads it already
    local = private / path
    safe_key = re.sub(r"[^A-Za-z0-9._-]", "_", key)
    relpath = job_dataset_relpath(safe_key, local.name)
    target = root.path(relpath)
    if local.is_dir():
        shutil.copytree(local, target, dirs_exist_ok=True)
        root.upload_dir(target, relpath)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(local, target)
        root.mirror(relpath)
    return root.url(relpath)


def leave_working_dir(argv: list[str]) -> None:
    """In a submitted job's driver: stage the job and re-execute from the private copy.

    Does nothing outside a submitted job. Does not return otherwise (``os.execv``).
    """
    if not is_submitted_job():
        return
    source = Path(os.getcwd())  # start-up: Ray unpacked it for this process a moment ago
    private = Path(tempfile.mkdtemp(prefix="rayft-job-"))
    argv = stage_job(source, private, argv)
    os.environ[COPY_ENV] = str(private)
    os.chdir(private)
    sys.stdout.flush()
    sys.stderr.flush()
    # ``-m`` puts the current directory (the private copy) first on sys.path, so the
    # shipped rayft code is imported from there from now on.
    os.execv(sys.executable, [sys.executable, "-m", "rayft.cluster.cli", *argv])


WORKER_SETUP_HOOK = "rayft.cluster.job_start.leave_ray_working_dir"
"""Ray's ``worker_process_setup_hook`` for the workers of a submitted job (set by ``connect``)."""


def leave_ray_working_dir() -> None:
    """Move a worker process of a submitted job out of Ray's working directory.

    Ray starts the job's workers (Ray Train workers, Ray Data tasks) inside the job's
    ``working_dir`` too. Their imports come from ``PYTHONPATH``; their current
    directory only has to exist, and the temp dir does on every node. (Libraries call
    ``os.getcwd()`` on import: transformers resolves ``Path("src")``.)
    """
    os.chdir(tempfile.gettempdir())


def remove_private_copy() -> None:
    """Remove the private copy this driver ran from (at exit)."""
    private = os.environ.get(COPY_ENV)
    if private and Path(private).name.startswith("rayft-job-"):
        shutil.rmtree(private, ignore_errors=True)
