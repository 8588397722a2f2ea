"""The rayft view of submitted jobs: state, step, latest metrics and published artifact.

Ray's Jobs API knows whether an entrypoint runs; rayft's view adds where the training
stands. It is read from two places, whichever the client can see:

* the run's storage (``<storage>/runs/<run_id>/rayft_run.json`` and the ``trainer_state.json``
  of its newest complete checkpoint, the one Ray Train's snapshot names), when this
  machine mounts the shared storage or can read the URI;
* the job's own log, which always travels through the Jobs API: progress lines
  (``train step 7/12  loss ...``), ``[rayft] resumed from step N`` and the final JSON line.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from rayft.cluster.submit import META_KIND, META_RUN_ID, META_STORAGE, SubmitError

RUN_FILE = "rayft_run.json"
TRAINER_STATE = "trainer_state.json"
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"
RESULTS_JSON = "results.json"  # a sweep's table (raytune.results)

_TRAIN_LINE = re.compile(r"train step (\d+)/(\d+)\s+loss ([-\d.eE+naninf]+)")
_EVAL_LINE = re.compile(r"eval\s+step (\d+)/(\d+)\s+eval_loss ([-\d.eE+naninf]+)")
_RESUMED_LINE = re.compile(r"\[rayft\] resumed from step (\d+)")
_PUBLISHED_LINE = re.compile(r"\[rayft\] (?:adapter|model) published: (\S+)")


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


def parse_log(text: str) -> dict[str, Any]:
    """Progress a rayft job printed: step, total, latest losses, resume point, outcome.

    tqdm redraws its bar with carriage returns, so lines are split on both.
    """
    out: dict[str, Any] = {"metrics": {}}
    for line in re.split(r"[\r\n]+", text):
        if match := _TRAIN_LINE.search(line):
            out["step"], out["total_steps"] = int(match[1]), int(match[2])
            out["metrics"]["loss"] = float(match[3])
        elif match := _EVAL_LINE.search(line):
            out["step"] = max(out.get("step", 0), int(match[1]))
            out["total_steps"] = int(match[2])
            out["metrics"]["eval_loss"] = float(match[3])
        elif match := _RESUMED_LINE.search(line):
            out["resumed_from"] = int(match[1])
        elif match := _PUBLISHED_LINE.search(line):
            out["artifact"] = match[1]
        elif line.startswith("{") and '"sweep_id"' in line:
            try:
                final = json.loads(line)
            except json.JSONDecodeError:
                continue
            out["run_id"] = final.get("sweep_id")
            out["artifact"] = final.get("artifact") or out.get("artifact")
        elif line.startswith("{") and '"run_id"' in line:
            try:
                final = json.loads(line)
            except json.JSONDecodeError:
                continue
            out["run_id"] = final.get("run_id")
            out["artifact"] = final.get("artifact") or out.get("artifact")
            metrics = final.get("metrics") or {}
            out["metrics"].update({k: v for k, v in metrics.items() if _is_number(v)})
            if "step" in metrics:
                out["step"] = int(metrics["step"])
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_run(storage: str, run_id: str) -> dict[str, Any]:
    """The run's record and newest checkpoint state from its storage, if readable here.

    Returns an empty dict when the storage cannot be read from this machine.
    """
    import pyarrow.fs as pafs

    try:
        if "://" in storage and not storage.startswith("file://"):
            fs, root = pafs.FileSystem.from_uri(storage)
        else:
            fs, root = pafs.LocalFileSystem(), storage.removeprefix("file://")
        run_root = f"{root.rstrip('/')}/runs/{run_id}"
        info = fs.get_file_info(run_root)
        if info.type != pafs.FileType.Directory:
            return {}
        out: dict[str, Any] = {}
        record = _read_json(fs, f"{run_root}/{RUN_FILE}")
        if record:
            out["record"] = record
        # Only checkpoints Ray Train has registered in its snapshot are complete: a job
        # stopped mid-upload leaves a directory that a resume would not load.
        snapshot = _read_json(fs, f"{run_root}/{SNAPSHOT_FILE}") or {}
        latest = snapshot.get("latest_checkpoint_result") or {}
        if latest.get("checkpoint_dir_name"):
            path = f"{run_root}/{latest['checkpoint_dir_name']}"
            state = _read_json(fs, f"{path}/{TRAINER_STATE}") or {}
            out["checkpoint"] = path
            out["checkpoint_step"] = int(
                state.get("step", (latest.get("metrics") or {}).get("step", 0))
            )
            out["history_tail"] = (state.get("history") or [])[-4:]
        return out
    except (OSError, ValueError):
        return {}


def read_sweep(storage: str, sweep_id: str) -> dict[str, Any]:
    """A finished sweep's ``results.json`` from its storage; empty when not (yet) readable."""
    import pyarrow.fs as pafs

    try:
        if "://" in storage and not storage.startswith("file://"):
            fs, root = pafs.FileSystem.from_uri(storage)
        else:
            fs, root = pafs.LocalFileSystem(), storage.removeprefix("file://")
        return _read_json(fs, f"{root.rstrip('/')}/sweeps/{sweep_id}/{RESULTS_JSON}") or {}
    except (OSError, ValueError):
        return {}


def _read_json(fs: Any, path: str) -> dict[str, Any] | None:
    try:
        with fs.open_input_stream(path) as handle:
            return json.loads(handle.read().decode())
    except (OSError, FileNotFoundError, json.JSONDecodeError):
        return None


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


def build_view(
    info: Any, log_text: str, run: dict[str, Any], sweep: dict[str, Any] | None = None
) -> JobView:
    """Combine Ray's ``JobDetails``, the job's log and the run's storage into a :class:`JobView`.

    For a sweep, ``sweep`` is its ``results.json`` (trial states, best trial, artifact).
    """
    metadata = dict(getattr(info, "metadata", None) or {})
    status = getattr(info.status, "value", str(info.status))
    logged = parse_log(log_text)
    record = run.get("record") or {}
    view = JobView(
        job_id=info.submission_id or info.job_id,
        ray_status=status,
        state=rayft_state(status, record.get("state")),
        kind=metadata.get(META_KIND),
        run_id=metadata.get(META_RUN_ID) or logged.get("run_id"),
        storage=metadata.get(META_STORAGE),
        message=info.message,
        entrypoint=info.entrypoint,
        start_time=(info.start_time or 0) / 1000 or None,
        end_time=(info.end_time or 0) / 1000 or None,
    )
    view.step = logged.get("step")
    view.total_steps = logged.get("total_steps")
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
    if sweep:
        trials = sweep.get("trials") or []
        view.trials = {}
        for row in trials:
            view.trials[row.get("state", "?")] = view.trials.get(row.get("state", "?"), 0) + 1
        view.best = sweep.get("best")
        metric = sweep.get("metric")
        if view.best and metric and _is_number(view.best.get(metric)):
            view.metrics[f"best_{metric}"] = view.best[metric]
        view.artifact = sweep.get("artifact") or view.artifact
    return view


def format_view(view: JobView) -> str:
    """Human-readable ``rayft jobs status`` output."""
    lines = [f"job       {view.job_id}", f"state     {view.state}  (ray: {view.ray_status})"]
    if view.kind:
        lines.append(f"kind      {view.kind}")
    if view.run_id:
        lines.append(f"run       {view.run_id}")
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
    lines.append(f"artifact  {view.artifact or '-'}")
    if view.storage:
        lines.append(f"storage   {view.storage}")
    if view.state == "stopped" and view.run_id and view.kind == "tune":
        lines.append(
            f"resume    rayft tune --resume {view.run_id} --storage {view.storage} --address ... "
            "(finished trials are kept)"
        )
    elif view.state == "stopped" and view.run_id:
        lines.append(
            f"resume    rayft submit CONFIG --resume {view.run_id} --address ... "
            "(continues from the newest checkpoint)"
        )
    if view.state == "failed" and view.message:
        lines.append(f"message   {view.message.strip().splitlines()[-1]}")
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


# ----------------------------------------------------------------- cluster calls


def job_status(client: Any, job_id: str) -> JobView:
    """The rayft view of one job (``client`` is a ``JobSubmissionClient``)."""
    info = client.get_job_info(job_id)
    try:
        log_text = client.get_job_logs(job_id)
    except RuntimeError:
        log_text = ""  # no log yet (a pending job)
    metadata = dict(info.metadata or {})
    run: dict[str, Any] = {}
    sweep: dict[str, Any] = {}
    if metadata.get(META_RUN_ID) and metadata.get(META_STORAGE):
        if metadata.get(META_KIND) == "tune":
            sweep = read_sweep(metadata[META_STORAGE], metadata[META_RUN_ID])
        else:
            run = read_run(metadata[META_STORAGE], metadata[META_RUN_ID])
    return build_view(info, log_text, run, sweep)


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
