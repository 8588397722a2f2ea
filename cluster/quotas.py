"""Per-project quotas on stored files and jobs, and the retention of finished jobs' checkpoints.

The bounds are ``trainers.job_limits.ProjectQuotas`` (``ServeArgs.project_quotas``):

* ``FileUsage`` counts a project's uploaded files and bytes from the file records; a
  replica reads each record once (records do not change after an upload) and lists the
  record folder on every count, so a count costs a listing plus the records new since.
* ``check_job_quota`` refuses a job while the project has ``max_active_jobs`` that have
  not ended.
* ``CheckpointSweeper`` removes the ``checkpoint_*`` folders of jobs that ended more than
  ``checkpoint_retention_hours`` ago, a few jobs per call, when jobs are listed or created.
  The run's records and the published artifact stay.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from rayft.cluster import fine_tuning as jobs
from rayft.cluster.files_service import RECORDS_DIR, list_names, read_json
from rayft.serving.auth import DEFAULT_PROJECT
from rayft.serving.errors import QuotaExceeded
from rayft.trainers.checkpoints import CHECKPOINT_PREFIX
from rayft.trainers.job_limits import ProjectQuotas
from rayft.trainers.storage import StorageError, StorageRoot, file_record_relpath, run_relpath

log = logging.getLogger(__name__)

JOB_RETRY_AFTER_S = 60
"""``Retry-After`` of a job refused for ``max_active_jobs``: jobs take minutes at least."""
SWEEP_JOBS_PER_CALL = 8
"""Most finished jobs whose checkpoints one sweep looks at (the rest wait for later calls)."""


# --------------------------------------------------------------------- files


@dataclass(frozen=True)
class Usage:
    """A project's stored files."""

    files: int
    bytes: int


class FileUsage:
    """What each project's uploaded files take, from the file records of one root."""

    def __init__(self, root: StorageRoot) -> None:
        self.root = root
        self._seen: dict[str, tuple[str, int]] = {}  # file id -> (project, bytes)
        self._lock = threading.Lock()

    def of(self, project: str) -> Usage:
        """The files and bytes ``project`` keeps now."""
        ids = list_names(self.root, RECORDS_DIR, ".json")
        with self._lock:
            known = {i: self._seen[i] for i in ids if i in self._seen}
        for file_id in ids:
            if file_id not in known:
                record = read_json(self.root, file_record_relpath(file_id))
                if record is None:
                    continue  # being written or removed: counted next time
                owner = record.get("rayft", {}).get("project") or DEFAULT_PROJECT
                known[file_id] = (owner, int(record.get("bytes") or 0))
        with self._lock:
            self._seen = known  # deleted files drop out: bounded by the files stored
        sizes = [size for owner, size in known.values() if owner == project]
        return Usage(len(sizes), sum(sizes))


def check_file_quota(usage: Usage, quotas: ProjectQuotas, project: str, adding: int = 0) -> None:
    """Refuse another file of ``adding`` bytes when ``project`` would pass a quota
    (``adding=0``: before the upload is received, refused only when no file would fit).

    Raises:
        QuotaExceeded: Naming the quota (``max_files`` or ``max_file_bytes_total``) and
            the project's use.
    """
    if usage.files >= quotas.max_files:
        quota, detail = "max_files", f"{usage.files} files stored, at most {quotas.max_files}"
    elif usage.bytes + max(adding, 1) > quotas.max_file_bytes_total:
        quota = "max_file_bytes_total"
        detail = (
            f"{usage.bytes} bytes stored{f' + {adding} uploaded' if adding else ''}, at most "
            f"{quotas.max_file_bytes_total}"
        )
    else:
        return
    raise QuotaExceeded(
        f"project {project!r} is over its {quota} quota ({detail}); delete files it no "
        "longer needs (DELETE /v1/files/<id>) or ask an admin for a larger quota",
        quota=quota,
    )


# ---------------------------------------------------------------------- jobs


def active_jobs(records: Iterable[dict[str, Any]], project: str) -> list[dict[str, Any]]:
    """The jobs of ``project`` that have not ended (validating, queued or running)."""
    return [
        r for r in records if jobs.job_project(r) == project and r["status"] not in jobs.TERMINAL
    ]


def check_job_quota(
    root: StorageRoot,
    records: list[dict[str, Any]],
    quotas: ProjectQuotas,
    project: str,
    refresh: Callable[[StorageRoot, dict[str, Any]], dict[str, Any]] | None = None,
) -> None:
    """Refuse a new job while ``project`` has ``max_active_jobs`` that have not ended.

    Args:
        records: Every job record (``fine_tuning.list_jobs``).
        refresh: Brings a record up to date (a job whose runner is gone ends), tried
            only when the quota is reached so a lost job does not hold a place.

    Raises:
        QuotaExceeded: With ``Retry-After``; the message lists the jobs that hold the quota.
    """
    active = active_jobs(records, project)
    if len(active) >= quotas.max_active_jobs and refresh is not None:
        active = active_jobs((refresh(root, r) for r in active), project)
    if len(active) < quotas.max_active_jobs:
        return
    shown = ", ".join(f"{r['id']} ({r['status']})" for r in active[:5])
    raise QuotaExceeded(
        f"project {project!r} has {len(active)} fine-tuning jobs that have not ended, its "
        f"max_active_jobs quota is {quotas.max_active_jobs} ({shown}); create the job once "
        "one ends, cancel one (POST /v1/fine_tuning/jobs/<id>/cancel), or ask an admin for "
        "a larger quota",
        quota="max_active_jobs",
        retry_after_s=JOB_RETRY_AFTER_S,
    )


# --------------------------------------------------------------- checkpoints


def finished_at(record: dict[str, Any]) -> float:
    """When a finished job ended (its ``finished_at``, else its last status change)."""
    if record.get("finished_at"):
        return float(record["finished_at"])
    history = record.get("history") or [{}]
    return float(history[-1].get("time") or record.get("created_at") or 0)


class CheckpointSweeper:
    """Removes finished jobs' checkpoints after ``retention_hours`` (0: never).

    Each replica remembers the jobs it has swept, so a job's run folder is listed once.
    """

    def __init__(self, retention_hours: float, per_call: int = SWEEP_JOBS_PER_CALL) -> None:
        self.retention_s = retention_hours * 3600.0
        self.per_call = per_call
        self._done: set[str] = set()
        self._lock = threading.Lock()

    def sweep(
        self, root: StorageRoot, records: Iterable[dict[str, Any]], now: float | None = None
    ) -> list[str]:
        """Remove the checkpoints of up to ``per_call`` jobs past retention.

        Returns:
            The run-relative paths removed (``runs/<run id>/checkpoint_…``).
        """
        if self.retention_s <= 0:
            return []
        now = time.time() if now is None else now
        with self._lock:
            due = [
                r
                for r in records
                if r["status"] in jobs.TERMINAL
                and r["id"] not in self._done
                and now - finished_at(r) >= self.retention_s
            ][: self.per_call]
            self._done.update(r["id"] for r in due)
        removed: list[str] = []
        for record in due:
            try:
                removed += remove_checkpoints(root, record["rayft"]["run_id"])
            except (StorageError, OSError) as err:
                log.warning("cannot remove the checkpoints of job %s: %s", record["id"], err)
                with self._lock:
                    self._done.discard(record["id"])  # tried again on a later call
        return removed


def remove_checkpoints(root: StorageRoot, run_id: str) -> list[str]:
    """Remove a run's ``checkpoint_*`` folders, at a URI root and in the local mirror."""
    names = set(root.list_dirs(run_relpath(run_id)))
    local = root.path(run_relpath(run_id))
    if local.is_dir():
        names.update(p.name for p in local.iterdir() if p.is_dir())
    removed = []
    for name in sorted(n for n in names if n.startswith(CHECKPOINT_PREFIX)):
        relpath = run_relpath(run_id, name)
        root.delete(relpath)  # the URI root first: the source of truth
        shutil.rmtree(root.path(relpath), ignore_errors=True)
        removed.append(relpath)
    return removed
