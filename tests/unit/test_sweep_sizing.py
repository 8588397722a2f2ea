"""Trial sizing, scheduler/search construction and the results table (no Ray cluster)."""

from __future__ import annotations

import csv
import json

import pytest

from rayft.raytune.results import (
    EARLY_STOPPED,
    FINISHED,
    format_table,
    plot_curves,
    sort_rows,
    table_columns,
    trial_state,
    write_tables,
)
from rayft.raytune.schedulers import default_max_concurrent, expected_trials, max_concurrent
from rayft.trainers.config import ConfigError, ScalingSpec, validate_spec


def scaling(**kw) -> ScalingSpec:
    return ScalingSpec(**kw)


@pytest.mark.parametrize(
    ("cpus", "gpus", "kw", "want"),
    [
        (4, 0, {"num_workers": 1}, 3),  # one CPU stays free for Ray Data
        (4, 0, {"num_workers": 2}, 1),
        (16, 0, {"num_workers": 2, "cpus_per_worker": 2}, 3),
        (2, 0, {"num_workers": 2}, 1),  # fits exactly, no headroom: still one trial
        (32, 4, {"num_workers": 2}, 2),  # GPUs bound it: 2 GPUs per trial
        (32, 4, {"num_workers": 1, "use_gpu": False}, 31),
        (32, 8, {"num_workers": 1, "cpus_per_worker": 4}, 7),  # CPUs bound it
    ],
)
def test_default_max_concurrent(cpus, gpus, kw, want):
    assert default_max_concurrent(cpus, gpus, scaling(**kw)) == want


def test_trials_never_ask_for_more_than_the_cluster_has():
    for cpus in (4, 5, 8, 13):
        for workers in (1, 2, 3):
            s = scaling(num_workers=workers)
            n = default_max_concurrent(cpus, 0, s)
            assert n >= 1
            assert n == 1 or n * workers <= cpus - 1


def test_a_trial_larger_than_the_cluster_is_an_error():
    with pytest.raises(ConfigError) as err:
        default_max_concurrent(4, 0, scaling(num_workers=8))
    assert err.value.problems[0][0] == "scaling.num_workers"
    with pytest.raises(ConfigError):
        default_max_concurrent(8, 1, scaling(num_workers=2, use_gpu=True))


def test_explicit_max_concurrent_trials_wins():
    spec = validate_spec(
        {
            "data": {"train": "x.jsonl", "eval_fraction": 0.1},
            "scaling": {"num_workers": 1},
            "tune": {"max_concurrent_trials": 5},
        }
    )
    assert max_concurrent(spec, {"CPU": 4.0}) == 5
    spec = validate_spec(
        {
            "data": {"train": "x.jsonl", "eval_fraction": 0.1},
            "scaling": {"num_workers": 1},
            "tune": {},
        }
    )
    assert max_concurrent(spec, {"CPU": 4.0}) == 3


def test_expected_trials_multiplies_grids():
    space = {
        "lora.r": {"grid": [4, 8, 16]},
        "optim.lr": {"loguniform": [1e-5, 1e-3]},
        "lora.alpha": {"choice": [8, 16]},
    }
    assert expected_trials(space, 2, "random") == 6
    assert expected_trials(space | {"optim.lr": {"grid": [1e-3]}}, 1, "grid") == 6


def test_trial_state_tells_finished_from_early_stopped():
    assert trial_state("TERMINATED", {"final": True}) == FINISHED
    assert trial_state("TERMINATED", {"final": False, "eval_step": 4}) == EARLY_STOPPED
    assert trial_state("ERROR", {}) == "error"
    assert trial_state("PENDING", None) == "unfinished"


def test_results_table_is_sorted_and_written(tmp_path):
    rows = [
        {"trial": 0, "optim.lr": 1e-3, "step": 8, "eval_loss": 2.5, "state": FINISHED},
        {
            "trial": 1,
            "optim.lr": 10.0,
            "step": 2,
            "eval_loss": float("inf"),
            "state": EARLY_STOPPED,
        },
        {"trial": 2, "optim.lr": 3e-3, "step": 8, "eval_loss": 2.1, "state": FINISHED},
        {"trial": 3, "optim.lr": 1e-4, "step": None, "eval_loss": None, "state": "error"},
    ]
    ordered = sort_rows(rows, "eval_loss", "min")
    assert [r["trial"] for r in ordered] == [2, 0, 1, 3]
    assert [r["rank"] for r in ordered] == [1, 2, 3, 4]
    assert [r["trial"] for r in sort_rows(rows, "eval_loss", "max")][:2] == [1, 0]
    columns = table_columns(ordered, ["optim.lr"], "eval_loss")
    assert columns[:6] == ["rank", "trial", "optim.lr", "step", "eval_loss", "state"]
    text = format_table(ordered, columns)
    assert text.splitlines()[1].split()[:3] == ["1", "2", "0.003"]
    csv_path, json_path = write_tables(tmp_path, ordered, columns, {"sweep_id": "s"})
    with open(csv_path) as handle:
        table = list(csv.DictReader(handle))
    assert [r["trial"] for r in table] == ["2", "0", "1", "3"]
    assert table[2]["state"] == EARLY_STOPPED
    data = json.loads(json_path.read_text())
    assert data["sweep_id"] == "s" and data["trials"][0]["trial"] == 2


def test_plot_is_a_png(tmp_path):
    path = plot_curves(
        tmp_path / "p.png",
        {"trial 0": [(2, 3.0), (4, 2.5)], "trial 1": [(2, float("inf"))]},
        {"trial 0": FINISHED, "trial 1": EARLY_STOPPED},
        "eval_loss",
        "t",
    )
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
