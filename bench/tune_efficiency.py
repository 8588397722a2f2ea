"""ASHA against no early stopping: the same search space and seed, best metric and steps spent.

Runs two sweeps over ``optim.lr`` (random search, same seed, hence the same trials):
one with ASHA, one with every trial trained to the full budget. Reports the best
``eval_loss`` each found and the optimizer steps each spent (counted from each run's
per-step data log, so a stopped trial counts the steps it really trained).
Target: ASHA's best within 2% of the full-budget best using at most 40% of its steps.

Defaults: SmolLM2-135M-Instruct, LoRA r8 on all linear layers, 16 trials over
``optim.lr ~ loguniform(1e-5, 3e-2)`` with warmup + cosine decay, 24 steps of 4
conversations each, eval every 3 steps on a held-out 15% of ``bench/data/chat_varlen.jsonl``
(a loss floor well above zero, so a 2% gap is a real difference), two trials at a time.

    .venv/bin/python bench/tune_efficiency.py                        # smollm2, ~30 min on 2 cores
    .venv/bin/python bench/tune_efficiency.py --model tiny-llama     # minutes

The last line is ``asha_step_fraction=<ratio>``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--train", default=str(REPO / "bench/data/chat_varlen.jsonl"))
    p.add_argument("--eval", default=None, help="eval file (default: 15%% of --train)")
    p.add_argument("--lr-range", type=float, nargs=2, default=(1e-5, 3e-2))
    p.add_argument("--trials", type=int, default=16)
    p.add_argument("--max-steps", type=int, default=24)
    p.add_argument("--eval-every", type=int, default=3)
    p.add_argument("--reduction-factor", type=float, default=3)
    p.add_argument("--concurrent", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--home", default=None, help="RAYFT_HOME for the runs (default: a temp dir)")
    return p.parse_args()


def sweep_spec(args: argparse.Namespace, name: str, scheduler: dict) -> dict:
    return {
        "model": {"name": args.model},
        "data": {
            "train": args.train,
            "eval": args.eval,
            "eval_fraction": 0.0 if args.eval else 0.15,
            "format": "chat",
            "max_seq_len": args.seq_len,
        },
        "method": "lora",
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"},
        "optim": {
            "lr": 1e-3,
            "max_steps": args.max_steps,
            "batch_size": 4,
            "scheduler": "cosine",
            "warmup_ratio": 0.1,
            "seed": args.seed,
        },
        "scaling": {"num_workers": 1},
        "eval": {"every_steps": args.eval_every, "at_start": False},
        "checkpoint": {"every_steps": args.max_steps, "keep": 1},
        "output": {"name": name, "overwrite": True},
        "tune": {
            "search_space": {"optim.lr": {"loguniform": list(args.lr_range)}},
            "num_samples": args.trials,
            "metric": "eval_loss",
            "mode": "min",
            "scheduler": scheduler,
            "search": "random",
            "max_concurrent_trials": args.concurrent,
        },
    }


def steps_trained(home: Path, run_id: str, fallback: int | None) -> int:
    """Optimizer steps a run really took, from rank 0's per-micro-batch data log."""
    log = home / "runs" / run_id / "data_order" / "rank0.jsonl"
    if not log.is_file():
        return int(fallback or 0)
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines() if line]
    return max(steps, default=int(fallback or 0))


def run(args: argparse.Namespace, label: str, scheduler: dict, home: Path) -> dict:
    from rayft.raytune.sweep import run_sweep
    from rayft.trainers.config import validate_spec

    spec = validate_spec(sweep_spec(args, f"bench-{label}", scheduler))
    start = time.time()
    outcome = run_sweep(spec, sweep_id=f"bench-{label}-{int(start)}", show_progress=False)
    finished = [r for r in outcome.rows if r["state"] == "finished"]
    steps = sum(steps_trained(home, r["run_id"], r.get("step")) for r in outcome.rows)
    return {
        "label": label,
        "best": finished[0]["eval_loss"] if finished else float("nan"),
        "best_lr": finished[0]["optim.lr"] if finished else None,
        "steps": steps,
        "states": {
            s: sum(r["state"] == s for r in outcome.rows)
            for s in ("finished", "early_stopped", "error")
        },
        "lrs": sorted(round(r["optim.lr"], 8) for r in outcome.rows),
        "seconds": time.time() - start,
    }


def main() -> None:
    args = parse_args()
    home = Path(args.home or tempfile.mkdtemp(prefix="rayft-bench-tune-"))
    os.environ["RAYFT_HOME"] = str(home)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    from rayft.cluster.connect import connect

    connect(None)
    try:
        asha = run(
            args,
            "asha",
            {"type": "asha", "grace_period": 1, "reduction_factor": args.reduction_factor},
            home,
        )
        full = run(args, "full", {"type": "none"}, home)
    finally:
        ray.shutdown()
    assert asha["lrs"] == full["lrs"], "the two sweeps sampled different trials"
    gap = (asha["best"] - full["best"]) / abs(full["best"])
    fraction = asha["steps"] / full["steps"]
    print(
        f"model={args.model} trials={args.trials} max_steps={args.max_steps} "
        f"eval_every={args.eval_every} reduction_factor={args.reduction_factor:g} "
        f"seed={args.seed} lr~loguniform{tuple(args.lr_range)} "
        f"data={Path(args.train).name}{'' if args.eval else ' (15% held out)'}"
    )
    for r in (asha, full):
        print(
            f"{r['label']:<5} best_eval_loss={r['best']:.4f} (lr {r['best_lr']:.3g})  "
            f"steps={r['steps']}  trials={r['states']}  {r['seconds']:.0f}s"
        )
    print(
        f"asha_best_gap={gap:+.4f} (target <= 0.02)  target_met={gap <= 0.02 and fraction <= 0.40}"
    )
    print(f"asha_step_fraction={fraction:.4f}")


if __name__ == "__main__":
    main()
