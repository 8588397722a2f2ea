"""Verified checkpoints: every worker's files carry a manifest of sha256 sums, written last.

A checkpoint directory of a run with ``W`` workers holds, next to the files each worker
wrote (DeepSpeed's engine and optimizer states, ``trainer_state.json``, ``export/``),
``rayft_manifest.rank<r>.json`` for every rank ``r < W``::

    {"format": 1, "rank": 1, "world_size": 2, "step": 6,
     "files": {"state/zero_pp_rank_1_mp_rank_00_optim_states.pt": {"size": 1234, "sha256": "..."}}}

A checkpoint is resumed from only when every rank's manifest is there and every file
it lists has its size and sum: DeepSpeed's optimizer states are pickles, so nothing is
loaded that the run did not write and checksum itself. Files no manifest lists are
refused too (they were not written by the run). :func:`verify_checkpoint` says what is
wrong; :func:`resume_candidates` lists a run's checkpoints newest first; the training loop
resumes from the first that verifies and reports why the newer ones were refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MANIFEST_FORMAT = 1
MANIFEST_PATTERN = re.compile(r"^rayft_manifest\.rank(\d+)\.json$")
# Ray Train names a run's checkpoint directories checkpoint_<timestamp>: newest sorts last.
CHECKPOINT_PREFIX = "checkpoint_"
_READ_BYTES = 1 << 20


def manifest_name(rank: int) -> str:
    """File name of rank ``rank``'s manifest."""
    return f"rayft_manifest.rank{rank}.json"


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_READ_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _files_under(directory: Path) -> list[str]:
    """Relative paths of every regular file under ``directory``, except manifests."""
    found = []
    for dirpath, _, names in os.walk(directory):
        for name in names:
            rel = os.path.relpath(os.path.join(dirpath, name), directory)
            if not MANIFEST_PATTERN.match(rel):
                found.append(rel.replace(os.sep, "/"))
    return sorted(found)


def write_manifest(directory: str | Path, rank: int, world_size: int, step: int) -> Path:
    """Checksum every file this rank wrote into ``directory`` and write its manifest last.

    Args:
        directory: The rank's checkpoint directory (before Ray Train uploads it).
        rank: The worker's world rank.
        world_size: Number of workers that write into the same checkpoint.
        step: The optimizer step the checkpoint holds.

    Returns:
        The manifest's path.
    """
    directory = Path(directory)
    files = {
        rel: {"size": (directory / rel).stat().st_size, "sha256": file_sha256(directory / rel)}
        for rel in _files_under(directory)
    }
    manifest = {
        "format": MANIFEST_FORMAT,
        "rank": rank,
        "world_size": world_size,
        "step": step,
        "files": files,
    }
    path = directory / manifest_name(rank)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    tmp.replace(path)  # a manifest is either whole or absent
    return path


def _read_manifests(directory: Path) -> tuple[dict[int, dict[str, Any]], list[str]]:
    manifests: dict[int, dict[str, Any]] = {}
    problems: list[str] = []
    for entry in sorted(directory.iterdir()) if directory.is_dir() else []:
        match = MANIFEST_PATTERN.match(entry.name)
        if not match:
            continue
        try:
            manifests[int(match.group(1))] = json.loads(entry.read_text())
        except (OSError, ValueError) as err:
            problems.append(f"{entry.name} is unreadable ({err.__class__.__name__})")
    return manifests, problems


def _check_file(directory: Path, rel: str, want: dict[str, Any]) -> str | None:
    path = directory / rel
    if not path.is_file():
        return f"{rel} is missing"
    size = path.stat().st_size
    if size != want.get("size"):
        return f"{rel} has {size} bytes, {want.get('size')} were written"
    if file_sha256(path) != want.get("sha256"):
        return f"{rel} has a different sha256 than was written"
    return None


def verify_checkpoint(directory: str | Path) -> list[str]:
    """What is wrong with a checkpoint directory; an empty list when it verifies.

    Checks that every rank's manifest is present (as many as the recorded world size),
    that every listed file has the recorded size and sha256, and that no file is there
    which no manifest lists.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return [f"{directory} is not a directory"]
    manifests, problems = _read_manifests(directory)
    if not manifests and not problems:
        return ["it has no manifest (written before verification existed, or incomplete)"]
    worlds = {m.get("world_size") for m in manifests.values()}
    world = max((w for w in worlds if isinstance(w, int)), default=0)
    missing = [r for r in range(world) if r not in manifests]
    if missing:
        problems.append(f"the manifest of rank(s) {missing} is missing (an incomplete save)")
    listed: set[str] = set()
    for manifest in manifests.values():
        for rel, want in sorted(manifest.get("files", {}).items()):
            listed.add(rel)
            problem = _check_file(directory, rel, want)
            if problem:
                problems.append(problem)
    unlisted = [rel for rel in _files_under(directory) if rel not in listed]
    problems.extend(f"{rel} is in no manifest" for rel in unlisted)
    return problems


@dataclass(frozen=True)
class Refusal:
    """A checkpoint that was not resumed from, and why."""

    name: str
    problems: tuple[str, ...]

    def __str__(self) -> str:
        shown = "; ".join(self.problems[:3])
        more = f" (+{len(self.problems) - 3} more)" if len(self.problems) > 3 else ""
        return f"checkpoint {self.name} refused: {shown}{more}"


def checkpoints_in(filesystem: Any, directory: str, before: str | None = None) -> list[Any]:
    """The ``checkpoint_*`` directories in a run's storage directory, newest first.

    Args:
        filesystem: A ``pyarrow.fs.FileSystem`` (local, S3, GCS, ...).
        directory: The run's directory on it (Ray Train writes
            ``<storage>/<run name>/checkpoint_<timestamp>``).
        before: Only names that sort before this one (older checkpoints).

    Returns:
        ``ray.train.Checkpoint`` objects on ``filesystem``.
    """
    import pyarrow.fs
    import ray.train

    directory = directory.rstrip("/")
    infos = filesystem.get_file_info(pyarrow.fs.FileSelector(directory, allow_not_found=True))
    names = sorted(
        (
            info.base_name
            for info in infos
            if info.type == pyarrow.fs.FileType.Directory
            and info.base_name.startswith(CHECKPOINT_PREFIX)
            and (before is None or info.base_name < before)
        ),
        reverse=True,
    )
    return [ray.train.Checkpoint(f"{directory}/{name}", filesystem=filesystem) for name in names]


def resume_candidates(registered: Any, start_from: Any, run_storage: Any) -> list[Any]:
    """The checkpoints a (re)starting run tries, newest first; the first verified one wins.

    Ray Train's ``get_checkpoint()`` hands over only the newest checkpoint it registered,
    and one a worker finished just before it was lost may be complete in storage without
    being registered. So every checkpoint directory of the run counts.

    Args:
        registered: ``ray.train.get_checkpoint()`` (or ``None``).
        start_from: Another run's ``ray.train.Checkpoint`` to start from when Ray Train
            registered none for this run (population-based training), or ``None``; only
            it and older ones beside it are tried, never that run's later checkpoints.
        run_storage: ``(filesystem, directory)`` of this run in storage, or ``None``.
    """
    if registered is None and start_from is not None:
        parent = os.path.dirname(start_from.path.rstrip("/"))
        name = checkpoint_name(start_from)
        older = checkpoints_in(start_from.filesystem, parent, before=name)
        return [start_from, *(older if name.startswith(CHECKPOINT_PREFIX) else [])]
    own = checkpoints_in(*run_storage) if run_storage is not None else []
    if registered is not None and checkpoint_name(registered) not in {
        checkpoint_name(c) for c in own
    }:
        own = sorted([*own, registered], key=checkpoint_name, reverse=True)
    return own


def checkpoint_name(checkpoint: Any) -> str:
    """The directory name of a ``ray.train.Checkpoint`` (``checkpoint_<timestamp>``)."""
    return os.path.basename(checkpoint.path.rstrip("/"))
