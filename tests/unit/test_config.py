"""The job spec: parsing, overrides, and errors that name the dotted key."""

from pathlib import Path

import pytest

from rayft.trainers.config import (
    ConfigError,
    JobSpec,
    apply_overrides,
    has_key,
    load_spec,
    schema_fields,
    schema_keys,
    validate_spec,
)

CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))


def base() -> dict:
    return {"model": {"name": "tiny-llama"}, "data": {"train": "train.jsonl"}}


def keys_of(err: ConfigError) -> list[str]:
    return [key for key, _ in err.problems]


def test_defaults_round_trip_through_a_plain_dict():
    spec = validate_spec(base())
    again = JobSpec.from_dict(spec.to_dict())
    assert again == spec
    assert spec.method == "lora" and spec.deepspeed.zero_stage == 2


def test_eval_metrics_names_generation_metrics_only():
    # Evaluation during training always reports loss and perplexity; eval.metrics adds
    # generation metrics (trainers.metrics), so "loss" there is refused under its key.
    data = base()
    data["data"]["eval"] = "eval.jsonl"
    data["eval"] = {"metrics": ["loss"]}
    with pytest.raises(ConfigError) as err:
        validate_spec(data)
    assert keys_of(err.value) == ["eval.metrics"]
    assert "eval.metrics" in schema_keys()


def test_unknown_key_is_named_with_its_dotted_path():
    data = base()
    data["optim"] = {"learning_rate": 1e-4}
    with pytest.raises(ConfigError) as err:
        validate_spec(data)
    assert keys_of(err.value) == ["optim.learning_rate"]
    assert "unknown key" in str(err.value)


def test_wrong_type_is_named_with_its_dotted_path():
    data = base()
    data["lora"] = {"r": "sixteen"}
    with pytest.raises(ConfigError) as err:
        validate_spec(data)
    assert keys_of(err.value) == ["lora.r"]
    assert "sixteen" in str(err.value)


def test_every_problem_is_reported_at_once():
    data = base()
    data["optim"] = {"lr": -1, "batch_size": 0}
    data["bogus"] = 1
    with pytest.raises(ConfigError) as err:
        validate_spec(data)
    assert sorted(keys_of(err.value)) == ["bogus", "optim.batch_size", "optim.lr"]


def test_missing_required_section():
    with pytest.raises(ConfigError) as err:
        validate_spec({"model": {"name": "tiny-llama"}})
    assert keys_of(err.value) == ["data"]


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (
            ["method=lora", "deepspeed.zero_stage=3", "deepspeed.offload_params=true"],
            "deepspeed.offload_params",
        ),
        (["deepspeed.zero_stage=2", "deepspeed.offload_params=true"], "deepspeed.offload_params"),
        (
            ["deepspeed.zero_stage=0", "deepspeed.offload_optimizer=true"],
            "deepspeed.offload_optimizer",
        ),
        (["eval.every_steps=5"], "eval.every_steps"),
        (["data.eval=e.jsonl", "data.eval_fraction=0.1"], "data.eval_fraction"),
        (["output.name=../escape"], "output.name"),
    ],
)
def test_impossible_combinations_are_errors(overrides, key):
    with pytest.raises(ConfigError) as err:
        validate_spec(apply_overrides(base(), overrides))
    assert key in keys_of(err.value)


def test_full_zero3_with_param_offload_is_allowed():
    data = apply_overrides(
        base(), ["method=full", "deepspeed.zero_stage=3", "deepspeed.offload_params=true"]
    )
    assert validate_spec(data).deepspeed.offload_params is True


def test_overrides_are_typed_like_yaml():
    data = apply_overrides(
        base(),
        [
            "optim.lr=3e-4",
            "lora.target_modules=[q_proj, v_proj]",
            "data.packing=true",
            "optim.max_steps=7",
        ],
    )
    spec = validate_spec(data)
    assert spec.optim.lr == pytest.approx(3e-4)
    assert spec.lora.target_modules == ["q_proj", "v_proj"]
    assert spec.data.packing is True and spec.optim.max_steps == 7


def test_override_into_a_value_is_refused():
    with pytest.raises(ConfigError) as err:
        apply_overrides({**base(), "method": "lora"}, ["method.r=3"])
    assert keys_of(err.value) == ["method"]


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_spec(tmp_path / "nope.yaml")


def test_broken_yaml_names_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  name: tiny\ndata: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+"):
        load_spec(path)


def test_schema_lists_nested_keys():
    keys = schema_keys()
    assert {
        "optim.lr",
        "lora.target_modules",
        "deepspeed.zero_stage",
        "tune.scheduler.type",
    } <= set(keys)
    assert has_key("lora.r") and not has_key("lora.rank")


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_example_config_validates_and_names_its_command(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# rayft ") and path.name in first
    load_spec(path)


def test_config_error_survives_pickling_with_its_problems() -> None:
    import pickle

    err = ConfigError([("optim.lr", "must be > 0")], source="job.yaml")
    back = pickle.loads(pickle.dumps(err))
    assert back.problems == [("optim.lr", "must be > 0")] and back.source == "job.yaml"
    assert str(back) == str(err)


def test_allocator_defaults_to_jemalloc_where_ray_ships_it_and_system_opts_out(monkeypatch):
    from rayft.trainers import driver
    from rayft.trainers.driver import JEMALLOC_CONF, worker_runtime_env

    assert validate_spec(base()).scaling.allocator == "auto"
    assert worker_runtime_env("system") == {}
    monkeypatch.setenv("LD_PRELOAD", "/opt/other.so")
    for allocator in ("auto", "jemalloc"):
        spec = validate_spec({**base(), "scaling": {"allocator": allocator}})
        env = worker_runtime_env(spec.scaling.allocator)["env_vars"]
        preload = env["LD_PRELOAD"].split()
        assert Path(preload[0]).name == "libjemalloc.so" and Path(preload[0]).is_file()
        assert preload[1:] == ["/opt/other.so"]  # a preload already asked for is kept
        assert env["MALLOC_CONF"] == JEMALLOC_CONF == "dirty_decay_ms:-1,muzzy_decay_ms:-1"
    # A Ray without the library: auto falls back to the system allocator, jemalloc is an error.
    monkeypatch.setattr(driver, "jemalloc_library", lambda: None)
    assert worker_runtime_env("auto") == {}
    with pytest.raises(ConfigError) as err:
        worker_runtime_env("jemalloc")
    assert keys_of(err.value) == ["scaling.allocator"]
    assert "use scaling.allocator=system" in str(err.value)
    with pytest.raises(ConfigError) as err:
        validate_spec({**base(), "scaling": {"allocator": "tcmalloc"}})
    assert keys_of(err.value) == ["scaling.allocator"]


# ----------------------------------------------------------- objective and method


def test_objective_and_method_are_separate_keys():
    spec = validate_spec({**base(), "objective": "dpo", "method": "full"})
    assert (spec.objective, spec.method) == ("dpo", "full")
    assert validate_spec(base()).objective == "sft"
    assert {"objective", "method"} <= set(schema_keys())
    assert not has_key("task") and not has_key("dpo.weights")


def test_older_method_dpo_still_reads_and_says_the_new_keys_once(caplog):
    older = {**base(), "method": "dpo", "dpo": {"weights": "full", "beta": 0.3}}
    with caplog.at_level("WARNING", logger="rayft.trainers.config"):
        spec = validate_spec(older)
    assert (spec.objective, spec.method, spec.dpo.beta) == ("dpo", "full", 0.3)
    assert [r.getMessage() for r in caplog.records] == [
        "job spec: method: dpo is now written objective: dpo with method: full"
    ]
    written = spec.to_dict()
    assert "task" not in written and "weights" not in written["dpo"]
    assert (written["objective"], written["method"]) == ("dpo", "full")
    caplog.clear()
    with caplog.at_level("WARNING", logger="rayft.trainers.config"):
        assert JobSpec.from_dict(written) == spec
    assert caplog.records == []  # the written spec is in the new spelling
    assert older["method"] == "dpo" and older["dpo"]["weights"] == "full"  # input untouched
    assert validate_spec({**base(), "method": "dpo"}).method == "lora"


def test_older_task_classification_still_reads_and_says_the_new_key(caplog):
    with caplog.at_level("WARNING", logger="rayft.trainers.config"):
        spec = validate_spec({**base(), "task": "classification", "method": "freeze"})
        plain = validate_spec({**base(), "task": "causal_lm"})
    assert (spec.objective, spec.method) == ("classification", "freeze")
    assert plain.objective == "sft" and "task" not in plain.to_dict()
    assert [r.getMessage() for r in caplog.records] == [
        "job spec: task: classification is now written objective: classification",
        "job spec: task: causal_lm is no longer written (objective: sft is the default)",
    ]
    assert spec.older_keys() == {"method": "freeze", "task": "classification"}
    assert validate_spec({**base(), "objective": "dpo"}).older_keys() == {
        "method": "dpo",
        "task": "causal_lm",
    }


@pytest.mark.parametrize(
    ("data", "key", "says"),
    [
        ({"objective": "sft", "method": "dpo"}, "method", "method: dpo (an older spelling)"),
        ({"method": "dpo", "task": "classification"}, "task", "contradicts method: dpo"),
        ({"objective": "classification", "task": "causal_lm"}, "task", "task: causal_lm"),
        ({"objective": "dpo", "method": "lora", "dpo": {"weights": "full"}}, "dpo.weights", ""),
        ({"task": "regression"}, "task", "write objective: sft, dpo or classification"),
    ],
)
def test_older_spellings_that_contradict_name_the_key(data, key, says):
    with pytest.raises(ConfigError) as err:
        validate_spec({**base(), **data})
    assert keys_of(err.value) == [key]
    assert says in err.value.problems[0][1]


def test_a_bare_scheduler_name_is_its_type():
    tune = {"scheduler": "pbt", "search_space": {"optim.lr": {"loguniform": [1e-5, 1e-3]}}}
    spec = validate_spec({**base(), "tune": tune})
    assert spec.tune is not None and spec.tune.scheduler.type == "pbt"
    assert spec.tune.scheduler.grace_period == 1
    with pytest.raises(ConfigError) as err:
        validate_spec({**base(), "tune": {"scheduler": "fifo"}})
    assert keys_of(err.value) == ["tune.scheduler.type"]


# ----------------------------------------------------------- schema descriptions


def test_every_schema_key_has_a_description():
    rows = schema_fields()
    assert [r.key for r in rows] == schema_keys()
    missing = [r.key for r in rows if len(r.description.split()) < 3]
    assert missing == []
    lr = next(r for r in rows if r.key == "optim.lr")
    assert (lr.type, lr.default) == ("float", "0.001")  # the default method's (lora)
    train = next(r for r in rows if r.key == "data.train")
    assert (train.type, train.default) == ("str | list[str]", None)


def test_validate_schema_prints_each_key_with_type_default_and_description(capsys):
    from rayft.cluster.cli import main

    assert main(["validate", "--schema"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(schema_keys())  # one line per key in a pipe
    lr = next(line for line in lines if line.startswith("optim.lr "))
    assert lr.split()[:3] == ["optim.lr", "float", "0.001"]
    assert "Peak learning rate of AdamW. Default per objective and method" in lr
    # The description starts in the same column on every line.
    column = lr.index("Peak")
    scheduler = next(line for line in lines if line.startswith("optim.scheduler "))
    assert scheduler[column:].startswith("Learning-rate decay")


def test_schema_lines_wrap_descriptions_to_a_terminal():
    from rayft.cluster.train_cli import schema_lines

    lines = schema_lines(120)
    assert max(len(line) for line in lines) <= 120
    assert len(lines) > len(schema_keys())


def test_every_objective_the_spec_accepts_is_registered():
    import typing

    from rayft.trainers.config import JobSpec
    from rayft.trainers.objectives import OBJECTIVES

    accepted = set(typing.get_args(JobSpec.model_fields["objective"].annotation))
    assert accepted == set(OBJECTIVES)


@pytest.mark.parametrize("value", [0, -5, 86401, float("inf"), float("nan")])
def test_start_timeout_is_a_bounded_finite_wait(value):
    with pytest.raises(ConfigError) as err:
        validate_spec({"data": {"train": "t.jsonl"}, "scaling": {"start_timeout_s": value}})
    assert "scaling.start_timeout_s" in str(err.value)
