"""The rayft view of submitted jobs and runs: state, step, latest metrics and artifact.

Ray's Jobs API knows whether an entrypoint runs; rayft's view adds where the training
stands, read from the run's storage when this machine mounts the shared storage or can
read the URI: the run's record and machine-readable events (``runs/<run_id>/``, see
``rayft.trainers.records``) and the newest checkpoint Ray Train's snapshot names. A run
started with ``rayft train`` (no Ray job) is read from its storage alone (``run_view``).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

from rayft.cluster.submit import META_KIND, META_RUN_ID, META_STORAGE, SubmitError
from rayft.trainers.records import (
    INTERRUPTED,
    checkpoint_history,
    live_state,
    newest_checkpoint,
    read_events,
    read_record,
    summarize,
)
from rayft.trainers.storage import StorageError, StorageRoot, sweep_relpath

RESULTS_JSON = "results.json"  # a sweep's table (raytune.results)


@dataclass
class JobView:
    """What ``rayft jobs status`` shows for one job."""

    job_id: str
    ray_status: str
    state: str
    kind: str | None = None
    run_id: str | None = None
    storage: str | None = None
    step: int | None = None
    total_steps: int | None = None
    resumed_from: int | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    artifact: str | None = None
    checkpoint: str | None = None
    checkpoint_step: int | None = None
    trials: dict[str, int] | None = None
    best: dict[str, Any] | None = None
    message: str | None = None
    entrypoint: str | None = None
    start_time: float | None = None
    end_time: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------- pure readers


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_run(root: StorageRoot, run_id: str) -> dict[str, Any]:
    """The run's record, events and newest checkpoint from its storage, if readable here.

    Returns:
        ``record``, ``events``, ``checkpoint``, ``checkpoint_step`` and ``history_tail``
        (each when present); an empty dict when the run's storage cannot be read from
        this machine or holds no such run.
    """
    try:
        out: dict[str, Any] = {}
        record = read_record(root, run_id)
        if record:
            out["record"] = record
        events = read_events(root, run_id)
        if events:
            out["events"] = events
        newest = newest_checkpoint(root, run_id)
        if newest is not None:
            out["checkpoint"], out["checkpoint_step"] = newest
            out["history_tail"] = checkpoint_history(root, newest[0])[-4:]
        return out
    except (OSError, StorageError, ValueError):
        return {}


def read_sweep(root: StorageRoot, sweep_id: str) -> dict[str, Any]:
    """A finished sweep's ``results.json`` from its storage; empty when not (yet) readable."""
    import json

    try:
        raw = root.read(sweep_relpath(sweep_id, RESULTS_JSON))
        return json.loads(raw) if raw else {}
    except (OSError, StorageError, ValueError):
        return {}


def rayft_state(ray_status: str, record_state: str | None) -> str:
    """One word for where a job stands, combining Ray's status and the run's record.

    A job Ray stopped while its record still says ``running`` was interrupted: it is
    ``stopped`` and can resume from its newest checkpoint.
    """
    ray_status = ray_status.upper()
    if ray_status == "PENDING":
        return "pending"
    if ray_status == "RUNNING":
        return "running" if record_state != "finished" else "publishing"
    if ray_status == "STOPPED":
        return "stopped"
    if ray_status == "FAILED":
        return "failed"
    if ray_status == "SUCCEEDED":
        return "finished"
    return ray_status.lower()


def build_view(info: Any, run: dict[str, Any], sweep: dict[str, Any] | None = None) -> JobView:
    """Combine Ray's ``JobDetails`` and the run's storage (``read_run``) into a :class:`JobView`.

    For a sweep, ``sweep`` is its ``results.json`` (trial states, best trial, artifact).
    """
    metadata = dict(getattr(info, "metadata", None) or {})
    status = getattr(info.status, "value", str(info.status))
    record = run.get("record") or {}
    view = JobView(
        job_id=info.submission_id or info.job_id,
        ray_status=status,
        state=rayft_state(status, record.get("state")),
        kind=metadata.get(META_KIND),
        run_id=metadata.get(META_RUN_ID) or record.get("run_id"),
        storage=metadata.get(META_STORAGE),
        message=info.message,
        entrypoint=info.entrypoint,
        start_time=(info.start_time or 0) / 1000 or None,
        end_time=(info.end_time or 0) / 1000 or None,
    )
    _fill_progress(view, run)
    if sweep:
        _fill_sweep(view, sweep)
    return view


def _fill_progress(view: JobView, run: dict[str, Any]) -> None:
    """Step, metrics, checkpoint and artifact from the run's events, checkpoint and record."""
    record = run.get("record") or {}
    logged = summarize(run.get("events") or [])
    view.step = logged.get("step")
    view.total_steps = logged.get("total_steps") or record.get("total_steps")
    view.resumed_from = logged.get("resumed_from")
    view.metrics = dict(logged.get("metrics") or {})
    if run.get("checkpoint_step") is not None:
        view.step = max(view.step or 0, run["checkpoint_step"])
        view.checkpoint = run.get("checkpoint")
        view.checkpoint_step = run["checkpoint_step"]
        for item in run.get("history_tail") or []:
            view.metrics.update(
                {k: v for k, v in item.items() if _is_number(v) and k not in ("step",)}
            )
            view.total_steps = view.total_steps or item.get("total_steps")
    final = record.get("metrics") or {}
    view.metrics.update({k: v for k, v in final.items() if _is_number(v)})
    if _is_number(final.get("step")):
        view.step = int(final["step"])
    view.metrics.pop("total_steps", None)
    view.artifact = record.get("artifact") or logged.get("artifact")


def _fill_sweep(view: JobView, sweep: dict[str, Any]) -> None:
    view.run_id = view.run_id or sweep.get("sweep_id")
    view.trials = {}
    for row in sweep.get("trials") or []:
        view.trials[row.get("state", "?")] = view.trials.get(row.get("state", "?"), 0) + 1
    view.best = sweep.get("best")
    metric = sweep.get("metric")
    if view.best and metric and _is_number(view.best.get(metric)):
        view.metrics[f"best_{metric}"] = view.best[metric]
    view.artifact = sweep.get("artifact") or view.artifact


def run_view(root: StorageRoot, run_id: str) -> JobView:
    """The view of a run from its storage alone (a ``rayft train`` with no Ray job).

    A record that says ``running`` while its driver is dead (its pid gone on this host,
    or its heartbeat stale) shows ``interrupted``, with the command that resumes it.

    Raises:
        SubmitError: The storage holds no run ``run_id``.
    """
    run = read_run(root, run_id)
    record = run.get("record") or {}
    if not record:
        raise SubmitError(f"no run {run_id!r} in {root.url('runs')} (no record there)")
    view = JobView(
        job_id="-",
        ray_status="-",
        state=live_state(record) or "unknown",
        kind="train",
        run_id=run_id,
        storage=root.location,
        start_time=record.get("started_at"),
        end_time=record.get("finished_at") or record.get("failed_at"),
    )
    _fill_progress(view, run)
    return view


def format_events(events: list[dict[str, Any]]) -> str:
    """A run's events as one readable line each (``rayft jobs logs RUN_ID --storage``)."""
    lines = []
    for event in events:
        when = time.strftime("%H:%M:%S", time.localtime(event.get("time", 0)))
        fields = ", ".join(
            f"{k} {_fmt(v)}" for k, v in event.items() if k not in ("time", "type") and _short(v)
        )
        lines.append(f"{when}  {event.get('type', '?'):<10}  {fields}".rstrip())
    return "\n".join(lines)


def _short(value: Any) -> bool:
    return not isinstance(value, (dict, list)) and len(str(value)) < 300


def run_logs(root: StorageRoot, run_id: str) -> str:
    """The events of a run read from its storage, formatted.

    Raises:
        SubmitError: The storage holds no events of run ``run_id``.
    """
    events = read_events(root, run_id)
    if not events:
        raise SubmitError(f"no run {run_id!r} in {root.url('runs')} (no events there)")
    return format_events(events)


def format_view(view: JobView) -> str:
    """Human-readable ``rayft jobs status`` output."""
    lines = [f"job       {view.job_id}", f"state     {view.state}  (ray: {view.ray_status})"]
    if view.kind:
        lines.append(f"kind      {view.kind}")
    if view.run_id:
        lines.append(f"run       {view.run_id}")
    lines += _progress_lines(view)
    lines.append(f"artifact  {view.artifact or '-'}")
    if view.storage:
        lines.append(f"storage   {view.storage}")
    resume = _resume_hint(view)
    if resume:
        lines.append(f"resume    {resume}")
    if view.state == "failed" and view.message:
        lines.append(f"message   {view.message.strip().splitlines()[-1]}")
    return "\n".join(lines)


def _progress_lines(view: JobView) -> list[str]:
    """How far the job got: step, metrics, newest checkpoint, trial states, best trial."""
    lines = []
    if view.step is not None:
        total = f"/{view.total_steps}" if view.total_steps else ""
        resumed = f"  (resumed from step {view.resumed_from})" if view.resumed_from else ""
        lines.append(f"step      {view.step}{total}{resumed}")
    if view.metrics:
        shown = ", ".join(f"{k} {_fmt(v)}" for k, v in sorted(view.metrics.items()))
        lines.append(f"metrics   {shown}")
    if view.checkpoint:
        lines.append(f"checkpoint step {view.checkpoint_step}: {view.checkpoint}")
    if view.trials:
        lines.append("trials    " + ", ".join(f"{n} {s}" for s, n in sorted(view.trials.items())))
    if view.best:
        lines.append(f"best      trial {view.best.get('trial')} (run {view.best.get('run_id')})")
    return lines


def _resume_hint(view: JobView) -> str | None:
    """The command that continues a stopped or interrupted job or run."""
    if not view.run_id:
        return None
    if view.state == "stopped" and view.kind == "tune":
        return (
            f"rayft tune --resume {view.run_id} --storage {view.storage} --address ... "
            "(finished trials are kept)"
        )
    if view.state == INTERRUPTED:
        return (
            f"rayft train --resume {view.run_id} --storage {view.storage} "
            "(continues from the newest checkpoint)"
        )
    if view.state == "stopped":
        return (
            f"rayft submit CONFIG --resume {view.run_id} --address ... "
            "(continues from the newest checkpoint)"
        )
    return None


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


# ----------------------------------------------------------------- cluster calls


def job_status(client: Any, job_id: str) -> JobView:
    """The rayft view of one job (``client`` is a ``JobSubmissionClient``)."""
    info = client.get_job_info(job_id)
    metadata = dict(info.metadata or {})
    run: dict[str, Any] = {}
    sweep: dict[str, Any] = {}
    if metadata.get(META_RUN_ID) and metadata.get(META_STORAGE):
        # Each job names its own root in its metadata (``rayft submit --storage``).
        root = StorageRoot.resolve(metadata[META_STORAGE])
        if metadata.get(META_KIND) == "tune":
            sweep = read_sweep(root, metadata[META_RUN_ID])
        else:
            run = read_run(root, metadata[META_RUN_ID])
    return build_view(info, run, sweep)


def list_rayft_jobs(client: Any, everything: bool = False) -> list[Any]:
    """Jobs on the cluster submitted by rayft (all jobs with ``everything``), newest first."""
    jobs = [job for job in client.list_jobs() if everything or (job.metadata or {}).get(META_KIND)]
    return sorted(jobs, key=lambda job: job.start_time or 0, reverse=True)


def format_job_rows(jobs: list[Any]) -> str:
    """A table of jobs for ``rayft jobs list``."""
    if not jobs:
        return "no rayft jobs on this cluster (submit one with `rayft submit CONFIG`)"
    rows = [("JOB", "KIND", "RAY STATUS", "RUN", "STARTED")]
    for job in jobs:
        metadata = job.metadata or {}
        started = (
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job.start_time / 1000))
            if job.start_time
            else "-"
        )
        rows.append(
            (
                job.submission_id or job.job_id or "-",
                metadata.get(META_KIND, "-"),
                getattr(job.status, "value", str(job.status)),
                metadata.get(META_RUN_ID, "-"),
                started,
            )
        )
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def follow_logs(client: Any, job_id: str, out: Any) -> str:
    """Stream a job's log to ``out`` until the job ends; returns Ray's final status."""
    import asyncio

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    asyncio.run(tail())
    # The log stream closes when the job ends; its status may lag by a moment.
    for _ in range(50):
        status = client.get_job_status(job_id)
        if status.is_terminal():
            return status.value
        time.sleep(0.2)
    return client.get_job_status(job_id).value


def stop_job(client: Any, job_id: str, wait_s: float = 60.0) -> str:
    """Ask Ray to stop a job and wait until it has; returns its final status.

    Ray sends the entrypoint SIGTERM (SIGKILL after a grace period); the training workers
    go with the driver, and every checkpoint already written stays in storage.
    """
    status = client.get_job_status(job_id)
    if status.is_terminal():
        return status.value
    client.stop_job(job_id)
    deadline = time.time() + wait_s
    while time.time() < deadline:
        status = client.get_job_status(job_id)
        if status.is_terminal():
            return status.value
        time.sleep(0.5)
    raise SubmitError(f"job {job_id} did not stop within {wait_s:.0f}s; check `rayft jobs status`")


def exit_code_for(status: str) -> int:
    """The exit code of ``--follow``: 0 when the job succeeded, 1 otherwise."""
    return 0 if status.upper() == "SUCCEEDED" else 1
