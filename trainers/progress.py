"""Live progress from the training workers to the driver: a bar and a line per logging step.

Rank 0 pushes small metric records to a named actor; the driver drains it while
``TorchTrainer.fit`` runs in a background thread. Records are also what the
TensorBoard writer on rank 0 logs, so the console and the event files agree.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

import ray

RECEIVED_AT = "received_at"
"""Key the sink adds to every record: when it arrived (the sink's clock, seconds)."""


@ray.remote(num_cpus=0)
class ProgressSink:
    """A mailbox of metric records, one per logging/eval step."""

    def __init__(self) -> None:
        self._records: list[dict[str, Any]] = []

    def push(self, record: dict[str, Any]) -> None:
        # Stamped on arrival, a few milliseconds after rank 0 sent it: the driver drains
        # in batches, so its own clock cannot tell how far apart the steps were.
        self._records.append({**record, RECEIVED_AT: time.time()})

    def drain(self) -> list[dict[str, Any]]:
        records, self._records = self._records, []
        return records


def sink_name(run_id: str) -> str:
    return f"rayft-progress-{run_id}"


MESSAGE = "message"
"""Record kind of a line of text from a worker (``[rayft] resumed from step 4 ...``)."""


SHOWN_KINDS = ("train", "eval", MESSAGE)
"""Record kinds that get a console line; others are for the run's other readers."""


def message_record(text: str) -> dict[str, Any]:
    """A record that prints ``text`` on the driver's console.

    Workers send their lines this way rather than printing them: worker output stays in
    Ray's log files unless ``--verbose``, and a line from the sink is printed above the
    progress bar instead of through it.
    """
    return {"kind": MESSAGE, "text": text}


def format_record(record: dict[str, Any]) -> str:
    """One console line for a metric or message record."""
    if record.get("kind") == MESSAGE:
        return str(record.get("text", ""))
    step = record.get("step", 0)
    total = record.get("total_steps", "?")
    if record.get("kind") == "eval":
        parts = [f"eval  step {step}/{total}"]
        if "eval_loss" in record:
            parts.append(f"eval_loss {record['eval_loss']:.4f}")
        if "eval_perplexity" in record:
            parts.append(f"eval_ppl {record['eval_perplexity']:.3f}")
        if "eval_reward" in record:
            parts.append(f"eval_reward {record['eval_reward']:.4f}")
        parts.append(f"({record.get('eval_tokens', 0)} tokens)")
        return "  ".join(parts)
    line = (
        f"train step {step}/{total}  loss {record['loss']:.4f}  lr {record['lr']:.3e}  "
        f"tokens/s {record['tokens_per_s']:.0f}  epoch {record.get('epoch', 0)}"
    )
    if "reward" in record:  # objective grpo: the mean grade of the step's sampled answers
        line += f"  reward {record['reward']:.4f}"
    return line


def pace(
    first_step: int, first_time: float, step: int, now: float, total: int
) -> tuple[float | None, float | None]:
    """Seconds per step and seconds left, measured from the first training step seen.

    Returns ``(None, None)`` until a second step has arrived.
    """
    done = step - first_step
    if done <= 0 or now <= first_time:
        return None, None
    per_step = (now - first_time) / done
    return per_step, per_step * max(total - step, 0)


class ConsoleProgress:
    """One tqdm bar plus printed lines, fed from the records rank 0 sends.

    The bar starts at the first training-step record and measures its rate and ETA from
    there, with the times the records reached the sink: the workers' start-up, data
    loading, an evaluation at step 0 and the steps a resumed run had already done are
    not in them, and neither is the batching of records on their way to the driver.
    """

    BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} {postfix}"

    def __init__(self, enabled: bool = True, file: TextIO | None = None) -> None:
        self.enabled = enabled
        self._file = file
        self._bar: Any = None
        self._first: tuple[int, float] | None = None
        self.seconds_per_step: float | None = None
        self.eta_s: float | None = None

    @property
    def bar(self) -> Any:
        """The tqdm bar, or None before the first training step."""
        return self._bar

    def update(self, records: list[dict[str, Any]]) -> None:
        """Print each record's line and move the bar to its step."""
        if not self.enabled:
            return
        for record in records:
            kind = record.get("kind")
            if kind not in SHOWN_KINDS:
                continue  # records for other readers (checkpoints, restarts: the driver's)
            if self._bar is None and kind == "train" and record.get("total_steps"):
                self._start_bar(record, self._file or sys.stderr)
            self.write(format_record(record))
            if kind == "train":
                self._advance(record)

    def write(self, line: str) -> None:
        """Print ``line`` above the bar (or plainly before it exists), even when disabled."""
        file = self._file or sys.stderr
        if self._bar is None:
            print(line, file=file, flush=True)
        else:
            self._bar.write(line, file=file)

    def _start_bar(self, record: dict[str, Any], file: TextIO) -> None:
        from tqdm import tqdm

        self._first = (record.get("step", 0), record.get(RECEIVED_AT) or time.time())
        self._bar = tqdm(
            total=record["total_steps"],
            initial=self._first[0],
            desc="training",
            unit="step",
            file=file,
            dynamic_ncols=True,
            leave=True,
            bar_format=self.BAR_FORMAT,
        )

    def _advance(self, record: dict[str, Any]) -> None:
        from tqdm import tqdm

        step = record.get("step", 0)
        now = record.get(RECEIVED_AT) or time.time()
        first_step, first_time = self._first or (step, now)
        self.seconds_per_step, self.eta_s = pace(first_step, first_time, step, now, self._bar.total)
        if step > self._bar.n:
            self._bar.n = step
        parts = [f"loss {record['loss']:.3f}"]
        if self.seconds_per_step is not None:
            parts.append(f"{self.seconds_per_step:.2f} s/step")
            parts.append(f"ETA {tqdm.format_interval(self.eta_s)}")
        self._bar.set_postfix_str(", ".join(parts))  # also redraws the bar at its new step

    def close(self) -> None:
        """End the bar (it stays on screen)."""
        if self._bar is not None:
            self._bar.close()
