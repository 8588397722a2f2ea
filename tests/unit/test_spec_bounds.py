"""Bounds on what a job asks for: per-job limits, finite floats, and bounded YAML specs."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from rayft.cluster import fine_tuning as jobs
from rayft.trainers.config import ConfigError, read_yaml, validate_spec
from rayft.trainers.job_limits import ClusterSize, JobLimits, limit_problems

CLUSTER = ClusterSize(cpus=8, gpus=0)
# A few hundred bytes describing 9^8 (43 million) strings: each alias shares its anchor's
# list, so loading is quick and everything that walks the result is not.
ALIAS_BOMB = """\
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
data: {train: x.jsonl}
tune: {search_space: {optim.lr: {choice: *g}}}
"""


def spec(**sections: Any) -> Any:
    return validate_spec({"data": {"train": "x.jsonl"}, **sections})


def keys(problems: list[tuple[str, str]]) -> list[str]:
    return [key for key, _ in problems]


# ------------------------------------------------------------------ job limits


def test_defaults_and_small_jobs_are_within_the_limits():
    assert limit_problems(spec(), JobLimits(), CLUSTER) == []
    small = spec(
        scaling={"num_workers": 4, "cpus_per_worker": 2},
        optim={"max_steps": 100, "batch_size": 16},
        checkpoint={"every_steps": 2, "keep": 5},
    )
    assert limit_problems(small, JobLimits(), CLUSTER) == []


@pytest.mark.parametrize(
    ("sections", "key", "bound"),
    [
        ({"scaling": {"num_workers": 100000}}, "scaling.num_workers", "at most 8 workers"),
        ({"scaling": {"cpus_per_worker": 64}}, "scaling.cpus_per_worker", "at most 8 CPUs"),
        ({"scaling": {"max_failures": -1}}, "scaling.max_failures", "0 to 3"),
        ({"optim": {"max_steps": 10**12}}, "optim.max_steps", "at most 100000 steps"),
        ({"optim": {"epochs": 1000}}, "optim.epochs", "at most 50 epochs"),
        ({"optim": {"batch_size": 4096}}, "optim.batch_size", "at most 1024"),
        ({"checkpoint": {"keep": 1000000}}, "checkpoint.keep", "at most 20 checkpoints"),
        (
            {"optim": {"max_steps": 100000}, "checkpoint": {"every_steps": 1}},
            "checkpoint.every_steps",
            "at most 1000 per job",
        ),
    ],
)
def test_each_limit_names_its_key_and_bound(sections, key, bound):
    problems = dict(limit_problems(spec(**sections), JobLimits(), CLUSTER))
    assert bound in problems[key]


def test_server_settings_and_the_cluster_set_the_bounds():
    workers = spec(scaling={"num_workers": 6})
    assert limit_problems(workers, JobLimits(max_workers=16), ClusterSize(2, 0)) == []
    assert keys(limit_problems(workers, JobLimits(), ClusterSize(2, 0))) == ["scaling.num_workers"]
    on_gpus = spec(scaling={"num_workers": 4, "use_gpu": True})
    assert keys(limit_problems(on_gpus, JobLimits(), ClusterSize(8, 2))) == ["scaling.num_workers"]
    assert limit_problems(on_gpus, JobLimits(max_gpus=4), ClusterSize(8, 2)) == []
    rare = spec(checkpoint={"every_steps": 5})
    assert keys(limit_problems(rare, JobLimits(min_checkpoint_every_steps=10), CLUSTER)) == [
        "checkpoint.every_steps"
    ]


def test_job_limits_travel_in_the_serve_arguments():
    from rayft.serving.app import parse_args

    args = parse_args({"job_limits": {"max_workers": 4, "max_steps": 500}})
    assert (args.job_limits.max_workers, args.job_limits.max_steps) == (4, 500)
    assert parse_args({}).job_limits == JobLimits()
    with pytest.raises(ConfigError) as caught:
        parse_args({"job_limits": {"max_worker": 4}})
    assert caught.value.problems[0][0] == "job_limits.max_worker"


def test_limits_are_named_as_the_body_set_them():
    request = jobs.parse_request(
        {"model": "m", "training_file": "file-a", "hyperparameters": {"n_epochs": 500}}
    )
    assert jobs.body_param("optim.epochs", request) == "hyperparameters.n_epochs"
    assert jobs.body_param("scaling.num_workers", request) == "rayft.scaling.num_workers"


# ---------------------------------------------------------------- finite floats


@pytest.mark.parametrize(
    ("sections", "key"),
    [
        ({"optim": {"lr": float("inf")}}, "optim.lr"),
        ({"optim": {"weight_decay": float("nan")}}, "optim.weight_decay"),
        ({"lora": {"alpha": float("inf")}}, "lora.alpha"),
        ({"dpo": {"beta": float("nan")}}, "dpo.beta"),
        ({"scaling": {"cpus_per_worker": float("inf")}}, "scaling.cpus_per_worker"),
        ({"optim": {"max_grad_norm": float("inf")}}, "optim.max_grad_norm"),
    ],
)
def test_infinity_and_nan_are_refused_in_every_float(sections, key):
    with pytest.raises(ConfigError) as caught:
        spec(**sections)
    assert caught.value.problems[0][0] == key
    assert "finite" in caught.value.problems[0][1]


# ----------------------------------------------------------------- YAML bounds


def refused(tmp_path: Path, text: str) -> tuple[str, str]:
    path = tmp_path / "job.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        read_yaml(path)
    assert len(caught.value.problems) == 1
    return caught.value.problems[0]


def test_an_alias_bomb_is_refused_at_once(tmp_path):
    assert len(ALIAS_BOMB.encode()) < 421
    started = time.perf_counter()
    key, message = refused(tmp_path, ALIAS_BOMB)
    assert time.perf_counter() - started < 1.0
    assert "expands to more than 100000 nodes" in message


def test_aliases_that_stay_small_still_load(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("base: &lr {lr: 0.001}\noptim: *lr\ndata: {train: x.jsonl}\n")
    assert read_yaml(path)["optim"] == {"lr": 0.001}


@pytest.mark.parametrize(
    ("text", "key", "words"),
    [
        ("optim: {seed: " + "7" * 5000 + "}\n", "optim.seed", "5000 digits"),
        (
            "tune: {search_space: {x: {choice: [1, -" + "9" * 101 + "]}}}\n",
            "tune.search_space.x.choice.1",
            "101 digits",
        ),
        ("x: " + "[" * 5000 + "]" * 5000 + "\n", "", "deeper than 32"),
        ("a: &a [*a]\n", "", "refers to itself"),
        ("a: " + "x" * (1024 * 1024) + "\n", "", "bytes"),
    ],
)
def test_yaml_past_a_bound_is_refused_naming_it(tmp_path, text, key, words):
    found, message = refused(tmp_path, text)
    assert (found, words in message) == (key, True), message


def test_an_override_past_a_bound_names_its_key():
    from rayft.trainers.config import apply_overrides

    with pytest.raises(ConfigError) as caught:
        apply_overrides({}, ["optim.seed=" + "1" * 200])
    assert caught.value.problems[0][0] == "optim.seed"


def test_rayft_validate_exits_2_on_the_bomb_quickly(tmp_path, capsys):
    from rayft.cluster.cli import main

    path = tmp_path / "bomb.yaml"
    path.write_text(ALIAS_BOMB)
    started = time.perf_counter()
    assert main(["validate", str(path), "--print"]) == 2
    assert time.perf_counter() - started < 1.0
    out = capsys.readouterr()
    assert "expands to more than" in out.err and len(out.out) < 1000
    huge = tmp_path / "huge.yaml"
    huge.write_text(
        json.dumps({"data": {"train": "x.jsonl"}, "optim": {"seed": 0}}).replace(
            "0}", "1" * 5000 + "}"
        )
    )
    assert main(["validate", str(huge)]) == 2
    assert "optim.seed: a number of 5000 digits" in capsys.readouterr().err
