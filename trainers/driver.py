"""The driver: builds a ``TorchTrainer`` for a job spec, shows progress, publishes the result.

Expects Ray to be initialised by the caller (``cluster.connect``) so that the same
code runs on the embedded local cluster and on a remote one.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rayft.trainers.config import ADAPTER_METHODS, ConfigError, JobSpec, validate_spec
from rayft.trainers.objectives import objective_class
from rayft.trainers.records import (
    FAILED,
    FINISHED,
    HEARTBEAT_S,
    INTERRUPTED,
    PAUSED,
    SPEC_FILE,
    RunLog,
    newest_checkpoint,
    read_record,
)
from rayft.trainers.registry import artifact_location
from rayft.trainers.rollout import RolloutEngines, check_judges
from rayft.trainers.startup import (
    CONTROLLER_FAILURE_LIMIT,
    bounded_worker_start,
    prompt_polling,
    wait_for_data_cpu,
)
from rayft.trainers.storage import (
    MANIFEST_FILE,
    StorageFullError,
    StorageRoot,
    is_storage_full,
    run_relpath,
)

__all__ = ["SPEC_FILE", "TrainOutcome", "artifact_location", "new_run_id", "run_training"]


@dataclass
class TrainOutcome:
    """What a finished run produced."""

    run_id: str
    metrics: dict[str, Any]
    artifact: Path | None
    checkpoint_path: str | None
    history: list[dict[str, Any]] = field(default_factory=list)
    paused: bool = False
    """A pause ended the run at ``checkpoint_path`` (nothing published); resume it."""

    def evals(self) -> list[dict[str, Any]]:
        return [r for r in self.history if r.get("kind") == "eval"]


def new_run_id(stem: str) -> str:
    """A fresh run (or sweep) id: ``<stem>-<UTC-less local time>-<4 hex digits>``.

    Args:
        stem: What the run is for, usually ``output.name`` or the method.
    """
    return f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}-{os.urandom(2).hex()}"


def load_run_spec(run_id: str, root: StorageRoot) -> JobSpec:
    """The spec a run was started with, for ``rayft train --resume RUN_ID``.

    With a URI root the spec is read from the URI (the run may have started elsewhere).
    """
    relpath = run_relpath(run_id, SPEC_FILE)
    raw = root.read(relpath)
    if raw is None:
        raise ConfigError(
            [("", f"no run {run_id!r}: {root.url(run_relpath(run_id))} has no {SPEC_FILE}")]
        )
    return validate_spec(yaml.safe_load(raw.decode()), source=root.url(relpath))


def run_recorded(run_id: str, root: StorageRoot) -> bool:
    """True when a run of that id was started before (its spec is in storage)."""
    relpath = run_relpath(run_id, SPEC_FILE)
    return root.path(relpath).is_file() or (root.is_remote and root.read(relpath) is not None)


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


def plan_line(spec: JobSpec, total_steps: int, train_rows: int) -> str:
    """The one line saying what the run will do: steps, effective batch and learning rate.

    Printed before training so a user sees what the defaults chose
    (``trainers.config.resolve_defaults``), e.g. ``[rayft] plan: 25 optimizer steps (1
    epoch of 200 rows), effective batch 8 (4 per worker x 1 accumulation x 2 workers),
    lr 0.001 (the lora default), cosine, 1 warm-up step``.
    """
    from rayft.trainers.defaults import default_lr

    optim, workers = spec.optim, spec.scaling.num_workers
    if optim.max_steps is not None:
        length = "optim.max_steps"
    else:
        length = f"{optim.epochs} epoch{'s' if optim.epochs != 1 else ''} of {train_rows} rows"
    plain = spec.objective == JobSpec.model_fields["objective"].default
    what = spec.method if plain else f"{spec.objective} {spec.method}"
    chosen = f" (the {what} default)" if optim.lr == default_lr(spec.objective, spec.method) else ""
    warmup = math.ceil(optim.warmup_ratio * total_steps)
    return (
        f"[rayft] plan: {total_steps} optimizer steps ({length}), effective batch "
        f"{optim.batch_size * optim.grad_accum * workers} ({optim.batch_size} per worker x "
        f"{optim.grad_accum} accumulation x {workers} worker{'s' if workers != 1 else ''}), "
        f"lr {optim.lr:g}{chosen}, {optim.scheduler}, {warmup} warm-up step"
        f"{'s' if warmup != 1 else ''}"
    )


def _check_sources(spec: JobSpec, root: StorageRoot, model_dir: Path) -> Any:
    """What a run trains from besides its data, checked before anything starts on Ray: the
    base fits, the parent adapter (``model.adapter``) and what the objective names (GRPO's
    judges). Returns the parent (``trainers.lineage.resolve_parent``)."""
    from rayft.trainers.lineage import resolve_parent

    check_model_fits(spec, model_dir)
    parent = resolve_parent(spec, root, model_dir)
    check_judges(objective_class(spec).judges(spec), root)
    return parent


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


JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"
"""jemalloc's settings for training workers: freed pages are kept for reuse, never purged.

A training step frees and allocates the same activation sizes every step. jemalloc packs
them without glibc's fragmentation (a worker's peak resident set stays close to the
memory it actually holds); not purging means no page is handed back to the OS only to be
faulted in again a step later. Measured on CPU, smollm2-135m LoRA steps at [4, 512]: glibc
4.9 GB peak, jemalloc's default 10 s decay 2.8 GB but ~15 % slower than glibc, these
settings 2.9 GB and ~15 % faster than glibc."""


def jemalloc_library() -> Path | None:
    """The libjemalloc Ray's wheel ships (``ray/core``), or ``None`` when it has none."""
    import ray

    library = Path(ray.__file__).parent / "core" / "libjemalloc.so"
    return library if library.is_file() else None


def worker_runtime_env(allocator: str) -> dict[str, Any]:
    """The runtime environment of the training workers for ``scaling.allocator``.

    ``jemalloc`` preloads the libjemalloc that Ray's own wheel ships, so no system
    package is needed, with :data:`JEMALLOC_CONF`; ``auto`` does the same where that
    library exists and keeps the system allocator where it does not. The path is this
    machine's; workers on nodes where Ray is installed elsewhere print the loader's
    "cannot be preloaded" warning and run with the system allocator.

    Raises:
        ConfigError: ``jemalloc`` was asked for and this Ray installation has none.
    """
    library = jemalloc_library() if allocator != "system" else None
    if library is None:
        if allocator == "jemalloc":
            raise ConfigError(
                [
                    (
                        "scaling.allocator",
                        "jemalloc needs the libjemalloc.so Ray's wheel ships in ray/core, "
                        "which this Ray installation lacks; use scaling.allocator=system",
                    )
                ]
            )
        return {}
    preload = " ".join(filter(None, [str(library), os.environ.get("LD_PRELOAD")]))
    return {"env_vars": {"LD_PRELOAD": preload, "MALLOC_CONF": JEMALLOC_CONF}}


def run_training(
    spec: JobSpec,
    run_id: str | None = None,
    resume: bool = False,
    show_progress: bool = True,
    loop_callbacks: list[Any] | None = None,
    callbacks: list[Any] | None = None,
    start_from: Any = None,
    scanned: Any = None,
    publish: bool = True,
    project: str | None = None,
) -> TrainOutcome:
    """Fine-tune according to ``spec`` on the connected Ray cluster and publish the result.

    The run's record and events (``trainers.records``) are written to ``runs/<run_id>/``.

    Args:
        spec: Validated job spec.
        run_id: Run name in storage; a new one is made when omitted.
        resume: Continue ``run_id`` from its newest complete checkpoint.
        show_progress: Print a progress bar and a line per logging step.
        loop_callbacks: ``trainers.loop.LoopCallback`` objects run inside every worker's
            loop (sweeps pass ``ReportEveryEval`` so a scheduler sees every evaluation; a
            fine-tuning job passes ``PauseOnRequest``: a paused run's outcome has ``paused``
            set, its state is ``paused`` and nothing is published).
        callbacks: Ray Train ``UserCallback``s for the run's ``RunConfig`` (sweeps pass
            Tune's ``TuneReportCallback`` so worker reports reach the Tune trial).
        start_from: A ``ray.train.Checkpoint`` of another run to start this new run from
            (weights, optimizer state and position; the spec's optimizer settings apply).
            Population-based training passes the checkpoint of the trial it exploits.
        scanned: ``trainers.data.scan_sources(spec)`` when the caller already scanned the
            data (``rayft train`` does, before it starts Ray), so no file is read twice.
        publish: Publish the artifact under ``output.name``. Without, the export stays in
            the final checkpoint and the manifest it would carry is written to the run's
            directory (``rayft.json``): a sweep publishes only its best trial.
        project: The project a fine-tuning job runs for: its artifact serves that
            project only (the manifest's ``project``); ``None`` publishes a shared one.
    """
    import ray

    from rayft.trainers.loop import WorkerInputs
    from rayft.trainers.models import resolve_model
    from rayft.trainers.progress import ConsoleProgress, ProgressSink, sink_name
    from rayft.trainers.registry import check_publishable

    root = StorageRoot.resolve(spec.storage)
    run_id = run_id or new_run_id(spec.output.name or spec.method)
    name = spec.output.name or run_id
    kind = "adapter" if spec.method in ADAPTER_METHODS else "model"
    if not resume:
        check_publishable(kind, name, spec.output.overwrite, root)
    use_gpu, dtype = _placement(spec)
    model_dir = resolve_model(spec.model.name, root.models, root)
    parent = _check_sources(spec, root, model_dir)

    say = _printer(show_progress)
    data_ctx = ray.data.DataContext.get_current()
    data_ctx.enable_progress_bars = False
    data_ctx.print_on_execution_start = False  # rayft prints its own one-line data summary
    _announce(say, spec, run_id, dtype, parent)
    spec, prepared, feed = _prepare_data(spec, model_dir, scanned, say)
    train_rows = feed.train_rows
    total_steps = plan_steps(spec, train_rows, spec.scaling.num_workers)
    say(plan_line(spec, total_steps, train_rows))
    general = general_examples(spec, model_dir)

    runlog = _start_record(root, run_id, spec, resume, model_dir, prepared.fingerprint, total_steps)

    sink = ProgressSink.options(name=sink_name(run_id), get_if_exists=True).remote()
    inputs = WorkerInputs(
        model_dir=str(model_dir),
        dtype=dtype,
        use_gpu=use_gpu,
        total_steps=total_steps,
        has_eval=feed.has_eval,
        progress_actor=sink_name(run_id),
        local_run_dir=None if root.is_remote else str(root.run(run_id)),
        # Train V2 drops ``resume_from_checkpoint``: the loop loads this one itself when
        # the run has no checkpoint of its own yet.
        start_from=start_from,
        callbacks=tuple(loop_callbacks or ()),
        parent_adapter=parent,
        general=general,
        rollouts=RolloutEngines(),
        tables=feed.tables,
    )
    trainer = _torch_trainer(spec, root, run_id, inputs, feed.datasets, callbacks)
    progress = ConsoleProgress(enabled=show_progress)
    with failure_recorded(runlog):
        # bounded_worker_start: the run fails after scaling.start_timeout_s if workers
        # cannot start; both wrappers put rayft's own error in place of Ray's, and the record
        # keeps that one. prompt_polling: the run ends as soon as its workers have.
        with (
            bounded_worker_start(spec),
            prompt_polling(),
            storage_full_named(spec, root, run_id),
        ):
            result = _fit_with_progress(trainer, sink, progress, runlog)
        if (result.metrics or {}).get("paused"):
            return _paused(runlog, result, say)
        with storage_full_named(spec, root, run_id):  # e.g. an artifact that would not serve
            artifact = _publish(
                spec, root, run_id, name, kind, result, prepared, model_dir, parent, publish,
                project, say=say,
            )  # fmt: skip
    metrics = dict(result.metrics or {})
    location = artifact_location(kind, name, root, artifact)
    if location is not None:
        runlog.event("artifact", kind=kind, name=name, location=location)
    runlog.state(
        FINISHED,
        finished_at=time.time(),
        metrics=metrics,
        artifact=location,
        checkpoint=result.checkpoint.path,
    )
    history = _history_from(result)
    _say_general(say, result)
    what = f"published: {location}" if location is not None else "exported, not published"
    say(f"[rayft] {kind} {what}  (checkpoints: {result.checkpoint.path})")
    return TrainOutcome(run_id, metrics, artifact, result.checkpoint.path, history)


def _paused(runlog: RunLog, result: Any, say: Any) -> TrainOutcome:
    """A paused run's outcome: its checkpoint recorded, nothing exported or published."""
    metrics = dict(result.metrics or {})
    step, where = int(metrics.get("step", 0)), result.checkpoint.path
    runlog.event("paused", step=step, checkpoint=where)
    runlog.state(PAUSED, paused_at=time.time(), checkpoint=where)
    say(f"[rayft] paused after step {step}; resuming the run continues from {where}")
    return TrainOutcome(runlog.run_id, metrics, None, where, _history_from(result), paused=True)


def _placement(spec: JobSpec) -> tuple[bool, Any]:
    """Whether the workers use GPUs (``scaling.use_gpu``, or the cluster's for ``auto``) and
    the dtype they compute in.

    Raises:
        ConfigError: ``model.dtype`` is not available on that device.
    """
    import ray

    from rayft.trainers.precision import gpu_has_bf16, resolve_dtype

    resources = ray.cluster_resources()
    cluster_gpus = resources.get("GPU", 0)
    use_gpu = bool(cluster_gpus) if spec.scaling.use_gpu == "auto" else bool(spec.scaling.use_gpu)
    try:
        bf16 = gpu_has_bf16(resources) if use_gpu else None
        return use_gpu, resolve_dtype(spec.model.dtype, use_gpu, bf16)
    except ValueError as err:
        raise ConfigError([("model.dtype", str(err))]) from None


def _announce(say: Any, spec: JobSpec, run_id: str, dtype: Any, parent: Any) -> None:
    """The run's first lines: what is trained on how many workers, and the parent adapter."""
    # The default objective goes without saying; another is named before the method.
    default = JobSpec.model_fields["objective"].default
    what = spec.method if spec.objective == default else f"{spec.objective} {spec.method}"
    say(
        f"[rayft] run {run_id}: {what} fine-tune of {spec.model.name} "
        f"on {spec.scaling.num_workers} worker(s), ZeRO-{spec.deepspeed.zero_stage}, {dtype}"
    )
    if parent is not None:
        say(f"[rayft] continuing adapter {parent.name} (version {parent.version})")
        for line in parent.lora_notes(spec):
            say(line)


@dataclass
class RunData:
    """The prepared data as the workers receive it."""

    train_rows: int
    eval_rows: int | None
    """Rows of the eval data; ``None`` when the run has none."""
    datasets: dict[str, Any]
    """Ray Datasets for ``TorchTrainer`` (``train`` is split among the workers)."""
    tables: dict[str, Any]
    """Object refs of the tables prepared in the driver (``trainers.shards``)."""

    @property
    def has_eval(self) -> bool:
        return self.eval_rows is not None


def _prepare_data(spec: JobSpec, model_dir: Path, scanned: Any, say: Any) -> tuple:
    """The run's data, prepared: ``(spec, prepared, RunData)``.

    Ray Datasets are materialized here; tables prepared in the driver are put in the
    object store once, for every worker to read. The returned spec carries what the
    objective takes from the scan (``Objective.with_scan``, e.g. the label names the
    rows carry).
    """
    import ray

    from rayft.trainers.data import build_datasets, scan_sources

    scanned = scanned or scan_sources(spec, str(model_dir))
    spec = objective_class(spec).with_scan(spec, scanned, say)
    prepared = build_datasets(spec, str(model_dir), scanned)
    splits = {"train": prepared.train, "eval": prepared.eval}
    splits = {name: data for name, data in splits.items() if data is not None}
    if prepared.in_driver:
        rows = {name: table.num_rows for name, table in splits.items()}
        feed = RunData(rows["train"], rows.get("eval"), {}, {})
        feed.tables = {name: ray.put(table) for name, table in splits.items()}
    else:
        # Ray Data's tasks need a CPU beside the workers' (fails after start_timeout_s).
        wait_for_data_cpu(spec.scaling.start_timeout_s, say)
        datasets = {name: data.materialize() for name, data in splits.items()}
        rows = {name: ds.count() for name, ds in datasets.items()}
        feed = RunData(rows["train"], rows.get("eval"), datasets, {})
    say(
        f"[rayft] data: {feed.train_rows} training rows ({prepared.format}, "
        f"{'packed' if spec.data.packing else 'unpacked'}), "
        f"{feed.eval_rows or 0} eval rows; {prepared.summary}"
    )
    return spec, prepared, feed


def _torch_trainer(
    spec: JobSpec,
    root: StorageRoot,
    run_id: str,
    inputs: Any,
    datasets: dict[str, Any],
    callbacks: list[Any] | None,
) -> Any:
    """The ``TorchTrainer`` that runs the per-worker loop over the run's datasets."""
    import ray
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from rayft.trainers.loop import train_loop_per_worker
    from rayft.trainers.progress import sink_name
    from rayft.trainers.restarts import failure_notices

    resources = {"CPU": spec.scaling.cpus_per_worker, **spec.scaling.resources_per_worker}
    if inputs.use_gpu:
        resources["GPU"] = 1
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # same data order on every run and resume
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"spec": spec.to_dict(), "inputs": inputs},
        scaling_config=ScalingConfig(
            num_workers=spec.scaling.num_workers,
            use_gpu=inputs.use_gpu,
            resources_per_worker=resources,
        ),
        run_config=RunConfig(
            name=run_id,
            storage_path=root.runs,
            checkpoint_config=CheckpointConfig(num_to_keep=spec.checkpoint.keep),
            # A lost worker restarts the group from the newest verified checkpoint.
            failure_config=FailureConfig(
                max_failures=spec.scaling.max_failures,
                controller_failure_limit=CONTROLLER_FAILURE_LIMIT,
            ),
            worker_runtime_env=worker_runtime_env(spec.scaling.allocator),
            callbacks=[
                *(callbacks or []),
                checkpoint_events(sink_name(run_id)),
                failure_notices(sink_name(run_id)),
            ],
        ),
        datasets=datasets or None,
        dataset_config=DataConfig(datasets_to_split=["train"], enable_shard_locality=False),
    )


def _start_record(
    root: StorageRoot,
    run_id: str,
    spec: JobSpec,
    resume: bool,
    model_dir: Path,
    fingerprint: str,
    total_steps: int,
) -> RunLog:
    """Write the run's spec (a new run) and record, and its first events."""
    if not resume:
        root.write(run_relpath(run_id, SPEC_FILE), yaml.safe_dump(spec.to_dict(), sort_keys=False))
    runlog = RunLog(root, run_id)
    runlog.record = read_record(root, run_id) if resume else {}
    runlog.start(
        run_id=run_id,
        started_at=time.time(),
        model_dir=str(model_dir),
        dataset_sha256=fingerprint,
        total_steps=total_steps,
    )
    newest = newest_checkpoint(root, run_id) if resume else None
    if newest is not None:
        runlog.event("resumed", step=newest[1], checkpoint=newest[0])
    return runlog


def _fit_with_progress(trainer: Any, sink: Any, progress: Any, runlog: RunLog) -> Any:
    """Run ``trainer.fit()`` in a thread; show and record progress and heartbeats meanwhile.

    Raises:
        BaseException: What ``fit`` raised (the caller records it), or the
            ``KeyboardInterrupt`` that stopped the driver (recorded ``interrupted``).
    """
    import ray

    from rayft.trainers.restarts import Notices

    result_box: dict[str, Any] = {}
    # Restarts and refused checkpoints: one line each, printed above the progress bar.
    notices = Notices(say=progress.write)

    def fit() -> None:
        try:
            result_box["result"] = trainer.fit()
        except BaseException as err:  # noqa: BLE001 - re-raised on the driver thread below
            result_box["error"] = err

    def drain() -> None:
        records = ray.get(sink.drain.remote())
        for record in records:
            runlog.progress(record)
        records = notices.take(records)
        progress.update([r for r in records if r.get("kind") != "checkpoint"])

    thread = threading.Thread(target=fit, name=f"rayft-fit-{runlog.run_id}", daemon=True)
    thread.start()
    last_beat = time.time()
    try:
        while thread.is_alive():
            thread.join(timeout=0.5)
            drain()
            if time.time() - last_beat >= HEARTBEAT_S:
                runlog.heartbeat()
                last_beat = time.time()
        drain()
    except KeyboardInterrupt:
        runlog.state(INTERRUPTED, interrupted_at=time.time())
        raise
    finally:
        progress.close()
        runlog.flush()
        ray.kill(sink)
    if "error" in result_box:
        raise result_box["error"]
    return result_box["result"]


@contextlib.contextmanager
def failure_recorded(runlog: RunLog) -> Iterator[None]:
    """Record the error that leaves the block, and the ``failed`` state (a
    ``KeyboardInterrupt`` is the driver's stop, recorded ``interrupted`` where it is caught)."""
    try:
        yield
    except KeyboardInterrupt:
        raise
    except BaseException as err:
        _record_failure(runlog, err)
        raise


def _record_failure(runlog: RunLog, err: BaseException) -> None:
    """Record ``err`` and the ``failed`` state; a record that cannot be written (its disk
    is full, say) is reported on stderr and does not hide ``err``."""
    try:
        runlog.event("error", error=type(err).__name__, message=str(err)[:2000])
        runlog.state(FAILED, failed_at=time.time())
    except OSError as record_err:
        print(f"[rayft] the run's failure could not be recorded: {record_err}", file=sys.stderr)


@contextlib.contextmanager
def storage_full_named(spec: JobSpec, root: StorageRoot, run_id: str) -> Iterator[None]:
    """Raise a :class:`StorageFullError` that says what to do in place of an error whose
    cause is a full disk (a worker's checkpoint, the run's record, the published copy)."""
    try:
        yield
    except Exception as err:
        if not is_storage_full(err):
            raise
        raise StorageFullError(
            f"run {run_id} stopped: no space left on the disk of its storage ({root.location}). "
            f"Each checkpoint holds the trained weights ({spec.method}) and the optimizer's "
            f"state; checkpoint.keep={spec.checkpoint.keep} of them are kept. Free space "
            "there, lower checkpoint.keep, or give a larger disk (--storage / RAYFT_HOME); "
            f"`rayft train --resume {run_id}` continues from its newest complete checkpoint"
        ) from err


def checkpoint_events(sink: str) -> Any:
    """A Ray Train callback that tells the driver (through its progress actor) of each checkpoint."""
    from ray.train import UserCallback

    class CheckpointEvents(UserCallback):
        def after_report(self, run_context, metrics, checkpoint) -> None:
            if checkpoint is None:
                return
            import ray

            step = (metrics[0] if metrics else {}).get("step")
            record = {"kind": "checkpoint", "step": step, "path": checkpoint.path}
            try:
                ray.get_actor(sink).push.remote(record)
            except ValueError:
                pass  # the driver has gone: nobody is left to record it

    return CheckpointEvents()


def _publish(
    spec: JobSpec,
    root: StorageRoot,
    run_id: str,
    name: str,
    kind: str,
    result,
    prepared,
    model_dir,
    parent=None,
    publish: bool = True,
    project: str | None = None,
    say: Any = None,
) -> Path | None:
    """Publish the final checkpoint's export: its files are copied once, into the registry.

    Rank 0 checked the export serves when it wrote it (``trainers.loop.check_export``):
    here its note is read, an export that did not serve is refused, and ``publish_dir``
    records the base's weights fingerprint; ``parent`` is the adapter a continued run started from. Without
    ``publish`` only the manifest is written, to ``runs/<run_id>/rayft.json``.
    """
    from rayft.trainers.loop import EXPORT_DIR, SERVABLE_FILE, TRAINER_STATE
    from rayft.trainers.registry import ArtifactManifest, publish_dir
    from rayft.trainers.servable import export_was_checked

    with result.checkpoint.as_directory() as ckpt:
        export = Path(ckpt) / EXPORT_DIR
        if not export.is_dir():
            raise RuntimeError(f"run {run_id} finished without an exported artifact in {ckpt}")
        state = json.loads((Path(ckpt) / TRAINER_STATE).read_text())
        manifest = ArtifactManifest(
            kind=kind,
            name=name,
            base_model=spec.model.name,
            base_model_path=str(model_dir),
            objective=spec.objective,
            method=spec.method,
            task=spec.older_keys()["task"],  # for readers that know only `task`
            run_id=run_id,
            spec=spec.to_dict(),
            dataset_sha256=prepared.fingerprint,
            datasets=[r.__dict__ for r in prepared.reports],
            metrics={
                k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))
            },
            steps=state["step"],
            stopped_early=state["stopped_early"],
            history=state["history"],
            parent_adapter=parent.record() if parent is not None else None,
            general=state.get("general") or None,  # eval.general: before, after, delta
            # eval.benchmarks: lm-eval scores of the weights the run started from and of these
            benchmarks=_benchmark_report(spec, kind, export, model_dir, parent, say or _silent),
            **objective_class(spec).manifest_fields(spec),  # e.g. the head's labels
            project=project,
        )
        note = Path(ckpt) / SERVABLE_FILE
        checked = export_was_checked(note.read_bytes() if note.is_file() else None)
        if not publish:
            root.write(run_relpath(run_id, MANIFEST_FILE), manifest.to_json())
            return None
        # Checked before training and again under the name's lock: a run that finished
        # second does not replace what another published meanwhile, unless output.overwrite.
        return publish_dir(
            export,
            kind,
            name,
            manifest,
            spec.output.overwrite,
            root,
            base_dir=model_dir,
            checked=checked,
        )


GENERAL_MAX_SEQ_LEN = 512


def general_examples(spec: JobSpec, model_dir: Path) -> tuple:
    """``eval.general``'s rows, tokenized for the workers (``()`` without the check).

    Raises:
        ConfigError: The set cannot be read or has no usable row (key ``eval.general``).
    """
    if spec.eval.general is None:
        return ()
    from rayft.trainers.data import load_tokenizer
    from rayft.trainers.generation_eval import general_examples as tokenized

    try:
        # Its own length bound: the general set's rows are short whatever data.max_seq_len is.
        return tokenized(spec.eval.general, load_tokenizer(str(model_dir)), GENERAL_MAX_SEQ_LEN)
    except Exception as err:  # noqa: BLE001 - a missing or malformed file, said with its key
        raise ConfigError([("eval.general", f"cannot read {spec.eval.general!r}: {err}")]) from None


def _benchmark_report(
    spec: JobSpec, kind: str, export: Path, model_dir: Path, parent: Any, say: Any
) -> Any:
    """``eval.benchmarks`` of the weights the run started from (the base, or
    ``model.adapter`` on it) and of its export, for the manifest's ``benchmarks``
    (``None`` without benchmarks). Both are scored once training is done, in this process,
    when the workers have released their devices; a failure of lm-eval is reported and
    leaves that side empty, it does not fail the run."""
    if not spec.eval.benchmarks:
        return None
    from rayft.trainers.benchmarks import BenchmarkError, benchmark_line, run_benchmarks
    from rayft.trainers.benchmarks import weights_model_args as weights
    from rayft.trainers.manifest import BenchmarkReport

    start = weights(model_dir, parent.local_dir() if parent is not None else None)
    end = weights(model_dir, export) if kind == "adapter" else weights(export, tokenizer=model_dir)
    scores: dict[str, dict] = {}
    for side, args in (("before", start), ("after", end)):
        try:
            scores[side] = run_benchmarks(
                spec.eval.benchmarks, args, model="hf", tasks_dir=spec.eval.benchmarks_dir
            )
        except BenchmarkError as err:
            say(f"[rayft] benchmarks {side} training failed, none recorded: {err}")
    report = BenchmarkReport(**scores)
    say(benchmark_line(report))
    return report


def _silent(_line: str) -> None:
    """Says nothing (``_publish`` called without a printer)."""


def _say_general(say: Any, result: Any) -> None:
    """Print what the fine-tune cost on ``eval.general``, in one line."""
    from rayft.trainers.generation_eval import general_line
    from rayft.trainers.loop import TRAINER_STATE

    with result.checkpoint.as_directory() as ckpt:
        record = json.loads((Path(ckpt) / TRAINER_STATE).read_text()).get("general")
    if record and "after" in record:
        say(general_line(record))


def _history_from(result) -> list[dict[str, Any]]:
    from rayft.trainers.loop import TRAINER_STATE

    with result.checkpoint.as_directory() as ckpt:
        return json.loads((Path(ckpt) / TRAINER_STATE).read_text())["history"]


def _printer(enabled: bool):
    import sys

    def say(text: str) -> None:
        if enabled:
            print(text, file=sys.stderr, flush=True)

    return say
