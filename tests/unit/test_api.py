"""The Python API (``import rayft``): its names, spec loading, rows given in Python, and
the typed errors every call raises before a Ray cluster would start."""

from __future__ import annotations

import json
import sys
from importlib import metadata
from pathlib import Path

import pytest
import yaml

import rayft
from rayft.cluster.api import resolve_spec, write_rows
from rayft.trainers.storage import StorageRoot

CHAT = [
    {
        "messages": [
            {"role": "user", "content": f"name a {color} thing"},
            {"role": "assistant", "content": f"the {thing} is {color}"},
        ]
    }
    for color, thing in [("red", "apple"), ("blue", "sky"), ("green", "grass"), ("white", "snow")]
]


def spec_dict(train: str | None = None, **sections) -> dict:
    data = {
        "model": {"name": "tiny-llama"},
        "data": {"train": train or "train.jsonl", "format": "chat", "max_seq_len": 64},
        "optim": {"lr": 1e-3, "max_steps": 4},
        "output": {"name": "api-unit"},
    }
    data.update(sections)
    return data


def ray_running() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


# ----------------------------------------------------------------- the package


def test_version_is_the_installed_distribution_version():
    assert rayft.__version__ == metadata.version("rayft") == "0.1.0"


def test_every_public_name_resolves_to_what_it_names():
    functions = {"train", "tune", "submit", "serve", "load_adapter"}
    errors = {
        "ConfigError",
        "DataError",
        "ModelError",
        "RegistryError",
        "UserError",
        "ClusterError",
        "TrainingFailed",
    }
    records = {"JobSpec", "ServeArgs", "ArtifactManifest", "TrainResult", "SweepResult"}
    assert set(rayft.__all__) == {"__version__", "RunHandle"} | functions | errors | records
    for name in functions:
        assert callable(getattr(rayft, name)) and getattr(rayft, name).__module__ == (
            "rayft.cluster.api"
        )
    for name in errors:
        assert issubclass(getattr(rayft, name), Exception), name
    for name in records | {"RunHandle"}:
        assert isinstance(getattr(rayft, name), type), name
    assert rayft.JobSpec.__name__ == "JobSpec" and rayft.ServeArgs.__name__ == "ServeArgs"
    assert issubclass(rayft.TrainingFailed, rayft.ClusterError)
    assert set(rayft.__all__) <= set(dir(rayft))
    with pytest.raises(AttributeError, match="no attribute 'trian'"):
        rayft.trian  # noqa: B018


# ----------------------------------------------------------------- specs


def test_spec_from_a_dict_a_yaml_path_or_a_jobspec_is_the_same_jobspec(tmp_path):
    data = spec_dict()
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    overrides = ["optim.lr=5e-4", "lora.r=4"]
    from_dict = resolve_spec(data, overrides)
    from_path = resolve_spec(path, overrides)
    from_str = resolve_spec(str(path), overrides)
    from_spec = resolve_spec(rayft.JobSpec.model_validate(data), overrides)
    assert from_dict == from_path == from_str == from_spec
    assert from_dict.optim.lr == 5e-4 and from_dict.lora.r == 4
    assert data["optim"]["lr"] == 1e-3  # the caller's dict is not changed


def test_a_bad_key_is_a_config_error_naming_it_before_ray_starts(tmp_path):
    with pytest.raises(rayft.ConfigError) as caught:
        rayft.train(spec_dict(optim={"lrr": 1e-3}), storage=str(tmp_path))
    assert "optim.lrr" in str(caught.value) and ("optim.lrr", caught.value.problems[0][1]) in (
        caught.value.problems
    )
    with pytest.raises(rayft.ConfigError, match="config file not found"):
        rayft.train(tmp_path / "missing.yaml")
    with pytest.raises(rayft.ConfigError, match="tune"):
        rayft.tune(spec_dict())  # a sweep needs a tune: section
    assert not ray_running()


def test_arguments_that_do_not_go_together_are_user_errors(tmp_path):
    with pytest.raises(rayft.UserError, match="resume"):
        rayft.train(resume="run-1", data=CHAT, storage=str(tmp_path))
    with pytest.raises(rayft.UserError, match="not both"):
        rayft.train(spec_dict(), resume="run-1", storage=str(tmp_path))
    with pytest.raises(rayft.UserError, match="needs a spec"):
        rayft.train()
    with pytest.raises(rayft.UserError, match="got int"):
        rayft.train(42)
    assert not ray_running()


def test_resuming_an_unknown_run_names_it(tmp_path):
    with pytest.raises(rayft.ConfigError, match="no run 'nope'"):
        rayft.train(resume="nope", storage=str(tmp_path))


# ----------------------------------------------------------------- rows given in Python


def test_rows_are_written_as_jsonl_that_reads_back_and_scans_as_chat(tmp_path):
    from rayft.trainers.data import scan_sources

    path = tmp_path / "rows" / "train.jsonl"
    assert write_rows(CHAT, path) == len(CHAT)
    lines = path.read_text().splitlines()
    assert [json.loads(line) for line in lines] == CHAT
    assert not list(path.parent.glob(".*"))  # no partial file left behind
    scan = scan_sources(
        rayft.JobSpec.model_validate(spec_dict(str(path))), root=StorageRoot.resolve()
    )
    assert [r.rows for r in scan.train] == [len(CHAT)] and scan.format == "chat"


def test_a_hugging_face_dataset_and_numpy_values_are_written_as_plain_json(tmp_path):
    import datasets
    import numpy as np

    ds = datasets.Dataset.from_list(CHAT)
    assert write_rows(ds, tmp_path / "hf.jsonl") == len(CHAT)
    assert [json.loads(x) for x in (tmp_path / "hf.jsonl").read_text().splitlines()] == CHAT

    rows = [{"text": "a", "score": np.float32(0.5), "ids": np.arange(3)}]
    write_rows(rows, tmp_path / "np.jsonl")
    assert json.loads((tmp_path / "np.jsonl").read_text()) == {
        "text": "a",
        "score": 0.5,
        "ids": [0, 1, 2],
    }


def test_rows_that_cannot_be_written_are_data_errors(tmp_path):
    import datasets

    with pytest.raises(rayft.DataError, match="row 1 is a str"):
        write_rows([CHAT[0], "oops"], tmp_path / "a.jsonl")
    with pytest.raises(rayft.DataError, match="row 0 cannot be written as JSON"):
        write_rows([{"when": object()}], tmp_path / "b.jsonl")
    with pytest.raises(rayft.DataError, match="no rows"):
        write_rows([], tmp_path / "c.jsonl")
    with pytest.raises(rayft.DataError, match="one split"):
        write_rows(datasets.DatasetDict({"train": datasets.Dataset.from_list(CHAT)}), tmp_path)
    assert not (tmp_path / "c.jsonl").exists()


def test_train_writes_python_rows_under_the_run_and_scans_them_before_ray(tmp_path):
    bad = [{"prompt": "no completion here"}] * 3
    with pytest.raises(rayft.DataError):
        rayft.train(spec_dict(), data=bad, run_id="rows-run", storage=str(tmp_path))
    written = tmp_path / "runs" / "rows-run" / "data" / "train.jsonl"
    assert [json.loads(x) for x in written.read_text().splitlines()] == bad
    assert not ray_running()


def sweep_dict(train: Path, **space) -> dict:
    sweep = spec_dict(
        str(train),
        tune={"search_space": space or {"optim.lr": {"choice": [1e-3, 2e-3]}}},
        eval={"every_steps": 2},
    )
    sweep["data"]["eval_fraction"] = 0.25
    return sweep


def test_tune_scans_the_data_and_resolves_the_adapter_before_ray_starts(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(CHAT[0]) + "\n{not json\n")
    with pytest.raises(rayft.DataError, match=r"bad\.jsonl:2"):
        rayft.tune(sweep_dict(bad), storage=str(tmp_path))
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps(row) + "\n" for row in CHAT))
    parent = sweep_dict(good)
    parent["model"]["adapter"] = "no-such-adapter"
    parent["storage"] = str(tmp_path)
    with pytest.raises(rayft.ConfigError, match="model.adapter: no adapter named 'no-such"):
        rayft.tune(parent)
    assert not ray_running()


def test_a_sweep_over_a_key_the_scan_depends_on_leaves_the_scan_to_its_trials(
    tmp_path, monkeypatch
):
    from rayft.cluster import api

    scanned: list[int] = []
    monkeypatch.setattr(
        "rayft.trainers.data.scan_sources", lambda job, **_: scanned.append(job.data.max_seq_len)
    )
    job = rayft.JobSpec.model_validate(sweep_dict(tmp_path / "t.jsonl"))
    root = StorageRoot.resolve(str(tmp_path))
    api.check_before_ray(job, root, ["optim.lr"])
    api.check_before_ray(job, root, ["data.max_seq_len"])
    api.check_before_ray(job, root, ["grpo.temperature"])
    assert scanned == [64]  # only the sweep over optim.lr scanned the base spec


def test_a_data_path_replaces_data_train(tmp_path):
    missing = tmp_path / "nowhere.jsonl"
    with pytest.raises(rayft.DataError, match="nowhere.jsonl"):
        rayft.train(spec_dict(), data=missing, storage=str(tmp_path))
    assert not ray_running()


# ----------------------------------------------------------------- submit, serve, load


def test_submit_without_an_address_is_a_user_error(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(rayft.UserError, match="--address"):
        rayft.submit(spec_dict())


def test_serve_checks_its_arguments_before_ray_starts(monkeypatch):
    monkeypatch.delenv("RAYFT_API_KEY", raising=False)
    with pytest.raises(rayft.UserError, match="refusing to serve on 0.0.0.0"):
        rayft.serve("tiny-llama", host="0.0.0.0")
    with pytest.raises(rayft.ConfigError, match="max_loaded_adapters"):
        rayft.serve("tiny-llama", max_loaded_adapters=0)
    assert not ray_running()


def test_loading_an_adapter_that_is_not_published_is_a_registry_error(tmp_path):
    with pytest.raises(rayft.RegistryError, match="no adapter named 'ghost'"):
        rayft.load_adapter("ghost", storage=str(tmp_path))


def test_training_failed_keeps_its_run_id_across_pickling():
    import pickle

    err = pickle.loads(pickle.dumps(rayft.TrainingFailed("run-7", "run run-7 failed")))
    assert isinstance(err, rayft.ClusterError) and err.run_id == "run-7"
    assert str(err) == "run run-7 failed"
    assert Path(rayft.__file__).name == "__init__.py"


def test_a_sweep_result_is_the_sweeps_outcome_with_its_best_artifact_typed(tmp_path):
    from rayft.cluster.api import SweepResult
    from rayft.raytune.sweep import SweepOutcome

    rows = [
        {"rank": 1, "trial": 1, "optim.lr": 3e-3, "eval_loss": 1.5, "state": "finished"},
        {"rank": 2, "trial": 0, "optim.lr": 50.0, "eval_loss": 9.0, "state": "early_stopped"},
    ]
    outcome = SweepOutcome(
        sweep_id="s",
        path=tmp_path,
        rows=rows,
        columns=["rank", "trial", "optim.lr", "eval_loss", "state"],
        best=rows[0],
        artifact=None,
        table_csv=tmp_path / "results.csv",
        table_json=tmp_path / "results.json",
        plot=tmp_path / "plot.png",
    )
    result = SweepResult(**vars(outcome), best_artifact=None)
    assert isinstance(result, SweepOutcome)
    assert result.trials is result.rows and result.best["trial"] == 1
    assert [r["trial"] for r in result.by_state("early_stopped")] == [0]
    frame = result.frame()
    assert list(frame.columns) == outcome.columns and frame["optim.lr"].tolist() == [3e-3, 50.0]
