"""GRPO throughput: rayft ``objective: grpo`` against TRL's ``GRPOTrainer``, prompts per second.

    RAYFT_HOME=/tmp/rfhome .venv/bin/python bench/grpo_throughput.py [--steps 6]
        [--prompts-per-step 4] [--num-generations 4] [--max-new-tokens 16]
        [--rollout-cpus 1] [--json OUT]

Trains ``smollm2-135m-instruct`` with GRPO two ways, one after the other on this machine
(never at the same time):

  (a) rayft: ``run_training`` on the embedded local Ray cluster, ``objective: grpo``, one
      training worker (all cores as torch threads) and one rollout engine (rayft's serving
      engine as a Ray actor, ``grpo.rollout_cpus`` CPUs), grading on a Ray actor, no
      gradient checkpointing (as TRL's arm), optimizer settings at the config defaults
      otherwise (ZeRO-2);
  (b) TRL ``GRPOTrainer`` with a PEFT LoRA config, generating with ``model.generate`` in
      the training process, given its best settings for a CPU: ``bf16=False``,
      ``gradient_checkpointing=False``, torch threads = cores; in a fresh process.

Both take the same prompts in the same order: short arithmetic chat prompts built here
("What is 3 + 4? Reply with only the number."), each with its ``answer``. The reward is an
exact match of the answer text with ``answer`` (rayft: the ``string_check`` grader
``eq``; TRL: a reward function making the same comparison). Same group size
(``num_generations``), same answer length (``grpo.max_new_tokens`` = TRL's
``max_completion_length``), temperature 1, top-p 1, ``--prompts-per-step`` prompts per
optimizer step (TRL: ``per_device_train_batch_size`` = prompts x generations), no
gradient accumulation, ``--steps`` optimizer steps, LoRA r=16 alpha=32 on all linear
layers, dropout 0, AdamW at lr 1e-5 constant, clipping 1.0, float32, ``beta`` 0 (no
reference model), loss ``dapo``, one optimizer pass per generated batch.

What is timed, the same way for both: prompts per second of wall time over optimizer
steps 2..N (step 1 is warm-up); model loading, Ray start-up and the final save are not
timed. rayft's step times come from its ``train`` records (``logging.every_steps=1``):
a step's wall time is its tokens over its ``tokens_per_s`` (the loop's window runs from
the end of one logged step to the end of the next, rollouts included), split into the
rollout phases the records carry (``sync_s``: pushing the LoRA weights to the engine,
``generate_s``, ``grade_s``, ``reference_s``) and training (the rest: the policy's
forward, backward and optimizer step, batching, logging). TRL's come from a
``TrainerCallback`` (``on_step_end`` timestamps); its generation (``_generate``:
templating, ``model.generate``, decoding), rewards (``_calculate_rewards``) and the rest
of scoring (``_generate_and_score_completions`` less those two) are timed by wrapping
those methods, training being the rest of the step.

The last line is ``grpo_speedup_vs_trl=<rayft / TRL prompts/s>`` (target >= 1.5).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MODEL = "smollm2-135m-instruct"
LORA = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}
LR = 1e-5
SEED = 42
MAX_SEQ_LEN = 256
TARGET = 1.5
GRADER = {
    "type": "string_check",
    "name": "exact",
    "input": "{{ sample.output_text }}",
    "reference": "{{ item.answer }}",
    "operation": "eq",
}
RAYFT_PHASES = ("generate_s", "grade_s", "sync_s", "reference_s")
TRL_PHASES = ("generate_s", "reward_s", "score_other_s")


@dataclass
class ArmResult:
    """One arm's optimizer steps: wall time and where it went, per step."""

    name: str
    setup: str
    prompts_per_step: int
    step_s: list[float]
    phases: dict[str, list[float]] = field(default_factory=dict)
    """Seconds of each measured phase, per step (the rest of a step is training)."""
    rewards: list[float] = field(default_factory=list)
    """Mean reward per step."""

    @property
    def timed_s(self) -> float:
        return sum(self.step_s[1:])

    @property
    def timed_prompts(self) -> int:
        return self.prompts_per_step * (len(self.step_s) - 1)

    @property
    def prompts_per_s(self) -> float:
        return self.timed_prompts / self.timed_s if self.timed_s > 0 else float("nan")

    def breakdown(self) -> dict[str, dict[str, float]]:
        """Seconds and share of steps 2..N per phase; ``training_s`` is the rest."""
        total = self.timed_s
        seconds = {name: sum(values[1:]) for name, values in self.phases.items()}
        seconds["training_s"] = total - sum(seconds.values())
        return {
            name: {"s": round(s, 3), "share": round(s / total, 4) if total else float("nan")}
            for name, s in seconds.items()
        }

    def summary(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "steps": len(self.step_s),
            "timed_prompts": self.timed_prompts,
            "timed_s": round(self.timed_s, 3),
            "prompts_per_s": self.prompts_per_s,
            "breakdown": self.breakdown(),
        }


# ---------------------------------------------------------------- prompts


def arithmetic_rows(count: int, seed: int = SEED) -> list[dict[str, Any]]:
    """``count`` chat rows asking for a small sum or difference, each with its ``answer``."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        op = rng.choice("+-")
        value = a + b if op == "+" else a - b
        question = f"What is {a} {op} {b}? Reply with only the number."
        rows.append({"messages": [{"role": "user", "content": question}], "answer": str(value)})
    return rows


# ---------------------------------------------------------------- (a) rayft


def rayft_spec(rows_file: Path, model_dir: Path, args: argparse.Namespace, work: Path) -> Any:
    """The job spec of rayft's arm."""
    from rayft.trainers.config import validate_spec

    return validate_spec(
        {
            "model": {"name": str(model_dir), "dtype": "float32"},
            "data": {"train": str(rows_file), "max_seq_len": MAX_SEQ_LEN, "shuffle": False},
            "objective": "grpo",
            "method": "lora",
            "grpo": {
                "grader": GRADER,
                "num_generations": args.num_generations,
                "max_new_tokens": args.max_new_tokens,
                "temperature": 1.0,
                "top_p": 1.0,
                "beta": 0.0,
                "loss": "dapo",
                "num_iterations": 1,
                "rollout_workers": 1,
                "rollout_cpus": args.rollout_cpus,
            },
            "lora": LORA,
            "optim": {
                "lr": LR,
                "max_steps": args.steps,
                "batch_size": args.prompts_per_step,
                "grad_accum": 1,
                "scheduler": "constant",
                "warmup_ratio": 0.0,
                "weight_decay": 0.0,
                "max_grad_norm": 1.0,
                "seed": SEED,
                # As TRL's arm: no activation recomputation on either side.
                "gradient_checkpointing": False,
            },
            "scaling": {
                "num_workers": 1,
                "cpus_per_worker": os.cpu_count() or 1,
                "use_gpu": False,
            },
            "logging": {"every_steps": 1},
            "output": {"name": "bench-grpo-throughput", "overwrite": True},
            "storage": str(work / "rayft"),
        }
    )


def run_rayft(rows: list[dict], model_dir: Path, args: argparse.Namespace, work: Path) -> ArmResult:
    """GRPO with ``run_training`` on a fresh embedded Ray cluster."""
    import ray

    from rayft.cluster.connect import connect
    from rayft.trainers.driver import run_training

    rows_file = work / "prompts.jsonl"
    rows_file.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    spec = rayft_spec(rows_file, model_dir, args, work)
    # Always a fresh embedded cluster: with no address ray.init would join another Ray
    # instance already running on this machine (its /tmp/ray/ray_current_cluster).
    os.environ["RAY_ADDRESS"] = "local"
    connect(None)
    try:
        outcome = run_training(spec, show_progress=False)
    finally:
        ray.shutdown()
    records = [r for r in outcome.history if r.get("kind") == "train"]
    if [r["step"] for r in records] != list(range(1, args.steps + 1)):
        raise SystemExit(f"rayft logged steps {[r['step'] for r in records]}, not 1..{args.steps}")
    # One worker: tokens_seen is exact, and a step's wall time is its tokens over its rate.
    seen = [0] + [int(r["tokens_seen"]) for r in records]
    step_s = [(seen[i + 1] - seen[i]) / r["tokens_per_s"] for i, r in enumerate(records)]
    setup = (
        f"1 worker x {spec.scaling.cpus_per_worker} CPU (torch threads), ZeRO-"
        f"{spec.deepspeed.zero_stage}, optim.gradient_checkpointing="
        f"{spec.optim.gradient_checkpointing}; 1 rollout engine x {spec.grpo.rollout_cpus} "
        "CPU (serving engine, batched decoding); grading on a Ray actor; embedded Ray"
    )
    return ArmResult(
        name="rayft",
        setup=setup,
        prompts_per_step=args.prompts_per_step,
        step_s=[round(s, 4) for s in step_s],
        phases={p: [round(float(r[p]), 4) for r in records] for p in RAYFT_PHASES},
        rewards=[round(float(r["reward"]), 4) for r in records],
    )


# ---------------------------------------------------------------- (b) TRL


def _timed_grpo_trainer() -> type:
    """``GRPOTrainer`` timing its generation, rewards and scoring; the callback it carries
    closes each optimizer step's record."""
    from transformers import TrainerCallback
    from trl import GRPOTrainer

    class Timed(GRPOTrainer):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.current = dict.fromkeys((*TRL_PHASES, "scoring_s"), 0.0)
            self.steps: list[dict[str, float]] = []
            self.start = 0.0
            self.add_callback(StepClock(self))

        def _lap(self, phase: str, since: float) -> None:
            self.current[phase] += time.perf_counter() - since

        def _generate(self, *args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return super()._generate(*args, **kwargs)
            finally:
                self._lap("generate_s", start)

        def _calculate_rewards(self, *args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return super()._calculate_rewards(*args, **kwargs)
            finally:
                self._lap("reward_s", start)

        def _generate_and_score_completions(self, *args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return super()._generate_and_score_completions(*args, **kwargs)
            finally:
                self._lap("scoring_s", start)

    class StepClock(TrainerCallback):
        def __init__(self, trainer: Timed) -> None:
            self.trainer = trainer

        def on_train_begin(self, args, state, control, **kwargs):
            self.trainer.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            now, current = time.perf_counter(), self.trainer.current
            current["score_other_s"] = (
                current.pop("scoring_s") - current["generate_s"] - current["reward_s"]
            )
            self.trainer.steps.append({"end": now, **current})
            self.trainer.current = dict.fromkeys((*TRL_PHASES, "scoring_s"), 0.0)

    return Timed


def run_trl(rows: list[dict], model_dir: Path, args: argparse.Namespace, work: Path) -> ArmResult:
    """TRL ``GRPOTrainer`` with a PEFT LoRA config on the same prompts."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig

    torch.set_num_threads(os.cpu_count() or 1)

    def exact(completions: list, answer: list[str], **kwargs: Any) -> list[float]:
        # rayft's string_check eq: the answer text equals the reference, character for character.
        return [float(c[0]["content"] == a) for c, a in zip(completions, answer, strict=True)]

    config = GRPOConfig(
        output_dir=str(work / "trl"),
        per_device_train_batch_size=args.prompts_per_step * args.num_generations,
        gradient_accumulation_steps=1,
        num_generations=args.num_generations,
        max_completion_length=args.max_new_tokens,
        temperature=1.0,
        top_p=1.0,
        beta=0.0,
        loss_type="dapo",
        num_iterations=1,
        shuffle_dataset=False,
        max_steps=args.steps,
        learning_rate=LR,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        seed=SEED,
        use_cpu=True,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        dataloader_num_workers=0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
    )
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="sdpa"
    )
    lora = LoraConfig(
        r=LORA["r"],
        lora_alpha=LORA["alpha"],
        lora_dropout=LORA["dropout"],
        target_modules=LORA["target_modules"],
        task_type="CAUSAL_LM",
        bias="none",
    )
    dataset = Dataset.from_list([{"prompt": r["messages"], "answer": r["answer"]} for r in rows])
    trainer = _timed_grpo_trainer()(
        model=model,
        reward_funcs=exact,
        args=config,
        train_dataset=dataset,
        processing_class=AutoTokenizer.from_pretrained(model_dir),
        peft_config=lora,
    )
    trainer.train()
    ends = [trainer.start] + [s["end"] for s in trainer.steps]
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    setup = (
        f"GRPOTrainer + peft_config, model.generate in process, bf16=False, "
        f"gradient_checkpointing=False, torch threads {torch.get_num_threads()}"
    )
    return ArmResult(
        name="trl",
        setup=setup,
        prompts_per_step=args.prompts_per_step,
        step_s=[round(ends[i + 1] - ends[i], 4) for i in range(len(trainer.steps))],
        phases={p: [round(s[p], 4) for s in trainer.steps] for p in TRL_PHASES},
        rewards=[round(float(r), 4) for r in rewards],
    )


def _child_main(conn: Any, args: tuple) -> None:
    conn.send(run_trl(*args).summary())  # plain data: the class lives in this spawned module
    conn.close()


def in_fresh_process(*args: Any) -> ArmResult:
    """TRL's arm in a new (spawned) process: its threads and memory are its own."""
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child_main, args=(child, args))
    proc.start()
    child.close()
    try:
        data = parent.recv()
    except EOFError:
        data = None  # the process died before sending (its exit code says why)
    proc.join()
    if data is None or proc.exitcode != 0:
        raise SystemExit(f"TRL's arm failed in its process (exit code {proc.exitcode})")
    keys = ("name", "setup", "prompts_per_step", "step_s", "phases", "rewards")
    return ArmResult(**{k: data[k] for k in keys})


# ---------------------------------------------------------------- report


def print_arm(label: str, res: ArmResult) -> None:
    """Throughput, then where steps 2..N went."""
    print(
        f"{label:<14} {res.prompts_per_s:7.3f} prompts/s  ({res.timed_prompts} prompts in "
        f"{res.timed_s:.2f} s over steps 2..{len(res.step_s)}; step 1 took {res.step_s[0]:.2f} s)"
    )
    print(f"{'':<14} {res.setup}")
    parts = ", ".join(
        f"{name[:-2]} {v['s']:.2f} s ({100 * v['share']:.1f}%)"
        for name, v in res.breakdown().items()
    )
    print(f"{'':<14} steps 2..N: {parts}")
    print(f"{'':<14} step seconds {res.step_s}; mean reward per step {res.rewards}")


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps, both arms")
    parser.add_argument("--prompts-per-step", type=int, default=4)
    parser.add_argument("--num-generations", type=int, default=4, help="answers per prompt")
    parser.add_argument(
        "--max-new-tokens", type=int, default=16, help="TRL's max_completion_length"
    )
    parser.add_argument("--rollout-cpus", type=float, default=1.0, help="rayft's grpo.rollout_cpus")
    parser.add_argument("--json", metavar="OUT", help="also write the summary to this JSON file")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    if args.steps < 2:
        raise SystemExit("--steps must be at least 2: step 1 is warm-up and not timed")
    from rayft.trainers.models import pull_builtin
    from rayft.trainers.storage import StorageRoot

    model_dir = pull_builtin(MODEL, StorageRoot.resolve().models)
    rows = arithmetic_rows(args.steps * args.prompts_per_step)
    print(
        f"model {MODEL}, LoRA r={LORA['r']} all-linear, lr {LR}, float32, beta 0, loss dapo; "
        f"{args.steps} steps x {args.prompts_per_step} prompts x {args.num_generations} "
        f"answers of at most {args.max_new_tokens} tokens; {os.cpu_count()} cores",
        flush=True,
    )
    work = Path(tempfile.mkdtemp(prefix="rayft-bench-grpo-"))
    try:
        print("\n[a] rayft objective grpo ...", flush=True)
        ours = run_rayft(rows, model_dir, args, work)
        print("\n[b] TRL GRPOTrainer ...", flush=True)
        trl = in_fresh_process(rows, model_dir, args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print()
    print_arm("(a) rayft", ours)
    print_arm("(b) TRL", trl)
    ratio = ours.prompts_per_s / trl.prompts_per_s
    summary = {
        "params": {**vars(args), "model": MODEL, "lora": LORA, "lr": LR, "cores": os.cpu_count()},
        "rayft": ours.summary(),
        "trl": trl.summary(),
        "rayft_prompts_per_s": ours.prompts_per_s,
        "trl_prompts_per_s": trl.prompts_per_s,
        "speedup_vs_trl": ratio,
        "target": TARGET,
        "met": ratio >= TARGET,
    }
    print(json.dumps(summary, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
        print(f"summary written to {args.json}")
    sys.stdout.flush()
    print(
        f"grpo_speedup_vs_trl={ratio:.3f}  (rayft / TRL GRPOTrainer prompts/s; target >= "
        f"{TARGET}: {'met' if ratio >= TARGET else 'NOT met'})"
    )


if __name__ == "__main__":
    main()
