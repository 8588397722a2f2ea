"""Training throughput and peak memory: rayft LoRA fine-tuning against TRL and HF Trainer.

    RAYFT_HOME=/tmp/rfhome .venv/bin/python bench/train_throughput.py [--tokens 24000]
        [--max-seq-len 512] [--batch-size 4] [--workers 1] [--skip-peers | --skip-trl]
        [--gradient-checkpointing {default,false,true,selective}]
        [--allocator {default,auto,system,jemalloc}] [--peers-allocator {system,rayft}]
        [--json OUT]

Fine-tunes ``smollm2-135m-instruct`` on the same rows of ``bench/data/chat_varlen.jsonl``
(variable-length chats, 38-381 tokens) four ways, one after another on this machine:

  (a) rayft: ``run_training`` on the embedded local Ray cluster, LoRA, DeepSpeed ZeRO-2,
      packing on (block-diagonal attention per packed row), ``optim.gradient_checkpointing``
      at the config default (``selective``) unless ``--gradient-checkpointing`` says otherwise;
  (b) TRL ``SFTTrainer`` with packing (its default best-fit-decreasing, padding-free
      packing), given its best settings for a CPU: ``bf16=False``,
      ``gradient_checkpointing=False``, torch threads = cores;
  (c) Hugging Face ``Trainer`` + PEFT with per-batch padding (``DataCollatorForSeq2Seq``),
      the common default, with the same threads and precision as (b);
  (d) the same HF ``Trainer`` + PEFT on the batch shape rayft trains on: rayft's packed
      rows (same packing, same labels) padded to ``--max-seq-len``, so every step is
      ``[--batch-size, --max-seq-len]`` like a run_clm ``group_texts`` block (a plain
      causal mask, no gradient checkpointing). It exists for the memory comparison.

All four use the same tokenized rows (rayft's chat tokenization, assistant-only labels),
LoRA r=16, alpha=32, all linear layers, dropout 0, AdamW at lr 2e-4 with a constant
schedule, gradient clipping 1.0, float32, one epoch, micro-batch ``--batch-size`` rows
of at most ``--max-seq-len`` tokens and no gradient accumulation. Rows are taken from the
start of the file until ``--tokens`` real tokens are reached.

What is timed, the same way for all three: real (non-padding) tokens per second of wall
time over optimizer steps 2..N, i.e. from the end of step 1 to the end of the last step.
Model loading, data preparation, Ray start-up, step 1 (warm-up) and the final save are
not timed; fetching and collating batches during training is. rayft's figure comes from
the tokens/s its training loop reports for every step (real tokens of all workers over
the step's wall time), averaged over steps 2..N weighted by tokens.

Peak memory, per arm: the peak resident set (``VmHWM`` of ``/proc/<pid>/status``) of the
process that trains: rayft's Ray Train worker (the largest over workers, read by a loop
callback after training), and for (b), (c) and (d) a fresh child process running only
that arm. rayft's workers run with ``scaling.allocator`` at the config default (``auto``:
Ray's bundled jemalloc, set not to purge, ``trainers.driver.JEMALLOC_CONF``) unless
``--allocator`` says otherwise; the peers run with the system allocator, as HF and TRL do
out of the box, unless ``--peers-allocator rayft`` gives them the very allocator and
settings rayft's workers got (the like-for-like comparison). The two targets, printed last but one, each against the HF arm it names:

  ``peak_mem_ratio`` = rayft / (d) peak RSS, the same ``[batch, max_seq_len]`` batches
      (target <= 0.5);
  ``tokens_ratio`` = rayft / (c) tokens/s, HF's common per-batch padding (target >= 1.3).

(c)'s peak and (d)'s tokens/s are printed too: (c) holds less memory only because its
padded batches carry about a quarter of the tokens of a packed ``[4, 512]`` block.

rayft's model-FLOPs utilisation counts 4*N FLOPs per token (forward 2N, backward through
the frozen base 2N; the LoRA weight gradients and attention are ignored), N the base
model's parameter count, against this machine's fp32 matmul peak (best of several
2048^3 products, all threads). Targets: a/b >= 1.0 and a/c >= 1.3. The last line is
``speedup_vs_trl=<a/b>``.

The DPO row (``--dpo-pairs N``, 0 skips it; ``--only-dpo`` runs only it): rayft
``method: dpo`` (LoRA, ZeRO-2, unpacked, reference = the adapter disabled) against TRL
``DPOTrainer`` (``peft_config``, so its reference is the adapter disabled too) on the same
N conversational pairs built from the data file (prompt = a chat's turns before its last
answer, chosen = that answer, rejected = the next chat's last answer), same LoRA, lr,
``dpo.beta`` 0.1 sigmoid, micro-batch ``--batch-size`` pairs, ``--max-seq-len`` per
sequence, float32, one epoch. Timed as above: pairs per second over optimizer steps 2..N
(rayft: each step's pairs over its wall time, from the step's tokens and tokens/s). The
line is ``dpo_speedup_vs_trl=<rayft / TRL pairs/s>`` (target >= 1.0).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MODEL = "smollm2-135m-instruct"
DATA = Path(__file__).resolve().parent / "data" / "chat_varlen.jsonl"
LORA = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}
LR = 2e-4
SEED = 42
# 1 worker x all cores as torch threads. 2 workers x 1 CPU measured faster on a busy
# 2-core machine (56.6 against 36.7 tokens/s), but under contention two processes also
# win a larger share of the CPU from other users. A worker at batch 4 x 512 peaks at
# ~3.2 GB (it was ~7.7 GB before the lean loss, selective checkpointing and jemalloc).
# --workers 2 runs the other layout.
DEFAULT_WORKERS = 1
CHECKPOINTING = {"false": False, "true": True, "selective": "selective"}


@dataclass
class PathResult:
    """Throughput of one training path."""

    name: str
    setup: str
    steps: int
    tokens: int
    """Real tokens trained on, all steps."""
    timed_tokens: int
    """Real tokens of steps 2..N."""
    timed_s: float
    """Wall time of steps 2..N."""
    step_tokens: list[int] = field(default_factory=list)
    step_s: list[float] = field(default_factory=list)
    peak_rss_mb: float | None = None
    """Peak resident memory of the training process (VmHWM), MiB."""

    @property
    def tokens_per_s(self) -> float:
        return self.timed_tokens / self.timed_s if self.timed_s > 0 else float("nan")


def steady_state(name: str, setup: str, step_tokens: list[int], step_s: list[float]) -> PathResult:
    """Real tokens per second over steps 2..N (step 1 is warm-up)."""
    if len(step_tokens) < 2:
        raise SystemExit(
            f"{name}: only {len(step_tokens)} optimizer step(s); raise --tokens or lower "
            "--batch-size so every path takes at least 2 steps"
        )
    return PathResult(
        name=name,
        setup=setup,
        steps=len(step_tokens),
        tokens=sum(step_tokens),
        timed_tokens=sum(step_tokens[1:]),
        timed_s=sum(step_s[1:]),
        step_tokens=list(step_tokens),
        step_s=[round(s, 4) for s in step_s],
    )


# ---------------------------------------------------------------- machine and data


def matmul_peak(size: int = 2048, repeats: int = 5) -> float:
    """Best fp32 GFLOP/s of a ``size``^3 matmul with all torch threads."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    a = torch.randn(size, size)
    b = torch.randn(size, size)
    torch.mm(a, b)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def select_rows(model_dir: Path, budget: int, max_seq_len: int) -> tuple[list[str], list[dict]]:
    """Rows from the start of the data file until ``budget`` real tokens, and their tokens.

    Tokenization is rayft's own (chat template, assistant-only labels), so every path
    trains on identical token sequences.
    """
    from rayft.trainers.data import load_tokenizer
    from rayft.trainers.formats import tokenize_example

    tokenizer = load_tokenizer(str(model_dir))
    lines, examples, total = [], [], 0
    for line in DATA.read_text(encoding="utf-8").splitlines():
        if total >= budget:
            break
        example = tokenize_example(json.loads(line), "chat", tokenizer, max_seq_len)
        if example is None:
            continue
        lines.append(line)
        examples.append(example)
        total += len(example["input_ids"])
    if total < budget:
        raise SystemExit(
            f"{DATA} holds only {total} tokens at --max-seq-len {max_seq_len}; lower --tokens "
            f"or regenerate it with more rows (bench/data/make_chat_varlen.py --rows N)"
        )
    return lines, examples


# ---------------------------------------------------------------- peak memory


def peak_rss_mb(pid: int | str = "self") -> float:
    """Peak resident set size of a process (``VmHWM``), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/{pid}/status has no VmHWM line")


def _peak_memory_callback(out_dir: Path):
    """A rayft loop callback writing each worker's peak RSS to ``out_dir/rank<r>.json``."""
    from rayft.trainers.loop import LoopCallback

    class PeakMemory(LoopCallback):
        def __init__(self, out: str) -> None:
            self.out = out

        def on_train_end(self, state) -> None:
            import ray.train

            rank = ray.train.get_context().get_world_rank()
            Path(self.out, f"rank{rank}.json").write_text(json.dumps({"mb": peak_rss_mb()}))

    return PeakMemory(str(out_dir))


def _child_main(conn, fn_name: str, args: tuple) -> None:
    result = globals()[fn_name](*args)
    result.peak_rss_mb = peak_rss_mb()
    conn.send(asdict(result))  # plain data: the class lives in this (spawned) main module
    conn.close()


def in_fresh_process(fn_name: str, *args: Any) -> PathResult:
    """Run arm ``fn_name`` in a new (spawned) process, so its peak memory is its own."""
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child_main, args=(child, fn_name, args))
    proc.start()
    child.close()
    try:
        result = PathResult(**parent.recv())
    except EOFError:
        result = None  # the process died before sending (its exit code says why)
    proc.join()
    if result is None or proc.exitcode != 0:
        raise SystemExit(f"{fn_name} failed in its process (exit code {proc.exitcode})")
    return result


# ---------------------------------------------------------------- (a) rayft


def rayft_optim(batch_size: int, checkpointing: str) -> dict[str, Any]:
    """The ``optim`` section every rayft arm trains with: the HF arms' settings.

    ``checkpointing`` is ``default`` (the config's ``optim.gradient_checkpointing``) or the
    value to set: ``false``, ``true`` or ``selective``.
    """
    optim = {
        "lr": LR,
        "epochs": 1,
        "batch_size": batch_size,
        "grad_accum": 1,
        "scheduler": "constant",
        "warmup_ratio": 0.0,
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "seed": SEED,
    }
    if checkpointing != "default":
        optim["gradient_checkpointing"] = CHECKPOINTING[checkpointing]
    return optim


def run_rayft(
    rows: list[str],
    model_dir: Path,
    workers: int,
    batch_size: int,
    max_seq_len: int,
    work: Path,
    checkpointing: str = "default",
    allocator: str = "default",
) -> PathResult:
    """Train with ``run_training`` on the embedded local Ray cluster.

    ``checkpointing`` is ``default`` (the config's ``optim.gradient_checkpointing``) or the
    value to set: ``false``, ``true`` or ``selective``; ``allocator`` likewise for
    ``scaling.allocator`` (``auto``, ``system`` or ``jemalloc``).
    """
    import ray

    from rayft.cluster.connect import connect
    from rayft.trainers.config import validate_spec
    from rayft.trainers.driver import run_training

    cores = os.cpu_count() or 1
    cpus = max(1, cores // workers)
    train_file = work / "train.jsonl"
    train_file.write_text("\n".join(rows) + "\n", encoding="utf-8")
    spec = validate_spec(
        {
            "model": {"name": str(model_dir), "dtype": "float32"},
            "data": {
                "train": str(train_file),
                "format": "chat",
                "max_seq_len": max_seq_len,
                "packing": True,
            },
            "method": "lora",
            "lora": LORA,
            "deepspeed": {"zero_stage": 2},
            "optim": rayft_optim(batch_size, checkpointing),
            "scaling": {
                "num_workers": workers,
                "cpus_per_worker": cpus,
                "use_gpu": False,
                **({} if allocator == "default" else {"allocator": allocator}),
            },
            "logging": {"every_steps": 1},
            "output": {"name": "bench-train-throughput", "overwrite": True},
            "storage": str(work / "rayft"),
        }
    )
    # Always a fresh embedded cluster: with no address ray.init would join another Ray
    # instance already running on this machine (its /tmp/ray/ray_current_cluster).
    os.environ["RAY_ADDRESS"] = "local"
    peaks = work / "peak_memory"
    peaks.mkdir(exist_ok=True)
    connect(None)
    try:
        outcome = run_training(
            spec, show_progress=False, loop_callbacks=[_peak_memory_callback(peaks)]
        )
    finally:
        ray.shutdown()
    records = [r for r in outcome.history if r.get("kind") == "train"]
    # tokens_seen is rank 0's count times the world size: exact for one worker; with more,
    # packed rows are near-equal so the per-step estimate only weights the average.
    seen = [0] + [int(r["tokens_seen"]) for r in records]
    step_tokens = [seen[i + 1] - seen[i] for i in range(len(records))]
    step_s = [t / r["tokens_per_s"] for t, r in zip(step_tokens, records, strict=True)]
    setup = (
        f"{workers} worker(s) x {cpus} CPU (torch threads {cpus}), ZeRO-2, packed, "
        f"optim.gradient_checkpointing={spec.optim.gradient_checkpointing}"
        f"{' (config default)' if checkpointing == 'default' else ''}, "
        f"scaling.allocator={spec.scaling.allocator}"
        f"{' (config default)' if allocator == 'default' else ''} -> {worker_allocator(spec)}, "
        "embedded Ray"
    )
    result = steady_state("rayft", setup, step_tokens, step_s)
    result.peak_rss_mb = max(json.loads(p.read_text())["mb"] for p in peaks.glob("rank*.json"))
    return result


def rayft_worker_env(allocator: str) -> dict[str, str]:
    """The environment variables rayft's training workers get for ``--allocator``."""
    from rayft.trainers.config import ScalingSpec
    from rayft.trainers.driver import worker_runtime_env

    chosen = ScalingSpec().allocator if allocator == "default" else allocator
    return worker_runtime_env(chosen).get("env_vars", {})


def worker_allocator(spec: Any) -> str:
    """What ``spec``'s workers allocate with: ``jemalloc (MALLOC_CONF=...)`` or ``system``."""
    from rayft.trainers.driver import worker_runtime_env

    env = worker_runtime_env(spec.scaling.allocator).get("env_vars", {})
    return f"jemalloc (MALLOC_CONF={env['MALLOC_CONF']})" if env else "system"


# ---------------------------------------------------------------- (b), (c) single-process peers


def _timed_trainer(base: type) -> type:
    """``base`` (a Trainer class) recording each optimizer step's real tokens and end time."""

    class Timed(base):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.step_tokens: list[int] = []
            self.step_ends: list[float] = []
            self.train_start = 0.0

        def training_step(self, model, inputs, num_items_in_batch=None):
            mask = inputs.get("attention_mask")
            # Padding-free batches (TRL packing) carry no mask and no padding.
            real = (
                int(mask.sum())
                if mask is not None and mask.dim() == 2
                else inputs["input_ids"].numel()
            )
            self.step_tokens.append(real)
            return super().training_step(model, inputs, num_items_in_batch)

    return Timed


def _clock():
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.start = 0.0
            self.ends: list[float] = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

    return StepClock()


def _lora_config():
    from peft import LoraConfig

    return LoraConfig(
        r=LORA["r"],
        lora_alpha=LORA["alpha"],
        lora_dropout=LORA["dropout"],
        target_modules=LORA["target_modules"],
        task_type="CAUSAL_LM",
        bias="none",
    )


def _common_args(batch_size: int, out: Path) -> dict[str, Any]:
    return {
        "output_dir": str(out),
        "per_device_train_batch_size": batch_size,
        "gradient_accumulation_steps": 1,
        "num_train_epochs": 1,
        "learning_rate": LR,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "seed": SEED,
        "use_cpu": True,
        "bf16": False,
        "fp16": False,
        "gradient_checkpointing": False,
        "dataloader_num_workers": 0,
        "logging_strategy": "no",
        "save_strategy": "no",
        "report_to": [],
        "disable_tqdm": True,
    }


def _load_model(model_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="sdpa"
    )


def _train_with_peft(
    dataset: Any, collator: Any, model_dir: Path, batch_size: int, out: Path
) -> tuple[Any, Any]:
    """HF ``Trainer`` + PEFT LoRA on ``dataset``, timed per step; returns (trainer, clock)."""
    from peft import get_peft_model
    from transformers import Trainer, TrainingArguments

    model = get_peft_model(_load_model(model_dir), _lora_config())
    trainer = _timed_trainer(Trainer)(
        model=model,
        args=TrainingArguments(**_common_args(batch_size, out)),
        train_dataset=dataset,
        data_collator=collator,
    )
    clock = _clock()
    trainer.add_callback(clock)
    trainer.train()
    return trainer, clock


def _result_from(trainer, clock, name: str, setup: str) -> PathResult:
    ends = [clock.start] + clock.ends
    step_s = [ends[i + 1] - ends[i] for i in range(len(clock.ends))]
    return steady_state(name, setup, trainer.step_tokens, step_s)


def run_trl(
    examples: list[dict], model_dir: Path, batch_size: int, max_seq_len: int, work: Path
) -> PathResult:
    """TRL ``SFTTrainer`` with packing, on pre-tokenized rows (same ids and labels)."""
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    torch.set_num_threads(os.cpu_count() or 1)
    dataset = Dataset.from_list(
        [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples]
    )
    args = SFTConfig(**_common_args(batch_size, work / "trl"), packing=True, max_length=max_seq_len)
    trainer = _timed_trainer(SFTTrainer)(
        model=_load_model(model_dir),
        args=args,
        train_dataset=dataset,
        processing_class=AutoTokenizer.from_pretrained(model_dir),
        peft_config=_lora_config(),
    )
    clock = _clock()
    trainer.add_callback(clock)
    trainer.train()
    setup = (
        f"SFTTrainer packing={args.packing_strategy} (padding-free={trainer.padding_free}), "
        f"bf16=False, gradient_checkpointing=False, torch threads {torch.get_num_threads()}"
    )
    return _result_from(trainer, clock, "trl", setup)


def run_hf(examples: list[dict], model_dir: Path, batch_size: int, work: Path) -> PathResult:
    """HF ``Trainer`` + PEFT, batches padded to their longest row."""
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, DataCollatorForSeq2Seq

    torch.set_num_threads(os.cpu_count() or 1)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dataset = Dataset.from_list(
        [
            {
                "input_ids": e["input_ids"],
                "attention_mask": [1] * len(e["input_ids"]),
                "labels": e["labels"],
            }
            for e in examples
        ]
    )
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    trainer, clock = _train_with_peft(dataset, collator, model_dir, batch_size, work / "hf")
    setup = (
        f"Trainer + PEFT, per-batch padding (DataCollatorForSeq2Seq), bf16=False, "
        f"gradient_checkpointing=False, torch threads {torch.get_num_threads()}"
    )
    return _result_from(trainer, clock, "hf", setup)


def run_hf_blocks(
    examples: list[dict], model_dir: Path, batch_size: int, max_seq_len: int, work: Path
) -> PathResult:
    """HF ``Trainer`` + PEFT on rayft's packed rows, each padded to ``max_seq_len``.

    Every batch is ``[batch_size, max_seq_len]``, the shape rayft's steps have, so the
    two processes' peak memory compare at the same batch.
    """
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, default_data_collator

    from rayft.trainers.loss import IGNORE_INDEX
    from rayft.trainers.packing import pack_examples

    torch.set_num_threads(os.cpu_count() or 1)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    packed = pack_examples(
        [{**e, "sample_id": str(i)} for i, e in enumerate(examples)], max_seq_len
    )

    def padded(values: list[int], fill: int) -> list[int]:
        return list(values) + [fill] * (max_seq_len - len(values))

    dataset = Dataset.from_list(
        [
            {
                "input_ids": padded(r["input_ids"], pad_id),
                "attention_mask": padded([1] * len(r["input_ids"]), 0),
                "labels": padded(r["labels"], IGNORE_INDEX),
            }
            for r in packed
        ]
    )
    trainer, clock = _train_with_peft(
        dataset, default_data_collator, model_dir, batch_size, work / "hf_blocks"
    )
    setup = (
        f"Trainer + PEFT, rayft's {len(packed)} packed rows padded to [{batch_size}, "
        f"{max_seq_len}] (same labels, causal mask), bf16=False, gradient_checkpointing=False, "
        f"torch threads {torch.get_num_threads()}"
    )
    return _result_from(trainer, clock, "hf_blocks", setup)


# ---------------------------------------------------------------- DPO: rayft against TRL DPOTrainer


def preference_pairs(count: int) -> list[dict]:
    """``count`` conversational pairs from the data file: a chat's last answer is chosen,
    the next chat's last answer rejected (answers of varied length, as real pairs have)."""
    chats = [json.loads(line)["messages"] for line in DATA.read_text().splitlines()]
    if count > len(chats):
        raise SystemExit(f"{DATA} has {len(chats)} chats; --dpo-pairs {count} is too many")
    return [
        {
            "prompt": chats[i][:-1],
            "chosen": chats[i][-1:],
            "rejected": chats[(i + 1) % len(chats)][-1:],
        }
        for i in range(count)
    ]


def run_rayft_dpo(
    pairs: list[dict],
    model_dir: Path,
    workers: int,
    batch_size: int,
    max_seq_len: int,
    work: Path,
    checkpointing: str = "default",
) -> PathResult:
    """rayft ``method: dpo`` with LoRA on the embedded local Ray cluster; pairs per second."""
    import ray

    from rayft.cluster.connect import connect
    from rayft.trainers.config import validate_spec
    from rayft.trainers.driver import run_training

    cpus = max(1, (os.cpu_count() or 1) // workers)
    train_file = work / "pairs.jsonl"
    train_file.write_text("\n".join(json.dumps(p) for p in pairs) + "\n", encoding="utf-8")
    spec = validate_spec(
        {
            "model": {"name": str(model_dir), "dtype": "float32"},
            "data": {"train": str(train_file), "max_seq_len": max_seq_len, "shuffle": False},
            "objective": "dpo",
            "method": "lora",
            "dpo": {"beta": 0.1, "loss": "sigmoid"},
            "lora": LORA,
            "deepspeed": {"zero_stage": 2},
            "optim": rayft_optim(batch_size, checkpointing),
            "scaling": {"num_workers": workers, "cpus_per_worker": cpus, "use_gpu": False},
            "logging": {"every_steps": 1},
            "output": {"name": "bench-train-dpo", "overwrite": True},
            "storage": str(work / "rayft-dpo"),
        }
    )
    os.environ["RAY_ADDRESS"] = "local"
    connect(None)
    try:
        outcome = run_training(spec, show_progress=False)
    finally:
        ray.shutdown()
    records = [r for r in outcome.history if r.get("kind") == "train"]
    seen = [0] + [int(r["tokens_seen"]) for r in records]
    step_s = [(seen[i + 1] - seen[i]) / r["tokens_per_s"] for i, r in enumerate(records)]
    # Every step but the last trains batch_size pairs on each worker.
    per_step = batch_size * workers
    step_pairs = [min(per_step, len(pairs) - i * per_step) for i in range(len(records))]
    setup = (
        f"{workers} worker(s) x {cpus} CPU, ZeRO-2, LoRA, unpacked [2B, T] batches, "
        f"optim.gradient_checkpointing={spec.optim.gradient_checkpointing}, embedded Ray"
    )
    return steady_state("rayft_dpo", setup, step_pairs, step_s)


def run_trl_dpo(pairs: list[dict], model_dir: Path, batch_size: int, max_seq_len: int, work: Path):
    """TRL ``DPOTrainer`` with a PEFT LoRA config on the same pairs; pairs per second."""
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    torch.set_num_threads(os.cpu_count() or 1)

    class Timed(DPOTrainer):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.step_tokens: list[int] = []  # pairs per step (steady_state's unit)

        def training_step(self, model, inputs, num_items_in_batch=None):
            self.step_tokens.append(inputs["input_ids"].shape[0] // 2)
            return super().training_step(model, inputs, num_items_in_batch)

    args = DPOConfig(
        **_common_args(batch_size, work / "trl-dpo"),
        beta=0.1,
        loss_type=["sigmoid"],
        max_length=max_seq_len,
        precompute_ref_log_probs=False,
    )
    trainer = Timed(
        model=_load_model(model_dir),
        args=args,
        train_dataset=Dataset.from_list(pairs),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
        peft_config=_lora_config(),
    )
    clock = _clock()
    trainer.add_callback(clock)
    trainer.train()
    setup = (
        f"DPOTrainer + peft_config (reference = adapter disabled), bf16=False, "
        f"gradient_checkpointing=False, torch threads {torch.get_num_threads()}"
    )
    return _result_from(trainer, clock, "trl_dpo", setup)


def dpo_row(args: argparse.Namespace, model_dir: Path, figures: dict[str, Any]) -> None:
    """Run and print the DPO row; adds its figures to ``figures``."""
    pairs = preference_pairs(args.dpo_pairs)
    work = Path(tempfile.mkdtemp(prefix="rayft-bench-dpo-"))
    try:
        print(f"\n[dpo] rayft method dpo, {len(pairs)} pairs ...", flush=True)
        ours = run_rayft_dpo(
            pairs,
            model_dir,
            args.workers,
            args.batch_size,
            args.max_seq_len,
            work,
            args.gradient_checkpointing,
        )
        print("[dpo] TRL DPOTrainer ...", flush=True)
        trl = in_fresh_process(
            "run_trl_dpo", pairs, model_dir, args.batch_size, args.max_seq_len, work
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print()
    for label, res in (("(dpo) rayft", ours), ("(dpo) TRL DPOTrainer", trl)):
        print(
            f"{label:<22} {res.tokens_per_s:8.3f} pairs/s  ({res.timed_tokens} pairs in "
            f"{res.timed_s:.1f} s over steps 2..{res.steps})"
        )
        print(f"{'':<22} {res.setup}")
    ratio = ours.tokens_per_s / trl.tokens_per_s
    figures["dpo"] = {
        "pairs": len(pairs),
        "rayft_pairs_per_s": ours.tokens_per_s,
        "trl_pairs_per_s": trl.tokens_per_s,
        "speedup_vs_trl": ratio,
        "results": {"rayft": asdict(ours), "trl": asdict(trl)},
    }
    print(
        f"dpo_speedup_vs_trl={ratio:.3f}  (rayft / TRL DPOTrainer pairs/s; target >= 1.0: "
        f"{'met' if ratio >= 1.0 else 'NOT met'})",
        flush=True,
    )


def only_dpo(args: argparse.Namespace, model_dir: Path) -> None:
    """``--only-dpo``: the DPO row alone."""
    figures: dict[str, Any] = {"batch_size": args.batch_size, "max_seq_len": args.max_seq_len}
    dpo_row(args, model_dir, figures)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


# ---------------------------------------------------------------- report


def base_parameters(model_dir: Path) -> int:
    """Parameter count of the base model (tied embeddings counted once)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    return sum(p.numel() for p in model.parameters())


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tokens",
        type=int,
        default=24000,
        help="real tokens each path trains on (rows from the file start)",
    )
    parser.add_argument("--max-seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4, help="micro-batch rows, all paths")
    parser.add_argument(
        "--workers",
        type=int,
        default=DEFAULT_WORKERS,
        help="rayft workers; each gets cores/workers CPUs and as many torch threads",
    )
    parser.add_argument("--skip-peers", action="store_true", help="only run rayft (quick check)")
    parser.add_argument(
        "--gradient-checkpointing",
        choices=["default", *CHECKPOINTING],
        default="default",
        help="rayft's optim.gradient_checkpointing (default: the config default, selective)",
    )
    parser.add_argument(
        "--allocator",
        choices=["default", "auto", "system", "jemalloc"],
        default="default",
        help="rayft's scaling.allocator (default: the config default, auto)",
    )
    parser.add_argument(
        "--peers-allocator",
        choices=["system", "rayft"],
        default="system",
        help="the peers' C allocator: system (HF and TRL out of the box) or rayft (the "
        "allocator and settings rayft's workers ran with)",
    )
    parser.add_argument(
        "--skip-trl", action="store_true", help="run rayft and the HF Trainer only (no TRL)"
    )
    parser.add_argument("--json", metavar="OUT", help="also write every figure to this JSON file")
    parser.add_argument(
        "--dpo-pairs", type=int, default=64, help="pairs of the DPO row (0 skips the row)"
    )
    parser.add_argument("--only-dpo", action="store_true", help="run only the DPO row")
    return parser


def print_setup(
    args: argparse.Namespace, cores: int, peak: float, n_params: int, rows: list, lengths: list
) -> None:
    """What is measured, on what, before the runs start."""
    print(
        f"machine: {cores} cores, fp32 matmul peak {peak:.1f} GFLOP/s (best 2048^3 product, "
        f"{cores} threads)"
    )
    print(
        f"data: {len(rows)} rows of {DATA.name}, {sum(lengths)} real tokens "
        f"({min(lengths)}-{max(lengths)} per row), max_seq_len {args.max_seq_len}, "
        f"micro-batch {args.batch_size}"
    )
    print(
        f"model: {MODEL} ({n_params / 1e6:.1f}M parameters), LoRA r={LORA['r']} "
        f"alpha={LORA['alpha']} {LORA['target_modules']} dropout {LORA['dropout']}, "
        f"lr {LR} constant, float32, 1 epoch"
    )
    print(
        "timed: real (non-padding) tokens / wall time of optimizer steps 2..N; model load, "
        "data prep, start-up, step 1 and the final save excluded",
        flush=True,
    )


def run_paths(
    args: argparse.Namespace, rows: list, examples: list, model_dir: Path
) -> dict[str, PathResult]:
    """rayft, then each peer in a fresh process, on the same rows."""
    work = Path(tempfile.mkdtemp(prefix="rayft-bench-train-"))
    results: dict[str, PathResult] = {}
    try:
        print(f"\n[a] rayft ({args.workers} worker(s)) ...", flush=True)
        results["rayft"] = run_rayft(
            rows,
            model_dir,
            args.workers,
            args.batch_size,
            args.max_seq_len,
            work,
            args.gradient_checkpointing,
            args.allocator,
        )
        if args.peers_allocator == "rayft":
            # The peers' processes get rayft's worker allocator and settings (a preload
            # must be in place before a process starts: it goes into their environment).
            os.environ.update(rayft_worker_env(args.allocator))
        if not args.skip_peers and not args.skip_trl:
            print("\n[b] TRL SFTTrainer ...", flush=True)
            results["trl"] = in_fresh_process(
                "run_trl", examples, model_dir, args.batch_size, args.max_seq_len, work
            )
        if not args.skip_peers:
            print("\n[c] HF Trainer + PEFT ...", flush=True)
            results["hf"] = in_fresh_process("run_hf", examples, model_dir, args.batch_size, work)
            print(f"\n[d] HF Trainer + PEFT on [{args.batch_size}, {args.max_seq_len}] blocks ...")
            results["hf_blocks"] = in_fresh_process(
                "run_hf_blocks", examples, model_dir, args.batch_size, args.max_seq_len, work
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return results


def print_paths(results: dict[str, PathResult], n_params: int, peak: float) -> None:
    """One line of throughput, MFU and memory per path, then its setup."""
    labels = {
        "rayft": "(a) rayft",
        "trl": "(b) TRL SFTTrainer",
        "hf": "(c) HF Trainer+PEFT",
        "hf_blocks": "(d) HF Trainer blocks",
    }
    for key, res in results.items():
        mfu = res.tokens_per_s * 4 * n_params / (peak * 1e9)
        print(
            f"{labels[key]:<22} {res.tokens_per_s:8.1f} tokens/s  ({res.timed_tokens} tokens "
            f"in {res.timed_s:.1f} s over steps 2..{res.steps}; {res.tokens} tokens in "
            f"{res.steps} steps)  MFU {100 * mfu:.1f}%  peak RSS {res.peak_rss_mb:.0f} MiB"
        )
        print(f"{'':<22} {res.setup}")


def compare_with_hf(
    args: argparse.Namespace, results: dict[str, PathResult], figures: dict[str, Any]
) -> None:
    """rayft against the HF Trainer: tokens/s against padding, peak memory against blocks."""
    a = results["rayft"].tokens_per_s
    vs_hf = a / results["hf"].tokens_per_s
    figures.update(speedup_vs_hf=vs_hf)
    print(
        f"a/c (rayft / HF padding)     = {vs_hf:.3f}  (target >= 1.3: "
        f"{'met' if vs_hf >= 1.3 else 'NOT met'})"
    )
    hf, blocks = results["hf"], results["hf_blocks"]
    mine = results["rayft"].peak_rss_mb
    mem_ratio = mine / blocks.peak_rss_mb
    tokens_ratio = a / hf.tokens_per_s
    figures.update(
        peak_mem_ratio=mem_ratio,
        tokens_ratio=tokens_ratio,
        peak_mem_ratio_vs_padding=mine / hf.peak_rss_mb,
    )
    print(
        f"peak_mem_ratio={mem_ratio:.3f}  (rayft {mine:.0f} MiB / (d) HF Trainer on the same "
        f"[{args.batch_size}, {args.max_seq_len}] blocks {blocks.peak_rss_mb:.0f} MiB; "
        f"target <= 0.5: {'met' if mem_ratio <= 0.5 else 'NOT met'}; against (c)'s padded "
        f"batches {hf.peak_rss_mb:.0f} MiB it is {mine / hf.peak_rss_mb:.3f})"
    )
    print(
        f"tokens_ratio={tokens_ratio:.3f}  (rayft / (c) HF Trainer per-batch padding "
        f"tokens/s; target >= 1.3: {'met' if tokens_ratio >= 1.3 else 'NOT met'})"
    )


def main() -> None:
    args = build_parser().parse_args()
    from rayft.trainers.models import resolve_model
    from rayft.trainers.storage import StorageRoot

    model_dir = resolve_model(MODEL, StorageRoot.resolve().models)
    if args.only_dpo:
        only_dpo(args, model_dir)
        return

    cores = os.cpu_count() or 1
    peak = matmul_peak()
    n_params = base_parameters(model_dir)
    rows, examples = select_rows(model_dir, args.tokens, args.max_seq_len)
    lengths = [len(e["input_ids"]) for e in examples]
    print_setup(args, cores, peak, n_params, rows, lengths)
    results = run_paths(args, rows, examples, model_dir)

    print()
    peers_env = rayft_worker_env(args.allocator) if args.peers_allocator == "rayft" else {}
    peers_allocator = (
        f"jemalloc (MALLOC_CONF={peers_env['MALLOC_CONF']})" if peers_env else "system"
    )
    print(f"peers' allocator: {peers_allocator} (--peers-allocator {args.peers_allocator})")
    print_paths(results, n_params, peak)
    a = results["rayft"].tokens_per_s
    mfu = a * 4 * n_params / (peak * 1e9)
    figures: dict[str, Any] = {
        "cores": cores,
        "matmul_peak_gflops": peak,
        "base_params": n_params,
        "rows": len(rows),
        "real_tokens": sum(lengths),
        "max_seq_len": args.max_seq_len,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "default_workers": DEFAULT_WORKERS,
        "peers_allocator": peers_allocator,
        "results": {k: {**asdict(r), "tokens_per_s": r.tokens_per_s} for k, r in results.items()},
        "rayft_mfu": mfu,
    }
    print(
        f"rayft MFU: {100 * mfu:.2f}% (4 x {n_params / 1e6:.1f}M FLOPs/token x {a:.1f} tokens/s "
        f"/ {peak:.1f} GFLOP/s)"
    )
    if args.workers == DEFAULT_WORKERS:
        print(
            f"rayft workers: {args.workers} x {max(1, cores // args.workers)} threads (the "
            f"default; --workers {2 if args.workers == 1 else 1} runs the other layout)"
        )
    speedup = None
    if "trl" in results:
        speedup = a / results["trl"].tokens_per_s
        figures.update(speedup_vs_trl=speedup)
        print(
            f"a/b (rayft / TRL packing)    = {speedup:.3f}  (target >= 1.0: "
            f"{'met' if speedup >= 1.0 else 'NOT met'})"
        )
    if "hf" in results:
        compare_with_hf(args, results, figures)
    if args.dpo_pairs:
        dpo_row(args, model_dir, figures)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
        print(f"figures written to {args.json}")
    sys.stdout.flush()
    print(f"speedup_vs_trl={speedup:.3f}" if speedup is not None else "speedup_vs_trl=n/a")


if __name__ == "__main__":
    main()
