"""Live progress from the training workers to the driver: a bar and a line per logging step.

Rank 0 pushes small metric records to a named actor; the driver drains it while
``TorchTrainer.fit`` runs in a background thread. Records are also what the
TensorBoard writer on rank 0 logs, so the console and the event files agree.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any

import ray


@ray.remote(num_cpus=0)
class ProgressSink:
    """A mailbox of metric records, one per logging/eval step."""

    def __init__(self) -> None:
        self._records: list[dict[str, Any]] = []

    def push(self, record: dict[str, Any]) -> None:
        self._records.append(record)

    def drain(self) -> list[dict[str, Any]]:
        records, self._records = self._records, []
        return records


def sink_name(run_id: str) -> str:
    return f"rayft-progress-{run_id}"


def format_record(record: dict[str, Any]) -> str:
    """One console line for a metric record."""
    step = record.get("step", 0)
    total = record.get("total_steps", "?")
    if record.get("kind") == "eval":
        parts = [f"eval  step {step}/{total}"]
        if "eval_loss" in record:
            parts.append(f"eval_loss {record['eval_loss']:.4f}")
        if "eval_perplexity" in record:
            parts.append(f"eval_ppl {record['eval_perplexity']:.3f}")
        parts.append(f"({record.get('eval_tokens', 0)} tokens)")
        return "  ".join(parts)
    return (
        f"train step {step}/{total}  loss {record['loss']:.4f}  lr {record['lr']:.3e}  "
        f"tokens/s {record['tokens_per_s']:.0f}  epoch {record.get('epoch', 0)}"
    )


class ConsoleProgress:
    """A tqdm bar plus printed lines, fed from the records rank 0 sends."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._bar = None
        self.history: list[dict[str, Any]] = []
        self._start = time.time()

    def update(self, records: list[dict[str, Any]]) -> None:
        for record in records:
            self.history.append(record)
            if not self.enabled:
                continue
            if self._bar is None and record.get("total_steps"):
                from tqdm import tqdm

                self._bar = tqdm(
                    total=record["total_steps"],
                    desc="training",
                    unit="step",
                    file=sys.stderr,
                    dynamic_ncols=True,
                    leave=True,
                )
                self._bar.update(record.get("step", 0))
            line = format_record(record)
            if self._bar is not None:
                self._bar.write(line, file=sys.stderr)
                advance = record.get("step", 0) - self._bar.n
                if advance > 0:
                    self._bar.update(advance)
                if record.get("kind") == "train":
                    self._bar.set_postfix(loss=f"{record['loss']:.3f}")
            else:
                print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def evals(self) -> list[dict[str, Any]]:
        return [r for r in self.history if r.get("kind") == "eval"]


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 50 else float("inf")
