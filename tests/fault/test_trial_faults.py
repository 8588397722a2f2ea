"""A sweep trial that crashes: recorded as errored, the sweep goes on, resume retries it.

The search space names a training file that does not exist yet, so that trial's run
raises at runtime (inside the trial, after the sweep started). The other trial trains
and is published. Once the file exists, ``rayft tune --resume`` reruns only the errored
trial and it finishes.
"""

from __future__ import annotations

import json

import pytest
from specs import tiny_spec

from rayft.raytune.sweep import TRIALS_DIR, run_sweep, sweep_path
from rayft.trainers.config import validate_spec
from rayft.trainers.registry import adapter_path
from rayft.trainers.storage import StorageRoot

pytestmark = [pytest.mark.fault, pytest.mark.slow]


def test_a_crashing_trial_is_recorded_the_sweep_goes_on_and_resume_retries_it(
    ray_cluster, rayft_home, tmp_path, color_chats
) -> None:
    good = color_chats(tmp_path / "colors.jsonl", 32, colors=4)
    late = tmp_path / "late.jsonl"  # trial 0's data: missing when the sweep starts
    spec = validate_spec(
        tiny_spec(
            good,
            data={"format": "chat", "max_seq_len": 64, "eval_fraction": 0.25},
            method="lora",
            lora={"r": 4, "alpha": 8, "dropout": 0.0},
            # One evaluation and one checkpoint per run: the test is about the trial's
            # fate, not its training.
            optim={"max_steps": 2, "batch_size": 4, "scheduler": "constant"},
            scaling={"num_workers": 1, "max_failures": 1},
            eval={"every_steps": 2, "at_start": False},
            checkpoint={"every_steps": 2, "keep": 1},
            output={"name": "crashy"},
            tune={
                "search_space": {"data.train": {"grid": [str(late), str(good)]}},
                "scheduler": {"type": "none"},
                "max_concurrent_trials": 1,
            },
        )
    )
    outcome = run_sweep(spec, sweep_id="crashy-sweep", show_progress=False)
    states = {r["trial"]: r["state"] for r in outcome.rows}
    assert states == {0: "error", 1: "finished"}
    [failed] = outcome.by_state("error")
    assert "late.jsonl" in failed["error"] and "not found" in failed["error"]
    # The sweep went on: trial 1 ran after trial 0 crashed and is the published best.
    assert outcome.best["trial"] == 1 and outcome.artifact == adapter_path(
        "crashy", StorageRoot.resolve()
    )
    trials = sweep_path("crashy-sweep", StorageRoot.resolve()) / TRIALS_DIR
    assert "late.jsonl" in json.loads((trials / "0.json").read_text())["error"]
    results = json.loads(
        (sweep_path("crashy-sweep", StorageRoot.resolve()) / "results.json").read_text()
    )
    assert results["errored"] == [0]

    # The cause is fixed; resume retries the errored trial only.
    color_chats(late, 32, colors=4)
    resumed = run_sweep(spec, sweep_id="crashy-sweep", resume=True, show_progress=False)
    assert {r["trial"]: r["state"] for r in resumed.rows} == {0: "finished", 1: "finished"}
    starts = {k: (trials / f"{k}.starts.jsonl").read_text().splitlines() for k in (0, 1)}
    assert len(starts[0]) == 2 and len(starts[1]) == 1
    record = json.loads((trials / "0.json").read_text())
    assert "error" not in record and record["metrics"]["step"] == 2
    assert (
        json.loads(
            (sweep_path("crashy-sweep", StorageRoot.resolve()) / "results.json").read_text()
        )["errored"]
        == []
    )
