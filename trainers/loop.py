"""The per-worker training loop: one linear recipe for LoRA, full and freeze fine-tuning.

Runs inside every Ray Train worker and reads top to bottom:

1. :func:`setup`: load the model, apply the method, wrap it in a DeepSpeed engine
   (ZeRO stage and offload from the spec);
2. :func:`restore`: continue from the run's newest verified checkpoint, if any;
3. :func:`train`: stream the worker's shard, one :func:`train_step` per micro-batch,
   logging, :func:`evaluate` and :func:`save_checkpoint` on their schedules;
4. the final evaluation and the final checkpoint, whose ``export/`` holds the
   artifact (:func:`export`, rank 0).

What a run needs beyond the job spec comes in a frozen :class:`WorkerInputs`, built once
by the driver. Behaviour that only some runs want (reporting every evaluation to a Tune
scheduler, stopping deliberately after a checkpoint) is a :class:`LoopCallback`.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch

from rayft.trainers.collectives import all_sum
from rayft.trainers.compat import (
    set_scheduler_last_lr,
    skip_deepspeed_shm_op,
    zero3_full_state_dict,
)
from rayft.trainers.config import ADAPTER_METHODS, JobSpec
from rayft.trainers.loss import IGNORE_INDEX
from rayft.trainers.objective import Objective
from rayft.trainers.objectives import objective_for
from rayft.trainers.records import pause_pending
from rayft.trainers.storage import StorageRoot

TRAINER_STATE = "trainer_state.json"
DS_TAG = "state"
EXPORT_DIR = "export"
SERVABLE_FILE = "servable.json"
"""In the final checkpoint, next to ``export/``: the servability check's outcome there
(``{"ok": true}`` or ``{"ok": false, "error": ...}``), made on rank 0 at export."""
# Eval sets up to this size (collated tensors, per worker) are kept in memory after the first pass.
EVAL_CACHE_BYTES = 256 * 1024 * 1024


@dataclass
class TrainerState:
    """Where the loop stands; saved with every checkpoint so a resume continues exactly."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    tokens_seen: int = 0
    best_eval_loss: float | None = None
    evals_without_improvement: int = 0
    finished: bool = False
    stopped_early: bool = False
    paused: bool = False
    """A pause ended the run after its checkpoint; set once that checkpoint was saved, so no
    checkpoint holds ``true`` and a resumed run goes on."""
    history: list[dict[str, Any]] = field(default_factory=list)
    general: dict[str, Any] | None = None
    """``eval.general``: the untrained model's scores, then ``trainers.generation_eval.general_record``."""


class LoopCallback:
    """Hooks into the training loop, run on every worker (so they are pickled to each).

    Subclass and override what you need; every hook runs on all ranks in lockstep, so a
    hook may call collective APIs such as ``ray.train.report``.
    """

    def on_eval(
        self, state: TrainerState, metrics: dict[str, float], checkpoint_follows: bool
    ) -> None:
        """After an evaluation (its record is already in ``state.history``).

        Args:
            state: The loop's state at the evaluated step.
            metrics: ``eval_loss``, ``eval_perplexity``, ``eval_tokens``.
            checkpoint_follows: A checkpoint report carrying these metrics comes next
                (a periodic checkpoint at this step, an early stop, or the end of the run).
        """

    def on_checkpoint(self, state: TrainerState) -> None:
        """After a periodic (not the final) checkpoint was reported to Ray Train."""

    def on_train_end(self, state: TrainerState) -> None:
        """After the final checkpoint (with the exported artifact) was reported."""

    def pause_requested(self, state: TrainerState) -> bool:
        """After every optimizer step: whether to checkpoint now and end the run there.

        A paused run skips its final evaluation and export; its last report carries
        ``paused: true`` and it resumes from that checkpoint (``run_training(resume=True)``).
        Every worker must answer alike (decide with a collective such as ``all_sum``).
        """
        return False


class ReportEveryEval(LoopCallback):
    """Reports every periodic evaluation to Ray Train, so a Tune scheduler decides there.

    Checkpoint reports already carry the evaluation of their step, and the untrained
    model's evaluation (step 0) is no result for a scheduler.
    """

    def on_eval(
        self, state: TrainerState, metrics: dict[str, float], checkpoint_follows: bool
    ) -> None:
        import ray.train

        if state.step == 0 or checkpoint_follows:
            return
        ray.train.report({**metrics, **_position(state), "final": False})


class PauseOnRequest(LoopCallback):
    """Pauses the run once ``trainers.records.request_pause`` asked it to (a job's pause).

    Rank 0 looks for the request at most every ``poll_s`` seconds (one storage read, not
    one per step on every worker); ``all_sum`` gives its answer to every worker, so all
    checkpoint and stop after the same step.
    """

    def __init__(self, root: StorageRoot, run_id: str, poll_s: float = 1.0) -> None:
        self.root = root
        self.run_id = run_id
        self.poll_s = poll_s
        self._next_poll = 0.0

    def pause_requested(self, state: TrainerState) -> bool:
        import ray.train

        asked = 0.0
        now = time.monotonic()
        if ray.train.get_context().get_world_rank() == 0 and now >= self._next_poll:
            self._next_poll = now + self.poll_s
            asked = float(pause_pending(self.root, self.run_id))
        return all_sum([asked])[0] > 0


class InterruptedRun(RuntimeError):
    """A deliberate stop after a checkpoint; the run resumes from that checkpoint."""

    def __init__(self, step: int) -> None:
        super().__init__(f"run interrupted after checkpointing step {step}")
        self.step = step


@dataclass(frozen=True)
class WorkerInputs:
    """What every worker needs besides the job spec; built once by the driver.

    Attributes:
        model_dir: Local HF directory of the base model.
        dtype: Resolved compute dtype (``float32``, ``bfloat16``, ``float16``).
        use_gpu: Whether workers were given GPUs.
        total_steps: Optimizer steps the run takes.
        has_eval: Whether an ``eval`` dataset shard exists.
        progress_actor: Name of the driver's ``ProgressSink`` actor (rank 0 pushes records).
        local_run_dir: The run's directory on a local root (TensorBoard, data order logs);
            ``None`` for a URI root.
        start_from: A ``ray.train.Checkpoint`` of another run, used when this run has none
            of its own yet (Train V2 has no ``resume_from_checkpoint``).
        callbacks: :class:`LoopCallback` objects, called in order.
        parent_adapter: The published adapter a LoRA run continues (``model.adapter``),
            a ``trainers.lineage.ParentAdapter`` checked by the driver.
    """

    model_dir: str
    dtype: str
    use_gpu: bool
    total_steps: int
    has_eval: bool
    progress_actor: str | None = None
    local_run_dir: str | None = None
    start_from: Any = None
    callbacks: tuple[LoopCallback, ...] = ()
    parent_adapter: Any = None
    general: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...] = ()
    """``eval.general``'s tokenized rows, ``(input_ids, labels)`` pairs."""
    rollouts: Any = None
    """Starts and finds the rollout engines of an objective that samples its own training
    data (``trainers.rollout.RolloutEngines``; GRPO)."""
    tables: dict[str, Any] = field(default_factory=dict)
    """Object refs of the ``train`` and ``eval`` tables prepared in the driver
    (``data.prepare``), iterated by ``trainers.shards``; empty when Ray Train gives the
    workers Ray Datasets."""


@dataclass
class Worker:
    """The pieces :func:`setup` builds for one worker, passed to every later stage."""

    spec: JobSpec
    inputs: WorkerInputs
    rank: int
    world: int
    device: torch.device
    engine: Any
    objective: Objective
    optimizer: Any
    scheduler: Any
    tokenizer: Any
    pad_id: int
    collate: Any
    sink: Any = None
    writer: Any = None
    eval_cache: list[dict[str, Any]] = field(default_factory=list)


# --------------------------------------------------------------------------- the recipe


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point: ``config`` is ``{"spec": JobSpec dict, "inputs": WorkerInputs}``."""
    spec = JobSpec.from_dict(config["spec"])
    inputs: WorkerInputs = config["inputs"]
    worker = setup(spec, inputs)
    state = restore(worker)
    order_log = open_order_log(inputs.local_run_dir, worker.rank, state.step)
    latest_eval: dict[str, float] = {}
    if state.step == 0 and inputs.general:
        from rayft.trainers.generation_eval import general_scores

        state.general = {"before": general_scores(worker)}
    if state.step == 0 and spec.eval.at_start:
        latest_eval = run_eval(worker, state, checkpoint_follows=False)
        # The untrained model is the first reference for early stopping.
        update_early_stopping(state, latest_eval, spec)
    latest_eval = train(worker, state, order_log, latest_eval)
    if state.paused:
        _close(worker, order_log)
        return
    if not state.stopped_early or not latest_eval:
        latest_eval = run_eval(worker, state, checkpoint_follows=True) or latest_eval
    if inputs.general and state.general is not None and "after" not in state.general:
        from rayft.trainers.generation_eval import general_record, general_scores

        state.general = general_record(
            spec.eval.general, len(inputs.general), state.general["before"], general_scores(worker)
        )
    state.finished = True
    _close(worker, order_log)
    save_checkpoint(worker, state, latest_eval, final=True)
    for callback in inputs.callbacks:
        callback.on_train_end(state)


def _close(worker: Worker, order_log: TextIO | None) -> None:
    if order_log is not None:
        order_log.close()
    if worker.writer is not None:
        worker.writer.close()


def setup(spec: JobSpec, inputs: WorkerInputs) -> Worker:
    """Load the model and tokenizer, apply the method and build the DeepSpeed engine."""
    import deepspeed
    import ray.train
    from transformers import AutoTokenizer

    from rayft.trainers.deepspeed_config import zero_config
    from rayft.trainers.methods import param_groups, prepare_model

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    on_gpu = torch.cuda.is_available() and inputs.use_gpu
    device = torch.device(f"cuda:{ctx.get_local_rank()}" if on_gpu else "cpu")
    torch.set_num_threads(max(1, int(spec.scaling.cpus_per_worker)))
    torch.manual_seed(spec.optim.seed)

    tokenizer = AutoTokenizer.from_pretrained(inputs.model_dir)
    objective = objective_for(spec)
    model = prepare_model(
        objective.load_model(spec, inputs), spec, inputs.parent_adapter, objective
    )
    optimizer = torch.optim.AdamW(
        param_groups(model, spec.optim.weight_decay), lr=spec.optim.lr, betas=(0.9, 0.999)
    )
    scheduler = lr_schedule(optimizer, spec, inputs.total_steps)
    skip_deepspeed_shm_op()  # an inference-only op; compiling it would delay the first run
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=zero_config(spec, world, inputs.dtype, on_gpu),
        dist_init_required=False,
    )
    if spec.model.compile:
        engine.compile()  # the module in place: its state dict keeps its keys
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    ray.data.DataContext.get_current().enable_progress_bars = False
    worker = Worker(
        spec=spec,
        inputs=inputs,
        rank=rank,
        world=world,
        device=device,
        engine=engine,
        objective=objective,
        optimizer=optimizer,
        scheduler=scheduler,
        tokenizer=tokenizer,
        pad_id=pad_id,
        collate=objective.collate(pad_id, spec),
        sink=progress_sink(inputs.progress_actor) if rank == 0 else None,
        writer=tensorboard(inputs.local_run_dir) if rank == 0 else None,
    )
    objective.prepare(worker)
    return worker


def restore(worker: Worker) -> TrainerState:
    """Load the newest verified checkpoint into the engine; a fresh state if there is none.

    The candidates are the run's checkpoints in storage, newest first (or ``start_from``
    and older ones beside it, for a run that has none yet; see
    ``trainers.checkpoints.resume_candidates``). Each is verified against its manifests
    on every worker; the first that verifies everywhere is loaded, and every newer one
    is reported as refused.

    Raises:
        RuntimeError: Checkpoints exist but none verifies.
    """
    import ray.train

    from rayft.trainers.checkpoints import checkpoint_name, resume_candidates, verify_checkpoint

    registered = ray.train.get_checkpoint()
    candidates = resume_candidates(registered, worker.inputs.start_from, _run_storage())
    state, refused = None, []
    for candidate in candidates:
        with candidate.as_directory() as ckpt_dir:
            problems = verify_checkpoint(ckpt_dir)
            # Every worker must load the same checkpoint: one refusal anywhere refuses it.
            if all_sum([1.0 if problems else 0.0])[0] == 0:
                state = load_checkpoint(worker, Path(ckpt_dir))
                break
        problems = problems or ["another worker could not verify it"]
        refused.append(checkpoint_name(candidate))
        notify(
            worker, {"kind": "checkpoint_refused", "checkpoint": refused[-1], "problems": problems}
        )
    if candidates and state is None:
        raise RuntimeError(
            f"no checkpoint of this run verifies (refused: {', '.join(refused)}); start a new "
            "run, or restore the checkpoint files from a copy"
        )
    state = state or TrainerState()
    notify(worker, {"kind": "worker_start", "step": state.step})
    return state


def _run_storage() -> tuple[Any, str] | None:
    """This run's ``(pyarrow filesystem, directory)`` in Ray Train's storage, if it says."""
    import ray.train

    try:
        storage = ray.train.get_context().get_storage()
        return storage.storage_filesystem, storage.experiment_fs_path
    except (AttributeError, NotImplementedError):
        return None


def load_checkpoint(worker: Worker, ckpt_dir: Path) -> TrainerState:
    """Load a verified checkpoint directory into the engine and return its trainer state."""
    spec = worker.spec
    worker.engine.load_checkpoint(ckpt_dir, tag=DS_TAG, load_module_strict=spec.method == "full")
    state = TrainerState(**json.loads((ckpt_dir / TRAINER_STATE).read_text()))
    apply_optim_settings(worker.optimizer, worker.scheduler, spec)
    if worker.rank == 0:
        from rayft.trainers.progress import message_record

        line = f"[rayft] resumed from step {state.step} (epoch {state.epoch})"
        if worker.sink is not None:  # the driver prints it; worker output stays in Ray's logs
            worker.sink.push.remote(message_record(line))
        else:
            print(line, flush=True)
    return state


def train(
    worker: Worker, state: TrainerState, order_log: TextIO | None, latest_eval: dict[str, float]
) -> dict[str, float]:
    """Run optimizer steps until ``total_steps`` or an early stop; the latest eval metrics."""
    total_steps = worker.inputs.total_steps
    window = LogWindow()
    worker.engine.train()
    while state.step < total_steps:
        window.micro = 0
        for batch in train_batches(worker, state):
            # The data position counts batches of the data, however many passes each feeds
            # (``Objective.expand``): a resumed run starts at the next unused batch.
            state.batches_in_epoch += 1
            for part in worker.objective.expand(worker, batch):
                if not train_step(worker, state, part, window, order_log):
                    continue  # inside a gradient-accumulation window
                log_step(worker, state, window)
                latest_eval, stop_early = periodic_eval(worker, state, latest_eval)
                if state.step >= total_steps or stop_early:
                    state.stopped_early = stop_early
                    return latest_eval
                # Every callback is asked on every worker: each may decide collectively.
                pause = any([c.pause_requested(state) for c in worker.inputs.callbacks])
                if pause or _due(state.step, worker.spec.checkpoint.every_steps):
                    save_checkpoint(worker, state, latest_eval, final=False, paused=pause)
                    for callback in worker.inputs.callbacks:
                        callback.on_checkpoint(state)
                if pause:
                    state.paused = True
                    return latest_eval
        if state.batches_in_epoch == 0:
            # An empty shard would otherwise start epoch after epoch forever.
            raise NoTrainingDataError(
                f"worker {worker.rank}'s shard of the training data held no batch in epoch "
                f"{state.epoch}: every one of the {worker.world} workers needs at least one "
                "row; lower scaling.num_workers, or add rows / raise data.max_seq_len so "
                "more rows keep a label"
            )
        state.epoch += 1
        state.batches_in_epoch = 0
    return latest_eval


class NoTrainingDataError(RuntimeError):
    """A training step or epoch with nothing to learn from: no label token on any worker,
    or a worker whose shard is empty. ``trainers.data.check_trainable`` refuses such data
    before Ray starts; this guards the loop should any get through."""


def check_step_labels(worker: Worker, state: TrainerState, window: LogWindow) -> None:
    """Fail the run when the optimizer step just taken had no label token on any worker.

    Collective: every worker calls it after each optimizer step.
    """
    labels = all_sum([window.step_labels])[0]
    window.step_labels = 0.0
    if labels == 0:
        raise NoTrainingDataError(
            f"optimizer step {state.step} trained on zero label tokens across all "
            f"{worker.world} workers (every sample of its batches was dropped or has no "
            "label); check data.max_seq_len against the rows' length"
        )


def train_step(
    worker: Worker,
    state: TrainerState,
    batch: dict[str, Any],
    window: LogWindow,
    order_log: TextIO | None,
) -> bool:
    """Forward, backward and DeepSpeed step on one micro-batch; True when the optimizer stepped."""
    engine = worker.engine
    tensors = to_device(nonempty(batch, worker.pad_id), worker.device)
    total, count = worker.objective.train_loss(worker, tensors)
    engine.backward(total / max(count, 1))
    steps_before = engine.global_steps
    engine.step()
    state.tokens_seen += int(batch["num_tokens"])
    window.add(float(total.detach()), count, int(batch["num_tokens"]))
    window.step_labels += count
    window.micro += 1
    if order_log is not None:
        entry = {"step": state.step + 1, "micro": window.micro, "samples": batch["sample_ids"]}
        order_log.write(json.dumps(entry) + "\n")
    if engine.global_steps == steps_before:
        return False
    state.step += 1
    check_step_labels(worker, state, window)
    return True


def periodic_eval(
    worker: Worker, state: TrainerState, latest_eval: dict[str, float]
) -> tuple[dict[str, float], bool]:
    """Evaluate when ``eval.every_steps`` says so; the latest metrics and whether to stop early."""
    spec, total_steps = worker.spec, worker.inputs.total_steps
    if not _due(state.step, spec.eval.every_steps) or state.step >= total_steps:
        return latest_eval, False
    metrics = evaluate(worker)
    if not metrics:
        return latest_eval, False
    stop_early = update_early_stopping(state, metrics, spec)
    at_checkpoint = _due(state.step, spec.checkpoint.every_steps)
    _record_eval(worker, state, metrics, checkpoint_follows=at_checkpoint or stop_early)
    return metrics, stop_early


def run_eval(worker: Worker, state: TrainerState, checkpoint_follows: bool) -> dict[str, float]:
    """Evaluate now and record it; ``{}`` when the run has no eval set."""
    metrics = evaluate(worker)
    if metrics:
        _record_eval(worker, state, metrics, checkpoint_follows)
    return metrics


def evaluate(worker: Worker) -> dict[str, float]:
    """The objective's metrics over the whole eval set, across all workers.

    For supervised fine-tuning: token-weighted eval loss and perplexity. Every worker
    sees the full eval set and takes every ``world``-th batch; workers with no batch left
    run a forward whose result is dropped, so ZeRO-3's collective parameter gathers stay
    in lockstep. ``{}`` when the run has no eval set.
    """
    if not worker.inputs.has_eval:
        return {}
    engine, rank, world, objective = worker.engine, worker.rank, worker.world, worker.objective
    batches = eval_batches(worker)
    rounds = math.ceil(len(batches) / world) if batches else 0
    sums = dict.fromkeys(objective.eval_keys, 0.0)
    engine.eval()
    with torch.no_grad():
        for r in range(rounds):
            index = r * world + rank
            real = index < len(batches)
            batch = to_device(
                nonempty(batches[index if real else -1], worker.pad_id), worker.device
            )
            part = objective.eval_sums(worker, batch)
            if real:
                for key in objective.eval_keys:
                    sums[key] += part[key]
    engine.train()
    totals = all_sum([sums[key] for key in objective.eval_keys])
    metrics = objective.eval_metrics(dict(zip(objective.eval_keys, totals, strict=True)))
    if worker.spec.eval.metrics:
        from rayft.trainers.generation_eval import generation_scores

        metrics.update(generation_scores(worker, batches))
    return metrics


def save_checkpoint(
    worker: Worker,
    state: TrainerState,
    metrics: dict[str, Any],
    final: bool,
    paused: bool = False,
) -> None:
    """Save engine state and trainer state and report them to Ray Train (all ranks).

    The final checkpoint also holds the exported artifact in ``export/``; a pause's report
    says ``paused: true`` (the run ends there without one).
    """
    import ray.train

    from rayft.trainers.checkpoints import write_manifest

    engine, spec = worker.engine, worker.spec
    with tempfile.TemporaryDirectory(prefix="rayft-ckpt-") as tmp:
        engine.save_checkpoint(tmp, tag=DS_TAG, exclude_frozen_parameters=spec.method != "full")
        if worker.rank == 0:
            Path(tmp, TRAINER_STATE).write_text(json.dumps(asdict(state)))
        if final:
            export(worker, Path(tmp) / EXPORT_DIR)
        write_manifest(tmp, worker.rank, worker.world, state.step)  # last: it vouches for the rest
        report = {**metrics, **_position(state), "final": final}
        if paused:
            report["paused"] = True
        ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def export(worker: Worker, out: Path) -> None:
    """Write the final artifact (PEFT adapter or HF model) on rank 0, gathering ZeRO-3 shards."""
    engine, spec = worker.engine, worker.spec
    module = engine.module
    if spec.deepspeed.zero_stage == 3:
        # Collective: every rank takes part in gathering the partitioned weights.
        state_dict = zero3_full_state_dict(engine)
    else:
        state_dict = None
    if worker.rank != 0:
        return
    out.mkdir(parents=True, exist_ok=True)
    if spec.method in ADAPTER_METHODS:
        if state_dict is not None:
            from peft import get_peft_model_state_dict

            adapter = get_peft_model_state_dict(module, state_dict=state_dict)
            module.save_pretrained(
                out, state_dict=adapter, safe_serialization=True, selected_adapters=["default"]
            )
        else:
            # Only the trained adapter (an objective's frozen reference adapter stays out).
            module.save_pretrained(out, safe_serialization=True, selected_adapters=["default"])
    else:
        module.save_pretrained(out, state_dict=state_dict, safe_serialization=True)
    worker.tokenizer.save_pretrained(out)
    check_export(out, spec, Path(worker.inputs.model_dir))


def check_export(out: Path, spec: JobSpec, model_dir: Path) -> None:
    """Check the export serves, here where its weights are, and note the outcome beside it
    (``SERVABLE_FILE``): publishing reads the note and loads nothing again. A failed check
    fails no run (Train would retry it); publishing refuses the artifact, saying why."""
    from rayft.trainers.servable import UnservableError, check_servable

    kind = "adapter" if spec.method in ADAPTER_METHODS else "model"
    try:
        check_servable(out, kind, model_dir if kind == "adapter" else None)
        outcome: dict[str, Any] = {"ok": True}
    except UnservableError as err:
        outcome = {"ok": False, "error": str(err)}
    (out.parent / SERVABLE_FILE).write_text(json.dumps(outcome))


# --------------------------------------------------------------------------- the pieces


@dataclass
class LogWindow:
    """Loss, label and token sums since the last logged step (this worker's share)."""

    loss_sum: float = 0.0
    count: float = 0.0
    tokens: float = 0.0
    start: float = field(default_factory=time.time)
    micro: int = 0
    """Micro-batches trained in this pass over the epoch (numbers the data order log)."""
    step_labels: float = 0.0
    """Label count of the optimizer step in progress (``check_step_labels``)."""

    def add(self, loss_sum: float, count: int, tokens: int) -> None:
        self.loss_sum += loss_sum
        self.count += count
        self.tokens += tokens

    def reset(self) -> None:
        self.loss_sum, self.count, self.tokens = 0.0, 0.0, 0.0
        self.start = time.time()


def log_step(worker: Worker, state: TrainerState, window: LogWindow) -> None:
    """A ``train`` record every ``logging.every_steps`` steps and at the last one (all ranks)."""
    total_steps = worker.inputs.total_steps
    if state.step % worker.spec.logging.every_steps and state.step != total_steps:
        return
    loss_sum, count, tokens = all_sum([window.loss_sum, window.count, window.tokens])
    record = {
        "kind": "train",
        "step": state.step,
        "total_steps": total_steps,
        "epoch": state.epoch,
        "loss": loss_sum / max(count, 1.0),
        "lr": worker.scheduler.get_last_lr()[0],
        "tokens_per_s": tokens / max(time.time() - window.start, 1e-9),
        "tokens_seen": state.tokens_seen * worker.world,
        **worker.objective.log_fields(worker),
    }
    state.history.append(record)
    emit(worker, record)
    window.reset()


def train_batches(worker: Worker, state: TrainerState) -> Iterator[dict[str, Any]]:
    """This epoch's training batches, skipping those a resumed run already trained on."""
    skip = state.batches_in_epoch
    for index, batch in enumerate(shard_batches(worker, "train", state.epoch, True)):
        if index >= skip:
            yield batch


def shard_batches(worker: Worker, name: str, epoch: int, train: bool):
    """Collated batches of this worker's shard of dataset ``name``."""
    import ray.train

    spec = worker.spec
    if name in worker.inputs.tables:
        return _table_batches(worker, name, epoch, train)
    kwargs = {}
    if train and spec.data.shuffle:
        kwargs = {
            "local_shuffle_buffer_size": 8 * spec.optim.batch_size,
            "local_shuffle_seed": spec.optim.seed + epoch,
        }
    return ray.train.get_dataset_shard(name).iter_torch_batches(
        batch_size=spec.optim.batch_size, collate_fn=worker.collate, drop_last=False, **kwargs
    )


def _table_batches(worker: Worker, name: str, epoch: int, train: bool) -> Iterator[Any]:
    """``shard_batches`` of a table prepared in the driver (``trainers.shards``)."""
    import ray

    from rayft.trainers.shards import equal_share, table_batches

    spec = worker.spec
    table = ray.get(worker.inputs.tables[name])
    seed = None
    if train:
        start, stop = equal_share(table.num_rows, worker.rank, worker.world)
        table = table.slice(start, stop - start)
        seed = spec.optim.seed + epoch if spec.data.shuffle else None
    return table_batches(table, spec.optim.batch_size, worker.collate, seed)


def eval_batches(worker: Worker) -> list[dict[str, Any]]:
    """The eval set's batches; a small one is read from Ray Data once and kept.

    Every later evaluation then skips the streaming executor's start-up (seconds per
    evaluation on CPU).
    """
    if worker.eval_cache:
        return worker.eval_cache
    read = list(shard_batches(worker, "eval", 0, False))
    if sum(_nbytes(b) for b in read) <= EVAL_CACHE_BYTES:
        worker.eval_cache.extend(read)
    return read


def lr_schedule(optimizer: torch.optim.Optimizer, spec: JobSpec, total_steps: int):
    """The spec's LR schedule over ``total_steps`` (``constant`` keeps a warmup, as HF's)."""
    from transformers import get_scheduler

    name = "constant_with_warmup" if spec.optim.scheduler == "constant" else spec.optim.scheduler
    warmup = int(math.ceil(spec.optim.warmup_ratio * total_steps))
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def apply_optim_settings(optimizer: Any, scheduler: Any, spec: JobSpec) -> None:
    """Put the spec's learning rate and weight decay on optimizer state loaded from a checkpoint.

    A checkpoint brings back the hyperparameters it was saved with. Resuming the same run
    changes nothing here; a population-based-training exploit continues another trial's
    weights and optimizer moments under this trial's (mutated) settings, at the same
    point of the schedule.
    """
    groups = optimizer.param_groups
    for index, group in enumerate(groups):
        group["initial_lr"] = spec.optim.lr
        if index == 0:  # the decay group (trainers.methods.param_groups)
            group["weight_decay"] = spec.optim.weight_decay
    if scheduler is not None and hasattr(scheduler, "lr_lambdas"):
        scheduler.base_lrs = [spec.optim.lr] * len(groups)
        for group, fn in zip(groups, scheduler.lr_lambdas, strict=True):
            group["lr"] = spec.optim.lr * fn(scheduler.last_epoch)
        set_scheduler_last_lr(scheduler, [group["lr"] for group in groups])


def update_early_stopping(state: TrainerState, metrics: dict[str, float], spec: JobSpec) -> bool:
    """Track the best eval loss; True once ``eval.early_stopping_patience`` evals brought none."""
    loss = metrics.get("eval_loss")
    if loss is None:
        return False
    if state.best_eval_loss is None or loss < state.best_eval_loss:
        state.best_eval_loss = loss
        state.evals_without_improvement = 0
    else:
        state.evals_without_improvement += 1
    patience = spec.eval.early_stopping_patience
    return patience is not None and state.evals_without_improvement >= patience


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """A collated batch with its tensors (model inputs, labels, objective extras) on
    ``device``; its other values (counts, ids, an objective's own) as they are."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def nonempty(batch: dict[str, Any], pad_id: int) -> dict[str, Any]:
    """A batch whose samples were all dropped becomes one unlabelled pad token.

    Every worker must still run forward/backward/step in lockstep (ZeRO's collectives),
    so the batch is replaced rather than skipped; with no labels its loss is zero.
    """
    if "input_ids" not in batch or batch["input_ids"].numel() > 0:
        return batch  # tokens, or an objective's own batch (prompts that expand samples)
    one = torch.full((1, 1), pad_id, dtype=torch.long)
    mask = torch.zeros((1, 1, 1, 1)) if batch["attention_mask"].dim() == 4 else torch.ones_like(one)
    return {
        "input_ids": one,
        "labels": torch.full_like(one, IGNORE_INDEX),
        "attention_mask": mask,
        "position_ids": torch.zeros_like(one),
    }


def emit(worker: Worker, record: dict[str, Any]) -> None:
    """Send a metric record to the driver's progress sink and TensorBoard (rank 0 holds both)."""
    if worker.sink is not None:
        worker.sink.push.remote(record)
    writer = worker.writer
    if writer is not None:
        prefix = "eval" if record["kind"] == "eval" else "train"
        for key, value in record.items():
            if isinstance(value, (int, float)) and key not in ("step", "total_steps", "epoch"):
                tag = key if key.startswith("eval_") else f"{prefix}/{key}"
                writer.add_scalar(tag.replace("eval_", "eval/"), value, record["step"])
        writer.flush()


def notify(worker: Worker, record: dict[str, Any]) -> None:
    """Tell the driver something it prints (``trainers.restarts``): rank 0 only."""
    if worker.rank != 0:
        return
    if worker.sink is not None:
        worker.sink.push.remote(record)
    elif record.get("kind") == "checkpoint_refused":
        from rayft.trainers.restarts import refusal_line

        print(refusal_line(record), flush=True)


def progress_sink(name: str | None):
    """The driver's ``ProgressSink`` actor, or ``None`` (no driver listening)."""
    import ray

    try:
        return ray.get_actor(name) if name else None
    except ValueError:
        return None


def tensorboard(local_run_dir: str | None):
    """A TensorBoard writer in ``<run>/tensorboard``, or ``None`` for a URI root."""
    if not local_run_dir:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=os.path.join(local_run_dir, "tensorboard"))


def open_order_log(local_run_dir: str | None, rank: int, resumed_step: int) -> TextIO | None:
    """Per-rank log of which samples fed which step; entries past a resume point are dropped."""
    if not local_run_dir:
        return None
    path = Path(local_run_dir, "data_order", f"rank{rank}.jsonl")
    path.parent.mkdir(parents=True, exist_ok=True)
    kept = []
    if path.exists():
        kept = [
            ln
            for ln in path.read_text().splitlines()
            if ln and json.loads(ln)["step"] <= resumed_step
        ]
    # Line-buffered: an interrupted run keeps every step it logged.
    handle = open(path, "w", buffering=1)  # noqa: SIM115 - closed at the end of the loop
    handle.writelines(line + "\n" for line in kept)
    handle.flush()
    return handle


def _record_eval(
    worker: Worker, state: TrainerState, metrics: dict[str, float], checkpoint_follows: bool
) -> None:
    record = {"kind": "eval", "step": state.step, "total_steps": worker.inputs.total_steps}
    record.update(metrics)
    state.history.append(record)
    emit(worker, record)
    for callback in worker.inputs.callbacks:
        callback.on_eval(state, metrics, checkpoint_follows)


def _position(state: TrainerState) -> dict[str, int]:
    return {"step": state.step, "epoch": state.epoch, "tokens_seen": state.tokens_seen}


def _due(step: int, every: int | None) -> bool:
    return bool(every) and step % every == 0


def _nbytes(batch: dict[str, Any]) -> int:
    return sum(t.nbytes for t in batch.values() if isinstance(t, torch.Tensor))
