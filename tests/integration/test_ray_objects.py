"""rayft's pure functions checked against the Ray Tune and Ray Train objects they build or
recognise. These import Ray's libraries (which the unit tier keeps out); no cluster starts."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
from harness import SWEEP_BASE, sweep_spec

from rayft.raytune.search_space import to_tune, validate_search_space
from rayft.trainers.config import ConfigError, validate_spec
from rayft.trainers.startup import (
    WORKER_GROUP_START_TIMEOUT_ENV,
    StartTimeoutError,
    bounded_worker_start,
)

BASE = SWEEP_BASE


def test_every_distribution_translates_to_its_tune_domain():
    from ray.tune.search.sample import Categorical, Float, Integer

    space = {
        "optim.lr": {"loguniform": [1e-5, 1e-2]},
        "optim.warmup_ratio": {"uniform": [0.0, 0.1]},
        "lora.r": {"grid": [4, 8, 16]},
        "lora.target_modules": {"choice": ["all-linear", ["q_proj", "v_proj"]]},
        "optim.batch_size": {"randint": [2, 9]},
        "deepspeed.zero_stage": {"choice": [1, 2]},
    }
    validate_search_space(sweep_spec(space).to_dict(), space)
    out = to_tune(space)
    assert isinstance(out["optim.lr"], Float) and out["optim.lr"].lower == 1e-5
    assert isinstance(out["optim.lr"].sampler, Float._LogUniform)
    assert isinstance(out["optim.warmup_ratio"], Float) and out["optim.warmup_ratio"].upper == 0.1
    assert out["lora.r"] == {"grid_search": [4, 8, 16]}
    assert isinstance(out["lora.target_modules"], Categorical)
    assert out["lora.target_modules"].categories == ["all-linear", ["q_proj", "v_proj"]]
    assert isinstance(out["optim.batch_size"], Integer)
    assert (out["optim.batch_size"].lower, out["optim.batch_size"].upper) == (2, 9)


def test_schedulers_and_search_are_built_from_the_spec():
    from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler
    from ray.tune.search import BasicVariantGenerator

    from rayft.raytune.schedulers import SCHEDULER_CLOCK, build_scheduler, build_search

    def spec(**sched):
        return validate_spec(
            {
                "data": {"train": "x.jsonl", "eval_fraction": 0.1},
                "optim": {"max_steps": 40},
                "eval": {"every_steps": 5},
                "tune": {
                    "search_space": {"optim.lr": {"loguniform": [1e-5, 1e-2]}},
                    "scheduler": sched,
                },
            }
        )

    asha = build_scheduler(spec(grace_period=2, reduction_factor=3))
    assert isinstance(asha, AsyncHyperBandScheduler)
    assert asha._time_attr == SCHEDULER_CLOCK and asha._max_t == 40
    assert asha._brackets[0]._rungs[-1][0] == 10  # first rung: 2 evaluations × 5 steps
    # Asynchronous HyperBand: brackets whose first rungs are 5, 10, 20 and 40 steps
    # (1 evaluation × 2^k), the last running every trial to the budget.
    hyperband = build_scheduler(spec(type="hyperband"))
    assert isinstance(hyperband, AsyncHyperBandScheduler)
    assert [b._rungs[-1][0] for b in hyperband._brackets] == [5, 10, 20, 40]

    # Each trial's bracket follows optim.seed, not numpy's global state.
    def brackets(seed: int) -> list[int]:
        data = spec(type="hyperband").to_dict()
        data["optim"]["seed"] = seed
        scheduler = build_scheduler(validate_spec(data))
        scheduler.set_search_properties("eval_loss", "min")
        trials = [SimpleNamespace(trial_id=f"t{k}") for k in range(16)]
        for trial in trials:
            scheduler.on_trial_add(None, trial)
        return [scheduler._brackets.index(scheduler._trial_info[t.trial_id]) for t in trials]

    assert brackets(7) == brackets(7) != brackets(8)
    assert len(set(brackets(7))) > 1
    assert isinstance(build_scheduler(spec(type="none")), FIFOScheduler)
    pbt = build_scheduler(
        spec(
            type="pbt",
            perturbation_interval=2,
            mutations={"optim.lr": {"loguniform": [1e-5, 1e-2]}},
        )
    )
    assert pbt._perturbation_interval == 10
    with pytest.raises(ConfigError) as err:
        build_scheduler(spec(type="pbt", mutations={"optim.nope": {"choice": [1]}}))
    assert err.value.problems[0][0] == "tune.scheduler.mutations.optim.nope"
    # Shapes and data position must survive an exploit: lora.r cannot mutate.
    with pytest.raises(ConfigError) as err:
        build_scheduler(spec(type="pbt", mutations={"lora.r": {"choice": [4, 8]}}))
    assert err.value.problems[0][0] == "tune.scheduler.mutations.lora.r"
    assert "optim.lr" in err.value.problems[0][1]
    search = build_search(spec(), 2)
    assert isinstance(search, BasicVariantGenerator) and search.max_concurrent == 2


def test_a_dead_worker_is_recognised_inside_ray_trains_health_check_error():
    from ray.exceptions import RayActorError
    from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError

    from rayft.trainers.restarts import _process_gone

    wrapped = WorkerHealthCheckFailedError("A worker health check failed.", RayActorError())
    assert _process_gone(wrapped, RayActorError)
    assert _process_gone(RayActorError(), RayActorError)
    assert not _process_gone(RuntimeError("Connection closed by peer"), RayActorError)


def test_worker_group_start_is_bounded_by_the_spec_and_its_timeout_is_explained(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ray.train import ControllerError
    from ray.train.v2._internal.constants import WORKER_GROUP_START_TIMEOUT_S_ENV_VAR
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError

    # The variable rayft sets is the one Ray Train reads.
    assert WORKER_GROUP_START_TIMEOUT_ENV == WORKER_GROUP_START_TIMEOUT_S_ENV_VAR
    monkeypatch.delenv(WORKER_GROUP_START_TIMEOUT_ENV, raising=False)
    spec = validate_spec(
        {
            "data": {"train": str(tmp_path / "t.jsonl")},
            "scaling": {"num_workers": 3, "cpus_per_worker": 2, "start_timeout_s": 45},
        }
    )
    with pytest.raises(StartTimeoutError) as err:
        with bounded_worker_start(spec):
            assert os.environ[WORKER_GROUP_START_TIMEOUT_ENV] == "45.0"
            raise ControllerError(WorkerGroupStartupTimeoutError(3))
    message = str(err.value)
    assert "the 3 training workers did not get their resources (CPU: 2 each" in message
    assert "within 45 s (scaling.start_timeout_s)" in message
    assert WORKER_GROUP_START_TIMEOUT_ENV not in os.environ

    # Any other failure passes through unchanged.
    with pytest.raises(ValueError, match="boom"):
        with bounded_worker_start(spec):
            raise ValueError("boom")


def test_the_controller_polls_promptly_unless_the_user_says_otherwise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from ray.train.v2._internal.constants import (
        DEFAULT_HEALTH_CHECK_INTERVAL_S,
        ENV_VARS_TO_PROPAGATE,
        HEALTH_CHECK_INTERVAL_S_ENV_VAR,
    )

    from rayft.trainers.startup import POLL_INTERVAL_ENV, POLL_INTERVAL_S, prompt_polling

    # The variable rayft sets is the one Ray Train's controller reads, and the driver's
    # value reaches the controller.
    assert POLL_INTERVAL_ENV == HEALTH_CHECK_INTERVAL_S_ENV_VAR
    assert POLL_INTERVAL_ENV in ENV_VARS_TO_PROPAGATE
    assert POLL_INTERVAL_S < DEFAULT_HEALTH_CHECK_INTERVAL_S
    monkeypatch.delenv(POLL_INTERVAL_ENV, raising=False)
    with prompt_polling():
        assert float(os.environ[POLL_INTERVAL_ENV]) == POLL_INTERVAL_S
    assert POLL_INTERVAL_ENV not in os.environ
    # Also when fit raises.
    with pytest.raises(ValueError, match="boom"), prompt_polling():
        raise ValueError("boom")
    assert POLL_INTERVAL_ENV not in os.environ
    # A value the user set is kept, inside and after.
    monkeypatch.setenv(POLL_INTERVAL_ENV, "3")
    with prompt_polling():
        assert os.environ[POLL_INTERVAL_ENV] == "3"
    assert os.environ[POLL_INTERVAL_ENV] == "3"
