"""Search-space translation and validation against the job-spec schema (no Ray cluster)."""

from __future__ import annotations

import math

import pytest
from harness import SWEEP_BASE, sweep_spec

from rayft.raytune.schedulers import (
    SCHEDULER_CLOCK,
    TRIAL_NUMBER,
    scheduler_budget,
    scheduler_report,
)
from rayft.raytune.search_space import (
    apply_values,
    parse_entry,
    probe_values,
    to_tune,
    validate_search_space,
)
from rayft.raytune.sweep import trial_index, trial_spec, validate_sweep
from rayft.trainers.config import ConfigError, validate_spec

BASE = SWEEP_BASE


def problems(err: pytest.ExceptionInfo[ConfigError]) -> dict[str, str]:
    return dict(err.value.problems)


def test_grid_search_turns_choices_into_grids_and_refuses_ranges():
    space = {"lora.r": {"choice": [4, 8]}, "optim.lr": {"grid": [1e-3, 1e-4]}}
    out = to_tune(space, search="grid")
    assert out == {"lora.r": {"grid_search": [4, 8]}, "optim.lr": {"grid_search": [1e-3, 1e-4]}}
    with pytest.raises(ConfigError) as err:
        to_tune({"optim.lr": {"uniform": [0.1, 0.2]}}, search="grid")
    assert "tune.search_space.optim.lr" in problems(err)


def test_model_based_search_refuses_a_grid():
    with pytest.raises(ConfigError) as err:
        to_tune({"lora.r": {"grid": [4, 8]}}, search="optuna")
    assert "grid" in problems(err)["tune.search_space.lora.r"]


def test_unknown_key_is_named():
    space = {"optim.learning_rate": {"loguniform": [1e-5, 1e-2]}}
    with pytest.raises(ConfigError) as err:
        validate_search_space(BASE, space)
    found = problems(err)
    assert list(found) == ["tune.search_space.optim.learning_rate"]
    assert "not a job-spec key" in found["tune.search_space.optim.learning_rate"]
    assert "tune.search_space.optim.learning_rate" in str(err.value)


@pytest.mark.parametrize(
    ("entry", "says"),
    [
        ({"loguniform": [0.0, 1e-2]}, "0 < lo"),
        ({"loguniform": [1e-2, 1e-5]}, "lo < hi"),
        ({"uniform": [0.1]}, "[lo, hi]"),
        ({"normal": [0.0, 1.0]}, "unknown distribution"),
        ({"choice": []}, "non-empty list"),
        ({"randint": [4, 4]}, "lo < hi"),
        ({"randint": [1.5, 4]}, "two integers"),
        ({"uniform": [0.1, 0.2], "choice": [1]}, "exactly one"),
        ("1e-3", "exactly one"),
    ],
)
def test_invalid_distribution_is_named(entry, says):
    with pytest.raises(ConfigError) as err:
        validate_search_space(BASE, {"optim.lr": entry})
    assert says in problems(err)["tune.search_space.optim.lr"]


def test_values_the_schema_rejects_are_errors_before_any_trial():
    # lr must be > 0 (the schema), zero_stage one of 0-3, warmup_ratio ≤ 1.
    cases = {
        "optim.lr": {"uniform": [-1e-3, 1e-3]},
        "deepspeed.zero_stage": {"grid": [2, 4]},
        "optim.warmup_ratio": {"uniform": [0.5, 1.5]},
        "lora.r": {"uniform": [4, 16]},  # a float rank: the interior value is not an int
        "method": {"choice": ["lora", "prefix-tuning"]},
    }
    for key, entry in cases.items():
        with pytest.raises(ConfigError) as err:
            validate_search_space(BASE, {key: entry})
        assert f"tune.search_space.{key}" in problems(err), key
        assert "rejected" in problems(err)[f"tune.search_space.{key}"]


def test_cross_field_rules_apply_to_searched_values():
    base = {**BASE, "deepspeed": {"offload_params": True, "zero_stage": 3}, "method": "full"}
    with pytest.raises(ConfigError) as err:
        validate_search_space(base, {"deepspeed.zero_stage": {"grid": [2, 3]}})
    assert "ZeRO stage 3" in problems(err)["tune.search_space.deepspeed.zero_stage"]


def test_sweep_cannot_vary_its_own_section_or_output():
    for key in ("tune.metric", "output.name", "storage"):
        with pytest.raises(ConfigError) as err:
            validate_search_space(BASE, {key: {"choice": ["a", "b"]}})
        assert f"tune.search_space.{key}" in problems(err)


def test_probe_values_cover_ends_and_an_interior_point():
    assert probe_values("choice", [1, 2, 3]) == [1, 2, 3]
    assert probe_values("randint", [2, 9]) == [2, 5, 8]
    lo, mid, hi = probe_values("loguniform", [1e-5, 1e-1])
    assert (lo, hi) == (1e-5, 1e-1) and 1e-5 < mid < 1e-1
    assert parse_entry("x", {"uniform": [0, 1]}) == ("uniform", [0.0, 1.0])


def test_trial_spec_sets_values_and_names_the_trial_artifact():
    spec = sweep_spec({"lora.r": {"grid": [4, 8]}, "optim.lr": {"choice": [1e-3]}})
    sweep = {"base": {**spec.to_dict(), "tune": None}, "name": "colors"}
    trial = trial_spec(sweep, {"lora.r": 8, "optim.lr": 1e-3}, 3)
    assert trial.lora.r == 8 and trial.optim.lr == 1e-3
    assert trial.output.name == "colors-trial-3" and trial.output.overwrite
    assert trial.tune is None
    assert apply_values({"a": {"b": 1}}, {"a.b": 2, "c.d": 3}) == {"a": {"b": 2}, "c": {"d": 3}}


def test_trial_index_comes_from_the_tune_trial_id_or_the_searchers_number():
    assert trial_index("a1b2c_00003", {"optim.lr": 1e-3}) == 3
    assert trial_index("a1b2c_00012", {}) == 12
    # A model-based searcher's trials have random ids and their number in the config.
    assert trial_index("3f9a61c2", {"optim.lr": 1e-3, TRIAL_NUMBER: 4}) == 4
    with pytest.raises(ValueError, match="3f9a61c2"):
        trial_index("3f9a61c2", {"optim.lr": 1e-3})


def test_validate_sweep_reports_every_problem_with_its_key():
    spec = validate_spec(
        {
            **BASE,
            "data": {"train": "train.jsonl"},
            "eval": {},
            "tune": {
                "search_space": {"optim.lrr": {"uniform": [0, 1]}, "lora.r": {"grid": []}},
                "metric": "accuracy",
            },
        }
    )
    with pytest.raises(ConfigError) as err:
        validate_sweep(spec)
    found = problems(err)
    assert {
        "tune.search_space.optim.lrr",
        "tune.search_space.lora.r",
        "tune.metric",
        "data.eval",
        "eval.every_steps",
    } <= set(found)


def test_validate_sweep_needs_a_tune_section_and_installed_searchers():
    with pytest.raises(ConfigError) as err:
        validate_sweep(validate_spec(BASE))
    assert "tune" in problems(err)
    import importlib.util

    if importlib.util.find_spec("optuna") is None:
        with pytest.raises(ConfigError) as err:
            validate_sweep(sweep_spec({"optim.lr": {"uniform": [1e-4, 1e-3]}}, search="optuna"))
        assert "pip install optuna" in problems(err)["tune.search"]


def test_scheduler_budget_counts_grace_in_evaluations():
    spec = sweep_spec({"optim.lr": {"uniform": [1e-4, 1e-3]}}, scheduler={"grace_period": 2})
    assert scheduler_budget(spec) == (6, 12)
    spec = sweep_spec(
        {"optim.lr": {"uniform": [1e-4, 1e-3]}}, scheduler={"grace_period": 1, "max_steps": 9}
    )
    assert scheduler_budget(spec) == (3, 9)
    spec = validate_spec({**BASE, "optim": {}, "tune": {"search_space": {}}})
    with pytest.raises(ConfigError) as err:
        scheduler_budget(spec)
    assert "tune.scheduler.max_steps" in problems(err)


def test_scheduler_report_clocks_evaluations_only_and_worsens_nan():
    report = scheduler_report({"eval_loss": 2.0, "step": 6, "final": False}, "eval_loss", "min", 3)
    assert report[SCHEDULER_CLOCK] == 6
    # A checkpoint between evaluations carries an older evaluation: no clock tick.
    report = scheduler_report({"eval_loss": 2.0, "step": 4, "final": False}, "eval_loss", "min", 3)
    assert SCHEDULER_CLOCK not in report
    # The final report must never let a scheduler stop a trial that is publishing.
    report = scheduler_report({"eval_loss": 1.0, "step": 12, "final": True}, "eval_loss", "min", 3)
    assert SCHEDULER_CLOCK not in report and report["eval_loss"] == 1.0
    assert scheduler_report({"step": 4, "final": False}, "eval_loss", "min", 3) is None
    nan = scheduler_report({"eval_loss": math.nan, "step": 3}, "eval_loss", "min", 3)
    assert nan["eval_loss"] == math.inf
    nan = scheduler_report({"eval_perplexity": math.nan, "step": 3}, "eval_perplexity", "max", 3)
    assert nan["eval_perplexity"] == -math.inf
