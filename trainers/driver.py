"""The driver: builds a ``TorchTrainer`` for a job spec, shows progress, publishes the result.

Expects Ray to be initialised by the caller (``cluster.connect``) so that the same
code runs on the embedded local cluster and on a remote one.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rayft.trainers.config import ConfigError, JobSpec, validate_spec
from rayft.trainers.storage import (
    home,
    is_uri,
    local_home,
    mirror_file,
    models_dir,
    read_remote,
    runs_dir,
)

SPEC_FILE = "spec.yaml"
RUN_FILE = "rayft_run.json"


@dataclass
class TrainOutcome:
    """What a finished run produced."""

    run_id: str
    metrics: dict[str, Any]
    artifact: Path | None
    checkpoint_path: str | None
    history: list[dict[str, Any]] = field(default_factory=list)

    def evals(self) -> list[dict[str, Any]]:
        return [r for r in self.history if r.get("kind") == "eval"]


def new_run_id(spec: JobSpec) -> str:
    stem = spec.output.name or spec.method
    return f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}-{os.urandom(2).hex()}"


def run_dir(run_id: str, storage: str | None) -> str:
    return f"{runs_dir(storage)}/{run_id}"


def load_run_spec(run_id: str, storage: str | None = None) -> JobSpec:
    """The spec a run was started with, for ``rayft train --resume RUN_ID``.

    With a URI root the spec is read from the URI (the run may have started elsewhere).
    """
    path = local_home(storage) / "runs" / run_id / SPEC_FILE
    remote = read_remote(storage, f"runs/{run_id}/{SPEC_FILE}")
    if remote is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(remote)
    if not path.is_file():
        where = f"{runs_dir(storage)}/{run_id}" if is_uri(home(storage)) else path.parent
        raise ConfigError([("", f"no run {run_id!r}: {where} has no {SPEC_FILE}")])
    return validate_spec(yaml.safe_load(path.read_text()), source=str(path))


def run_recorded(run_id: str, storage: str | None = None) -> bool:
    """True when a run of that id was started before (its spec is in storage)."""
    if (local_home(storage) / "runs" / run_id / SPEC_FILE).is_file():
        return True
    return read_remote(storage, f"runs/{run_id}/{SPEC_FILE}") is not None


def plan_steps(spec: JobSpec, train_rows: int, world: int) -> int:
    """Optimizer steps the run takes: ``optim.max_steps`` or ``epochs`` over the worker's shard."""
    if spec.optim.max_steps is not None:
        return spec.optim.max_steps
    rows_per_worker = train_rows // world
    if rows_per_worker == 0:
        raise ConfigError(
            [("scaling.num_workers", f"{train_rows} training rows cannot feed {world} workers")]
        )
    micro_per_epoch = math.ceil(rows_per_worker / spec.optim.batch_size)
    return max(1, (spec.optim.epochs * micro_per_epoch) // spec.optim.grad_accum)


def check_model_fits(spec: JobSpec, model_dir: Path) -> None:
    """Checks that need the model's config, done on the driver before any worker starts."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    layers = config.get("num_hidden_layers") or config.get("n_layer")
    if spec.method == "freeze" and layers and spec.freeze.trainable_layers > layers:
        raise ConfigError(
            [
                (
                    "freeze.trainable_layers",
                    f"{spec.freeze.trainable_layers} trainable layers requested but "
                    f"{spec.model.name} has {layers}",
                )
            ]
        )


def run_training(
    spec: JobSpec,
    run_id: str | None = None,
    resume: bool = False,
    show_progress: bool = True,
    extra_run: dict[str, Any] | None = None,
    callbacks: list[Any] | None = None,
    start_from: Any = None,
) -> TrainOutcome:
    """Fine-tune according to ``spec`` on the connected Ray cluster and publish the result.

    Args:
        spec: Validated job spec.
        run_id: Run name in storage; a new one is made when omitted.
        resume: Continue ``run_id`` from its newest complete checkpoint.
        show_progress: Print a progress bar and a line per logging step.
        extra_run: Additional per-run settings for the workers (used by sweeps).
        callbacks: Ray Train ``UserCallback``s for the run's ``RunConfig`` (sweeps pass
            Tune's ``TuneReportCallback`` so worker reports reach the Tune trial).
        start_from: A ``ray.train.Checkpoint`` of another run to start this new run from
            (weights, optimizer state and position; the spec's optimizer settings apply).
            Population-based training passes the checkpoint of the trial it exploits.
    """
    import ray
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from rayft.trainers.data import build_datasets
    from rayft.trainers.loop import train_loop_per_worker
    from rayft.trainers.methods import resolve_dtype
    from rayft.trainers.models import resolve_model
    from rayft.trainers.progress import ConsoleProgress, ProgressSink, sink_name
    from rayft.trainers.registry import check_publishable

    storage = spec.storage
    run_id = run_id or new_run_id(spec)
    name = spec.output.name or run_id
    kind = "adapter" if spec.method == "lora" else "model"
    if not resume:
        check_publishable(kind, name, spec.output.overwrite, storage)
    cluster_gpus = ray.cluster_resources().get("GPU", 0)
    use_gpu = bool(cluster_gpus) if spec.scaling.use_gpu == "auto" else bool(spec.scaling.use_gpu)
    try:
        dtype = resolve_dtype(spec.model.dtype, use_gpu)
    except ValueError as err:
        raise ConfigError([("model.dtype", str(err))]) from None
    model_dir = resolve_model(spec.model.name, models_dir(), spec.storage)
    check_model_fits(spec, model_dir)

    say = _printer(show_progress)
    data_ctx = ray.data.DataContext.get_current()
    data_ctx.enable_progress_bars = False
    data_ctx.print_on_execution_start = False  # rayft prints its own one-line data summary
    say(
        f"[rayft] run {run_id}: {spec.method} fine-tune of {spec.model.name} "
        f"on {spec.scaling.num_workers} worker(s), ZeRO-{spec.deepspeed.zero_stage}, {dtype}"
    )
    prepared = build_datasets(spec, str(model_dir))
    train_ds = prepared.train.materialize()
    train_rows = train_ds.count()
    eval_ds = prepared.eval.materialize() if prepared.eval is not None else None
    say(
        f"[rayft] data: {train_rows} training rows ({prepared.format}, "
        f"{'packed' if spec.data.packing else 'unpacked'}), "
        f"{eval_ds.count() if eval_ds is not None else 0} eval rows; {prepared.summary}"
    )
    total_steps = plan_steps(spec, train_rows, spec.scaling.num_workers)

    local_run = local_home(storage) / "runs" / run_id
    local_run.mkdir(parents=True, exist_ok=True)
    if not resume:
        (local_run / SPEC_FILE).write_text(yaml.safe_dump(spec.to_dict(), sort_keys=False))
        mirror_file(storage, f"runs/{run_id}/{SPEC_FILE}")
    run_info = {
        "run_id": run_id,
        "started_at": time.time(),
        "model_dir": str(model_dir),
        "dataset_sha256": prepared.fingerprint,
        "state": "running",
    }
    _save_record(storage, run_id, run_info)

    sink = ProgressSink.options(name=sink_name(run_id), get_if_exists=True).remote()
    run = {
        "model_dir": str(model_dir),
        "dtype": dtype,
        "use_gpu": use_gpu,
        "total_steps": total_steps,
        "has_eval": eval_ds is not None,
        "progress_actor": sink_name(run_id),
        "local_run_dir": None if is_uri(home(storage)) else str(local_run),
        "stop_after_step": _env_int("RAYFT_STOP_AFTER_STEP"),
        # Train V2 drops ``resume_from_checkpoint``: the loop loads this one itself when
        # the run has no checkpoint of its own yet.
        "start_from": start_from,
        **(extra_run or {}),
    }
    resources = {"CPU": spec.scaling.cpus_per_worker, **spec.scaling.resources_per_worker}
    if use_gpu:
        resources["GPU"] = 1
    datasets = {"train": train_ds}
    if eval_ds is not None:
        datasets["eval"] = eval_ds
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # same data order on every run and resume
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"spec": spec.to_dict(), "run": run},
        scaling_config=ScalingConfig(
            num_workers=spec.scaling.num_workers, use_gpu=use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=run_id,
            storage_path=runs_dir(storage),
            checkpoint_config=CheckpointConfig(num_to_keep=spec.checkpoint.keep),
            failure_config=FailureConfig(max_failures=0),
            callbacks=list(callbacks or []),
        ),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=["train"], enable_shard_locality=False),
    )
    progress = ConsoleProgress(enabled=show_progress)
    result_box: dict[str, Any] = {}

    def fit() -> None:
        try:
            result_box["result"] = trainer.fit()
        except BaseException as err:  # noqa: BLE001 - re-raised on the driver thread below
            result_box["error"] = err

    thread = threading.Thread(target=fit, name=f"rayft-fit-{run_id}", daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            thread.join(timeout=0.5)
            progress.update(ray.get(sink.drain.remote()))
        progress.update(ray.get(sink.drain.remote()))
    finally:
        progress.close()
        ray.kill(sink)
    if "error" in result_box:
        run_info["state"] = "failed"
        _save_record(storage, run_id, run_info)
        raise result_box["error"]
    result = result_box["result"]
    artifact = _publish(spec, run_id, name, kind, result, prepared, model_dir)
    metrics = dict(result.metrics or {})
    run_info.update(
        state="finished",
        finished_at=time.time(),
        metrics=metrics,
        artifact=artifact_location(kind, name, storage, artifact),
    )
    _save_record(storage, run_id, run_info)
    history = _history_from(result)
    say(
        f"[rayft] {kind} published: {run_info['artifact']}  (checkpoints: {result.checkpoint.path})"
    )
    return TrainOutcome(run_id, metrics, artifact, result.checkpoint.path, history)


def _publish(spec: JobSpec, run_id: str, name: str, kind: str, result, prepared, model_dir) -> Path:
    from rayft.trainers.loop import EXPORT_DIR, TRAINER_STATE
    from rayft.trainers.registry import publish_dir

    with result.checkpoint.as_directory() as ckpt:
        export = Path(ckpt) / EXPORT_DIR
        if not export.is_dir():
            raise RuntimeError(f"run {run_id} finished without an exported artifact in {ckpt}")
        state = json.loads((Path(ckpt) / TRAINER_STATE).read_text())
        staging = Path(tempfile.mkdtemp(prefix="rayft-publish-"))
        shutil.copytree(export, staging, dirs_exist_ok=True)
    manifest = {
        "base_model": spec.model.name,
        "base_model_path": str(model_dir),
        "method": spec.method,
        "run_id": run_id,
        "spec": spec.to_dict(),
        "dataset_sha256": prepared.fingerprint,
        "datasets": [r.__dict__ for r in prepared.reports],
        "metrics": {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))},
        "steps": state["step"],
        "stopped_early": state["stopped_early"],
        "history": state["history"],
        "parent_adapter": None,
    }
    try:
        # Overwriting was checked before training started; a resumed run replaces its own.
        return publish_dir(staging, kind, name, manifest, True, spec.storage)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _history_from(result) -> list[dict[str, Any]]:
    from rayft.trainers.loop import TRAINER_STATE

    with result.checkpoint.as_directory() as ckpt:
        return json.loads((Path(ckpt) / TRAINER_STATE).read_text())["history"]


def _save_record(storage: str | None, run_id: str, run_info: dict[str, Any]) -> None:
    """Write the run's record locally and, for a URI root, to the URI."""
    _write_json(local_home(storage) / "runs" / run_id / RUN_FILE, run_info)
    mirror_file(storage, f"runs/{run_id}/{RUN_FILE}")


def artifact_location(kind: str, name: str, storage: str | None, local: Path | None) -> str | None:
    """Where a published artifact lives for every machine: under the URI for a URI root."""
    if local is None:
        return None
    if is_uri(home(storage)):
        return f"{home(storage)}/{'adapters' if kind == 'adapter' else 'models'}/{name}"
    return str(local)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None


def _printer(enabled: bool):
    import sys

    def say(text: str) -> None:
        if enabled:
            print(text, file=sys.stderr, flush=True)

    return say
