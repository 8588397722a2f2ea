"""The per-worker training loop: one linear recipe for LoRA, full and freeze fine-tuning.

Runs inside every Ray Train worker. Each worker loads the model, applies the method,
wraps it in a DeepSpeed engine (ZeRO stage and offload from the spec), streams its
shard of the tokenized dataset, evaluates, checkpoints through ``ray.train.report``
and, on rank 0, writes the final artifact into the last checkpoint's ``export/``.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from rayft.trainers.config import JobSpec

TRAINER_STATE = "trainer_state.json"
DS_TAG = "state"
EXPORT_DIR = "export"
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
    history: list[dict[str, Any]] = field(default_factory=list)


def token_loss_sums(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over labelled positions, and their count.

    Position t predicts ``labels[t + 1]``, as in Hugging Face causal LMs; ``-100`` is ignored.
    The labels are shifted rather than the logits, which avoids copying a
    ``[batch, seq, vocab]`` tensor on every step.
    """
    targets = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
    total = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(),
        targets.reshape(-1),
        ignore_index=-100,
        reduction="sum",
    )
    return total, int((targets != -100).sum())


def lr_schedule(optimizer: torch.optim.Optimizer, spec: JobSpec, total_steps: int):
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
        scheduler._last_lr = [group["lr"] for group in groups]


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
    keys = ("input_ids", "attention_mask", "position_ids", "labels")
    return {k: batch[k].to(device) for k in keys if k in batch}


def _nonempty(batch: dict[str, Any], pad_id: int) -> dict[str, Any]:
    """A batch whose samples were all dropped becomes one unlabelled pad token.

    Every worker must still run forward/backward/step in lockstep (ZeRO's collectives),
    so the batch is replaced rather than skipped; with no labels its loss is zero.
    """
    if batch["input_ids"].numel() > 0:
        return batch
    one = torch.full((1, 1), pad_id, dtype=torch.long)
    mask = torch.zeros((1, 1, 1, 1)) if batch["attention_mask"].dim() == 4 else torch.ones_like(one)
    return {
        "input_ids": one,
        "labels": torch.full_like(one, -100),
        "attention_mask": mask,
        "position_ids": torch.zeros_like(one),
    }


def _forward(engine, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    out = engine(
        input_ids=batch["input_ids"],
        attention_mask=batch.get("attention_mask"),
        position_ids=batch.get("position_ids"),
        use_cache=False,
    )
    return out.logits


def _all_sum(values: list[float]) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def _nbytes(batch: dict[str, Any]) -> int:
    return sum(t.nbytes for t in batch.values() if isinstance(t, torch.Tensor))


def evaluate(
    engine, eval_iterable, rank: int, world: int, device: torch.device, pad_id: int
) -> dict[str, float]:
    """Token-weighted eval loss and perplexity over the whole eval set, across all workers.

    Every worker sees the full eval set and takes every ``world``-th batch; workers
    with no batch left run a zero-weight forward so ZeRO-3's collective parameter
    gathers stay in lockstep.
    """
    engine.eval()
    batches = list(eval_iterable)
    rounds = math.ceil(len(batches) / world) if batches else 0
    loss_sum, count = 0.0, 0
    with torch.no_grad():
        for r in range(rounds):
            index = r * world + rank
            real = index < len(batches)
            batch = _to_device(_nonempty(batches[index if real else -1], pad_id), device)
            total, n = token_loss_sums(_forward(engine, batch), batch["labels"])
            if real:
                loss_sum += float(total)
                count += n
    engine.train()
    loss_sum, count = _all_sum([loss_sum, float(count)])
    loss = loss_sum / max(count, 1.0)
    return {
        "eval_loss": loss,
        "eval_perplexity": math.exp(min(loss, 50.0)),
        "eval_tokens": int(count),
    }


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point: ``config`` is ``{"spec": JobSpec dict, "run": run settings}``."""
    import deepspeed
    import ray.train
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rayft.trainers.data import collate_fn
    from rayft.trainers.deepspeed_config import zero_config
    from rayft.trainers.methods import param_groups, prepare_model

    spec = JobSpec.from_dict(config["spec"])
    run = config["run"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    on_gpu = torch.cuda.is_available() and run["use_gpu"]
    device = torch.device(f"cuda:{ctx.get_local_rank()}" if on_gpu else "cpu")
    torch.set_num_threads(max(1, int(spec.scaling.cpus_per_worker)))
    torch.manual_seed(spec.optim.seed)
    dtype = run["dtype"]

    tokenizer = AutoTokenizer.from_pretrained(run["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(
        run["model_dir"], dtype=getattr(torch, dtype), attn_implementation="sdpa"
    )
    model = prepare_model(model, spec)
    optimizer = torch.optim.AdamW(
        param_groups(model, spec.optim.weight_decay), lr=spec.optim.lr, betas=(0.9, 0.999)
    )
    total_steps = run["total_steps"]
    scheduler = lr_schedule(optimizer, spec, total_steps)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=zero_config(spec, world, dtype, on_gpu),
        dist_init_required=False,
    )

    state = TrainerState()
    checkpoint = ray.train.get_checkpoint() or run.get("start_from")
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            engine.load_checkpoint(ckpt_dir, tag=DS_TAG, load_module_strict=spec.method == "full")
            state = TrainerState(**json.loads((Path(ckpt_dir) / TRAINER_STATE).read_text()))
        apply_optim_settings(optimizer, scheduler, spec)
        if rank == 0:
            print(f"[rayft] resumed from step {state.step} (epoch {state.epoch})", flush=True)

    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    collate = collate_fn(pad_id, spec.data.packing)
    ray.data.DataContext.get_current().enable_progress_bars = False
    sink = _progress_sink(run) if rank == 0 else None
    writer = _tensorboard(run) if rank == 0 else None
    order_log = _order_log(run, rank, state.step)
    stop_after = run.get("stop_after_step")
    report_every_eval = bool(run.get("report_every_eval"))

    def batches(name: str, epoch: int, shuffle: bool):
        shard = ray.train.get_dataset_shard(name)
        kwargs = {}
        if shuffle:
            kwargs = {
                "local_shuffle_buffer_size": 8 * spec.optim.batch_size,
                "local_shuffle_seed": spec.optim.seed + epoch,
            }
        return shard.iter_torch_batches(
            batch_size=spec.optim.batch_size,
            collate_fn=collate,
            drop_last=False,
            **kwargs,
        )

    eval_cache: list[dict[str, Any]] = []

    def eval_batches() -> list[dict[str, Any]]:
        # A small eval set is read from Ray Data once and kept: every later evaluation
        # then skips the streaming executor's start-up (seconds per evaluation on CPU).
        if eval_cache:
            return eval_cache
        read = list(batches("eval", 0, False))
        if sum(_nbytes(b) for b in read) <= EVAL_CACHE_BYTES:
            eval_cache.extend(read)
        return read

    def run_eval() -> dict[str, float] | None:
        if not run["has_eval"]:
            return None
        metrics = evaluate(engine, eval_batches(), rank, world, device, pad_id)
        record = {"kind": "eval", "step": state.step, "total_steps": total_steps, **metrics}
        state.history.append(record)
        _emit(sink, writer, record)
        return metrics

    def save(metrics: dict[str, Any], final: bool) -> None:
        with tempfile.TemporaryDirectory(prefix="rayft-ckpt-") as tmp:
            engine.save_checkpoint(tmp, tag=DS_TAG, exclude_frozen_parameters=spec.method != "full")
            if rank == 0:
                Path(tmp, TRAINER_STATE).write_text(json.dumps(asdict(state)))
            if final:
                _export(engine, tokenizer, spec, Path(tmp) / EXPORT_DIR, rank)
            report = {
                **metrics,
                "step": state.step,
                "epoch": state.epoch,
                "tokens_seen": state.tokens_seen,
                "final": final,
            }
            ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    latest_eval: dict[str, float] = {}
    if state.step == 0 and spec.eval.at_start:
        latest_eval = run_eval() or {}
        # The untrained model is the first reference for early stopping.
        _update_early_stopping(state, latest_eval, spec)

    engine.train()
    window_loss, window_count, window_tokens = 0.0, 0.0, 0.0
    window_start = time.time()
    ckpt_every = spec.checkpoint.every_steps
    eval_every = spec.eval.every_steps
    done = state.step >= total_steps
    while not done:
        skip = state.batches_in_epoch
        micro = 0
        for index, batch in enumerate(batches("train", state.epoch, spec.data.shuffle)):
            if index < skip:
                continue
            tensors = _to_device(_nonempty(batch, pad_id), device)
            logits = _forward(engine, tensors)
            total, n = token_loss_sums(logits, tensors["labels"])
            loss = total / max(n, 1)
            engine.backward(loss)
            steps_before = engine.global_steps
            engine.step()
            state.batches_in_epoch = index + 1
            window_loss += float(total.detach())
            window_count += n
            window_tokens += int(batch["num_tokens"])
            state.tokens_seen += int(batch["num_tokens"])
            micro += 1
            if order_log is not None:
                order_log.write(
                    json.dumps(
                        {"step": state.step + 1, "micro": micro, "samples": batch["sample_ids"]}
                    )
                    + "\n"
                )
            if engine.global_steps == steps_before:
                continue  # inside a gradient-accumulation window
            state.step += 1
            if state.step % spec.logging.every_steps == 0 or state.step == total_steps:
                loss_sum, count, tokens = _all_sum([window_loss, window_count, window_tokens])
                elapsed = max(time.time() - window_start, 1e-9)
                record = {
                    "kind": "train",
                    "step": state.step,
                    "total_steps": total_steps,
                    "epoch": state.epoch,
                    "loss": loss_sum / max(count, 1.0),
                    "lr": scheduler.get_last_lr()[0],
                    "tokens_per_s": tokens / elapsed,
                    "tokens_seen": state.tokens_seen * world,
                }
                state.history.append(record)
                _emit(sink, writer, record)
                window_loss, window_count, window_tokens = 0.0, 0.0, 0.0
                window_start = time.time()
            stop_early = False
            if eval_every and state.step % eval_every == 0 and state.step < total_steps:
                latest_eval = run_eval() or latest_eval
                stop_early = _update_early_stopping(state, latest_eval, spec)
                at_checkpoint = bool(ckpt_every) and state.step % ckpt_every == 0
                if report_every_eval and latest_eval and not at_checkpoint and not stop_early:
                    # Sweeps: a Tune scheduler decides at every evaluation, not only at
                    # checkpoints (whose own report already carries this evaluation).
                    ray.train.report(
                        {
                            **latest_eval,
                            "step": state.step,
                            "epoch": state.epoch,
                            "tokens_seen": state.tokens_seen,
                            "final": False,
                        }
                    )
            done = state.step >= total_steps or stop_early
            if done:
                state.stopped_early = stop_early
                break
            if ckpt_every and state.step % ckpt_every == 0:
                save({**latest_eval}, final=False)
                if stop_after is not None and state.step >= stop_after:
                    raise InterruptedRun(state.step)
        else:
            state.epoch += 1
            state.batches_in_epoch = 0
    if not state.stopped_early or not latest_eval:
        final_eval = run_eval()
        latest_eval = final_eval or latest_eval
    state.finished = True
    if order_log is not None:
        order_log.close()
    if writer is not None:
        writer.close()
    save({**latest_eval}, final=True)


class InterruptedRun(RuntimeError):
    """Raised after the checkpoint at ``RAYFT_STOP_AFTER_STEP``: a deliberate, resumable stop."""

    def __init__(self, step: int) -> None:
        super().__init__(f"run interrupted after checkpointing step {step} (RAYFT_STOP_AFTER_STEP)")


def _update_early_stopping(state: TrainerState, metrics: dict[str, float], spec: JobSpec) -> bool:
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


def _export(engine, tokenizer, spec: JobSpec, out: Path, rank: int) -> None:
    """Write the final artifact (PEFT adapter or HF model) on rank 0, gathering ZeRO-3 shards."""
    module = engine.module
    if spec.deepspeed.zero_stage == 3:
        # Collective: every rank takes part in gathering the partitioned weights.
        state_dict = engine._zero3_consolidated_16bit_state_dict()
    else:
        state_dict = None
    if rank != 0:
        return
    out.mkdir(parents=True, exist_ok=True)
    if spec.method == "lora":
        if state_dict is not None:
            from peft import get_peft_model_state_dict

            adapter = get_peft_model_state_dict(module, state_dict=state_dict)
            module.save_pretrained(out, state_dict=adapter, safe_serialization=True)
        else:
            module.save_pretrained(out, safe_serialization=True)
    else:
        module.save_pretrained(out, state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _emit(sink, writer, record: dict[str, Any]) -> None:
    if sink is not None:
        sink.push.remote(record)
    if writer is not None:
        prefix = "eval" if record["kind"] == "eval" else "train"
        for key, value in record.items():
            if isinstance(value, (int, float)) and key not in ("step", "total_steps", "epoch"):
                tag = key if key.startswith("eval_") else f"{prefix}/{key}"
                writer.add_scalar(tag.replace("eval_", "eval/"), value, record["step"])
        writer.flush()


def _progress_sink(run: dict[str, Any]):
    import ray

    try:
        return ray.get_actor(run["progress_actor"]) if run.get("progress_actor") else None
    except ValueError:
        return None


def _tensorboard(run: dict[str, Any]):
    if not run.get("local_run_dir"):
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=os.path.join(run["local_run_dir"], "tensorboard"))


def _order_log(run: dict[str, Any], rank: int, resumed_step: int):
    """Per-rank log of which samples fed which step; entries past a resume point are dropped."""
    if not run.get("local_run_dir"):
        return None
    path = Path(run["local_run_dir"], "data_order", f"rank{rank}.jsonl")
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
