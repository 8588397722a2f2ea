"""The driver's console: lines per record, one bar whose rate and ETA exclude start-up."""

from __future__ import annotations

import io

import pytest

from rayft.trainers.progress import (
    RECEIVED_AT,
    ConsoleProgress,
    format_record,
    message_record,
    pace,
)


def train(step: int, at: float, total: int = 10) -> dict:
    return {
        "kind": "train",
        "step": step,
        "total_steps": total,
        "loss": 2.0 - step / 10,
        "lr": 1e-3,
        "tokens_per_s": 100.0,
        "epoch": 0,
        RECEIVED_AT: at,
    }


def test_rate_and_eta_count_from_the_first_step_not_from_start_up() -> None:
    out = io.StringIO()
    progress = ConsoleProgress(file=out)
    # 100 s of start-up and an evaluation at step 0 before the first step ...
    progress.update([{"kind": "eval", "step": 0, "total_steps": 10, "eval_loss": 3.0}])
    assert progress.bar is None
    # ... then steps 2 s apart, all drained by the driver in one batch.
    progress.update([train(1, at=100.0), train(2, at=102.0), train(3, at=104.0)])
    assert progress.seconds_per_step == pytest.approx(2.0)
    assert progress.eta_s == pytest.approx(14.0)  # 7 steps left
    assert progress.bar.n == 3
    progress.close()
    text = out.getvalue()
    assert "eval  step 0/10" in text and "train step 3/10" in text
    assert "2.00 s/step" in text and "ETA 00:14" in text


def test_a_resumed_run_measures_only_the_steps_it_runs() -> None:
    progress = ConsoleProgress(file=io.StringIO())
    progress.update([train(7, at=50.0), train(8, at=53.0)])
    assert progress.bar.n == 8
    assert progress.seconds_per_step == pytest.approx(3.0)
    assert progress.eta_s == pytest.approx(6.0)


def test_pace_needs_two_steps() -> None:
    assert pace(1, 10.0, 1, 10.0, 5) == (None, None)
    assert pace(1, 10.0, 3, 14.0, 5) == (2.0, 4.0)
    assert pace(1, 10.0, 5, 18.0, 5) == (2.0, 0.0)


def test_worker_messages_are_printed_as_lines() -> None:
    out = io.StringIO()
    progress = ConsoleProgress(file=out)
    progress.update([message_record("[rayft] resumed from step 4 (epoch 0)"), train(5, at=1.0)])
    progress.update([message_record("[rayft] a later line")])
    progress.close()
    lines = out.getvalue()
    assert "[rayft] resumed from step 4 (epoch 0)\n" in lines
    assert "[rayft] a later line" in lines
    assert format_record(message_record("x")) == "x"


def test_disabled_progress_prints_nothing() -> None:
    out = io.StringIO()
    progress = ConsoleProgress(enabled=False, file=out)
    progress.update([train(1, at=0.0), message_record("hidden")])
    progress.close()
    assert out.getvalue() == "" and progress.bar is None


def test_records_of_other_kinds_are_not_printed() -> None:
    out = io.StringIO()
    progress = ConsoleProgress(file=out)
    progress.update([{"kind": "checkpoint", "step": 2, "path": "/x"}, {"kind": "later_kind"}])
    progress.write("[rayft] a notice from the driver")
    progress.close()
    assert out.getvalue() == "[rayft] a notice from the driver\n"
