"""Bad input on the command line: exit code 2 and a message naming file:line or the key.

These run the real ``rayft`` entry point in a subprocess; every error is caught before
a Ray cluster would start.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]


def rayft(*args: str, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAYFT_HOME": str(home)}
    return subprocess.run(
        [sys.executable, "-m", "rayft.cluster.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def write_spec(tmp_path: Path, train: Path, **extra) -> Path:
    spec = {"model": {"name": "tiny-llama"}, "data": {"train": str(train)}, **extra}
    path = tmp_path / "job.yaml"
    path.write_text(json.dumps(spec))  # JSON is YAML
    return path


def chat(i: int) -> str:
    return json.dumps(
        {
            "messages": [
                {"role": "user", "content": f"q{i}"},
                {"role": "assistant", "content": f"a{i}"},
            ]
        }
    )


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join([chat(1), chat(2), '{"messages": [oops', chat(4)]) + "\n")
    done = rayft("train", str(write_spec(tmp_path, data)), home=tmp_path)
    assert done.returncode == 2, done.stderr
    assert f"{data}:3" in done.stderr and "JSON" in done.stderr
    assert "Traceback" not in done.stderr


def test_row_missing_its_fields_names_line_and_field(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text(
        "\n".join(
            [
                json.dumps({"prompt": "p1", "completion": "c1"}),
                json.dumps({"prompt": "p2"}),
            ]
        )
        + "\n"
    )
    done = rayft("train", str(write_spec(tmp_path, data)), home=tmp_path)
    assert done.returncode == 2
    assert f"{data}:2" in done.stderr and "completion" in done.stderr


def test_unknown_config_key_names_dotted_key(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text(chat(1) + "\n")
    spec = write_spec(tmp_path, data, optim={"learning_rate": 1e-4})
    done = rayft("train", str(spec), home=tmp_path)
    assert done.returncode == 2
    assert "optim.learning_rate" in done.stderr and "unknown key" in done.stderr


def test_wrong_type_override_names_dotted_key(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text(chat(1) + "\n")
    done = rayft("train", str(write_spec(tmp_path, data)), "lora.r=many", home=tmp_path)
    assert done.returncode == 2
    assert "lora.r" in done.stderr and "many" in done.stderr


def test_missing_data_file_is_named(tmp_path):
    missing = tmp_path / "nope.jsonl"
    done = rayft("train", str(write_spec(tmp_path, missing)), home=tmp_path)
    assert done.returncode == 2
    assert str(missing) in done.stderr


def test_missing_config_file(tmp_path):
    done = rayft("train", str(tmp_path / "absent.yaml"), home=tmp_path)
    assert done.returncode == 2 and "config file not found" in done.stderr


@pytest.mark.parametrize("command", [["validate"], ["train"]])
def test_validate_reports_every_problem(tmp_path, command):
    spec = tmp_path / "bad.yaml"
    spec.write_text(
        "model: {name: tiny-llama}\ndata: {train: x.jsonl}\noptim: {lr: -1}\nbogus: 1\n"
    )
    done = rayft(*command, str(spec), home=tmp_path)
    assert done.returncode == 2
    assert "optim.lr" in done.stderr and "bogus" in done.stderr


def test_validate_accepts_the_shipped_configs(tmp_path):
    done = rayft("validate", "configs/extract-lora.yaml", "optim.lr=5e-4", home=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "valid" in done.stdout


def test_models_list_shows_builtins(tmp_path):
    done = rayft("models", "list", home=tmp_path)
    assert done.returncode == 0
    assert "smollm2-135m-instruct" in done.stdout and "tiny-llama" in done.stdout


def test_overrides_may_follow_the_options():
    from rayft.cluster.cli import parse_args

    args = parse_args(["tune", "sweep.yaml", "--id", "s1", "optim.lr=1e-3", "lora.r=8"])
    assert (args.config, args.sweep_id, args.overrides) == (
        "sweep.yaml",
        "s1",
        ["optim.lr=1e-3", "lora.r=8"],
    )
    args = parse_args(["train", "job.yaml", "a.b=1", "--run-id", "r1", "c.d=2"])
    assert args.overrides == ["a.b=1", "c.d=2"] and args.run_id == "r1"
    # Anything else after the options is still an error, exit status 2.
    for argv in (["tune", "sweep.yaml", "--id", "s1", "stray"], ["train", "job.yaml", "--bogus=1"]):
        with pytest.raises(SystemExit) as err:
            parse_args(argv)
        assert err.value.code == 2
