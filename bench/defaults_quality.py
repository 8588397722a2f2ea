"""Held-out loss of rayft's defaults against TRL's SFTTrainer with its documented LoRA settings.

    RAYFT_HOME=/tmp/rfhome .venv/bin/python bench/defaults_quality.py [--train-rows 160]
        [--tasks extract,recall,format] [--sweep] [--json OUT]

Three small chat tasks that rayft builds itself (``bench/data/defaults_tasks.py``): the
shipped extraction task, short factual answers (``recall``) and format following
(``format``), each split into train rows and 48 held-out rows. On each task, in the same
run, one after another on this machine:

  (a) rayft: ``run_training`` with a spec that sets only ``model``
      (``smollm2-135m-instruct``), ``data.train`` and ``output``, plus where it runs
      (``scaling``: one worker with every core, so both arms get the same CPU); every
      training value is rayft's default, resolved per method (``trainers/defaults.py``);
  (b) TRL ``SFTTrainer`` with its documented LoRA settings: ``LoraConfig(r=16,
      lora_alpha=32, lora_dropout=0.05, target_modules="all-linear")``, learning rate
      2e-4, cosine schedule, 1 epoch, batch 8, the rest at ``SFTConfig``'s defaults, run
      in float32 without gradient checkpointing on the CPU (as rayft does there).

Both train on the same token ids and loss labels (rayft's chat tokenization, assistant
tokens only; TRL gets them pre-tokenized). Both adapters are then scored the same way
here: the held-out loss is the mean negative log-likelihood per labelled token of the
held-out rows. Compute is counted as optimizer steps x mean tokens per step (= tokens
trained). Target: on every task rayft's held-out loss at least 3% lower than TRL's
(``ratio`` = rayft / TRL <= 0.97) at no more than TRL's compute. On a shared 2-core CPU
the six runs take about 20 minutes at 160 rows per task; ``--sweep`` adds two candidates
per task (32 minutes in all).

``--sweep`` also trains the candidate settings in ``CANDIDATES`` with the same
SFTTrainer harness as (b) (AdamW, linear warm-up, cosine decay, gradient clipping 1.0:
the schedule rayft's loop runs) and prints each task's held-out loss per candidate next
to rayft's own (whose values are the candidate "lr 1e-3, rank 16, scale 2, batch 8"):
the evidence the defaults were chosen from.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent / "data"))
from defaults_tasks import build_tasks  # noqa: E402

MODEL = "smollm2-135m-instruct"
MAX_SEQ_LEN = 512
SEED = 42
TARGET = 0.97
TRL_DOCUMENTED = {
    "lr": 2e-4,
    "r": 16,
    "alpha": 32,
    "rslora": False,
    "dropout": 0.05,
    "batch": 8,
    "warmup_ratio": 0.0,
}
"""TRL's documented LoRA settings (its PEFT integration guide); the rest is SFTConfig's."""
CANDIDATES = {
    "lr5e-4 r16 a32": {"lr": 5e-4, "r": 16, "alpha": 32, "rslora": False},
    "lr1e-3 r16 a32": {"lr": 1e-3, "r": 16, "alpha": 32, "rslora": False},
    "lr2e-3 r16 a32": {"lr": 2e-3, "r": 16, "alpha": 32, "rslora": False},
    "lr1e-3 r32 rs16": {"lr": 1e-3, "r": 32, "alpha": 16, "rslora": True},
    "lr1e-3 r16 a32 b16": {"lr": 1e-3, "r": 16, "alpha": 32, "rslora": False, "batch": 16},
}
"""Settings tried by ``--sweep`` (batch 8, warm-up 0.03, dropout 0.05 unless named)."""


@dataclass
class Arm:
    """One training run and its adapter's held-out loss."""

    task: str
    name: str
    steps: int
    tokens: int
    """Real tokens trained on, all steps."""
    adapter: str
    settings: str
    heldout_loss: float = float("nan")

    @property
    def compute(self) -> int:
        """Optimizer steps x mean tokens per step."""
        return round(self.steps * (self.tokens / max(1, self.steps)))


def tokenized(rows: list[dict], tokenizer: Any) -> list[dict]:
    """rayft's tokenization of chat rows: ``input_ids`` and assistant-only ``labels``."""
    from rayft.trainers.formats import tokenize_example

    out = [tokenize_example(row, "chat", tokenizer, MAX_SEQ_LEN) for row in rows]
    return [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in out if e is not None]


def heldout_loss(model_dir: Path, adapter: str | None, examples: list[dict]) -> float:
    """Mean negative log-likelihood per labelled token of ``examples`` (base + adapter)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(examples), 16):
            chunk = examples[start : start + 16]
            width = max(len(e["input_ids"]) for e in chunk)
            ids = torch.tensor(
                [e["input_ids"] + [0] * (width - len(e["input_ids"])) for e in chunk]
            )
            labels = torch.tensor(
                [e["labels"] + [-100] * (width - len(e["labels"])) for e in chunk]
            )
            mask = (
                torch.arange(width)[None, :]
                < torch.tensor([len(e["input_ids"]) for e in chunk])[:, None]
            ).long()
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
            target = labels[:, 1:]
            total += float(
                torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.size(-1)),
                    target.reshape(-1),
                    ignore_index=-100,
                    reduction="sum",
                )
            )
            count += int((target != -100).sum())
    return total / count


# ---------------------------------------------------------------- (a) rayft


def run_rayft(task: str, train_file: Path, cores: int) -> Arm:
    """rayft with a spec that sets only model, data and output (and where it runs)."""
    from rayft.trainers.config import validate_spec
    from rayft.trainers.driver import run_training

    spec = validate_spec(
        {
            "model": {"name": MODEL},
            "data": {"train": str(train_file)},
            "output": {"name": f"bench-defaults-{task}", "overwrite": True},
            # Placement only: with optim.effective_batch the steps do not depend on it.
            "scaling": {"num_workers": 1, "cpus_per_worker": cores, "use_gpu": False},
        }
    )
    outcome = run_training(spec, show_progress=True)
    records = [r for r in outcome.history if r.get("kind") == "train"]
    o, lora = spec.optim, spec.lora
    scale = f"alpha {lora.alpha:g}/{'sqrt(r)' if lora.use_rslora else 'r'}"
    return Arm(
        task=task,
        name="rayft",
        steps=int(records[-1]["step"]),
        tokens=int(records[-1]["tokens_seen"]),
        adapter=str(outcome.artifact),
        settings=(
            f"lr {o.lr:g}, r {lora.r}, {scale}, effective batch {o.effective_batch} "
            f"({o.batch_size} x {o.grad_accum} x 1), {o.scheduler}, warmup {o.warmup_ratio:g}"
        ),
    )


# ---------------------------------------------------------------- (b) TRL


def run_sft(
    task: str, name: str, examples: list[dict], model_dir: Path, work: Path, settings: dict
) -> Arm:
    """TRL ``SFTTrainer`` with LoRA on pre-tokenized rows (the same ids and labels as rayft)."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    s = {**TRL_DOCUMENTED, "warmup_ratio": 0.03, **settings} if name != "trl" else TRL_DOCUMENTED
    out = work / f"{task}-{name.replace(' ', '_')}"
    args = SFTConfig(
        output_dir=str(out),
        learning_rate=s["lr"],
        lr_scheduler_type="cosine",
        warmup_steps=s["warmup_ratio"],  # a fraction of the steps when below 1
        num_train_epochs=1,
        per_device_train_batch_size=s["batch"],
        seed=SEED,
        # Where it runs, as rayft runs on a CPU: float32, every activation kept.
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        logging_strategy="no",
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
    )
    lora = LoraConfig(
        r=s["r"],
        lora_alpha=s["alpha"],
        use_rslora=s["rslora"],
        lora_dropout=s["dropout"],
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    torch.set_num_threads(os.cpu_count() or 1)
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
        args=args,
        train_dataset=Dataset.from_list(examples),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
        peft_config=lora,
    )
    trainer.train()
    trainer.save_model(str(out / "adapter"))
    scale = f"alpha {s['alpha']}/{'sqrt(r)' if s['rslora'] else 'r'}"
    return Arm(
        task=task,
        name=name,
        steps=int(trainer.state.global_step),
        tokens=sum(len(e["input_ids"]) for e in examples),
        adapter=str(out / "adapter"),
        settings=f"lr {s['lr']:g}, r {s['r']}, {scale}, batch {s['batch']}, cosine, warmup {s['warmup_ratio']:g}",
    )


# ---------------------------------------------------------------- driver


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-rows", type=int, default=160, help="train rows per task (at most)")
    parser.add_argument("--tasks", default="extract,recall,format", help="comma-separated tasks")
    parser.add_argument("--sweep", action="store_true", help="also train CANDIDATES")
    parser.add_argument("--candidates", default=None, help="comma-separated CANDIDATES names")
    parser.add_argument("--json", type=Path, default=None, help="write every arm as JSON here")
    return parser


def run_rayft_arms(tasks: dict, work: Path) -> list[Arm]:
    import ray

    from rayft.cluster.connect import connect

    os.environ["RAY_ADDRESS"] = "local"  # a fresh embedded cluster, never another one
    cores = os.cpu_count() or 1
    connect(None)
    try:
        arms = []
        for task, (train, _) in tasks.items():
            train_file = work / f"{task}-train.jsonl"
            train_file.write_text("".join(json.dumps(r) + "\n" for r in train), encoding="utf-8")
            arms.append(run_rayft(task, train_file, cores))
        return arms
    finally:
        ray.shutdown()


def print_table(arms: list[Arm], base: dict[str, float], sweep: bool) -> bool:
    """The per-task table; returns whether every task met the target."""
    met = True
    print("\n== held-out loss (mean NLL per answer token; lower is better)")
    print(
        f"{'task':8} {'arm':22} {'steps':>5} {'tokens':>7} {'compute':>8} {'heldout':>8} {'vs TRL':>7}  settings"
    )
    for task in base:
        rows = [a for a in arms if a.task == task]
        trl = next(a for a in rows if a.name == "trl")
        print(f"{task:8} {'base model':22} {'':>5} {'':>7} {'':>8} {base[task]:8.4f}")
        for arm in rows:
            ratio = arm.heldout_loss / trl.heldout_loss
            print(
                f"{task:8} {arm.name:22} {arm.steps:5d} {arm.tokens:7d} {arm.compute:8d} "
                f"{arm.heldout_loss:8.4f} {ratio:7.3f}  {arm.settings}"
            )
            if arm.name == "rayft":
                ok = ratio <= TARGET and arm.compute <= trl.compute
                met = met and ok
                print(
                    f"{task:8} ratio={ratio:.3f} (target <= {TARGET}) "
                    f"compute_ratio={arm.compute / trl.compute:.3f} (target <= 1.0) "
                    f"{'MET' if ok else 'MISSED'}"
                )
    if sweep:
        print("\n== mean ratio to TRL over tasks, per candidate")
        for name in dict.fromkeys(a.name for a in arms):
            ratios = [
                a.heldout_loss
                / next(t for t in arms if t.task == a.task and t.name == "trl").heldout_loss
                for a in arms
                if a.name == name
            ]
            print(f"{name:22} {sum(ratios) / len(ratios):.3f}  worst {max(ratios):.3f}")
    return met


def main() -> None:
    args = build_parser().parse_args()
    from rayft.trainers.data import load_tokenizer
    from rayft.trainers.models import resolve_model
    from rayft.trainers.storage import StorageRoot

    root = StorageRoot.resolve(None)
    model_dir = resolve_model(MODEL, root.models, root)
    tokenizer = load_tokenizer(str(model_dir))
    wanted = args.tasks.split(",")
    tasks = {k: v for k, v in build_tasks(args.train_rows).items() if k in wanted}
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="rayft-defaults-") as tmp:
        work = Path(tmp)
        arms: list[Arm] = run_rayft_arms(tasks, work)
        chosen = args.candidates.split(",") if args.candidates else list(CANDIDATES)
        for task, (train, _) in tasks.items():
            examples = tokenized(train, tokenizer)
            print(f"[bench] {task}: TRL SFTTrainer ({len(examples)} rows) ...", flush=True)
            arms.append(run_sft(task, "trl", examples, model_dir, work, {}))
            for name in chosen if args.sweep else []:
                print(f"[bench] {task}: candidate {name} ...", flush=True)
                arms.append(run_sft(task, name, examples, model_dir, work, CANDIDATES[name]))
        base = {}
        for task, (_, held) in tasks.items():
            examples = tokenized(held, tokenizer)
            base[task] = heldout_loss(model_dir, None, examples)
            for arm in arms:
                if arm.task == task:
                    arm.heldout_loss = heldout_loss(model_dir, arm.adapter, examples)
    met = print_table(arms, base, args.sweep)
    print(
        f"\nwall time {time.time() - started:.0f} s; {len(tasks)} task(s), train rows <= {args.train_rows}"
    )
    if args.json:
        args.json.write_text(
            json.dumps({"base": base, "arms": [asdict(a) for a in arms]}, indent=1)
        )
    print(f"defaults_target={'met' if met else 'missed'}")


if __name__ == "__main__":
    main()
