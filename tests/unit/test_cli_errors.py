"""Bad input on the command line: exit code 2 and a message naming file:line or the key.

These call the ``rayft`` entry point (:func:`rayft.cluster.cli.main`) in this process;
every error is caught before a Ray cluster would start.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]


@dataclass
class Done:
    """What one ``rayft`` command left: its exit code and what it printed."""

    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def rayft(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Callable[..., Done]:
    """Runs ``rayft ARGS`` from the checkout's root with ``$RAYFT_HOME`` set to ``home``."""
    from rayft.cluster.cli import main

    def run(*args: str, home: Path) -> Done:
        monkeypatch.setenv("RAYFT_HOME", str(home))
        monkeypatch.chdir(ROOT)
        capsys.readouterr()
        try:
            code = main(list(args))
        except SystemExit as exit_:  # argparse's usage errors
            code = exit_.code if isinstance(exit_.code, int) else 1
        out = capsys.readouterr()
        return Done(code, out.out, out.err)

    return run


@pytest.fixture
def write_spec(tiny_spec: Callable[..., dict]) -> Callable[..., Path]:
    """Writes a tiny-llama job spec training on ``train`` to ``tmp_path/job.yaml``."""

    def write(tmp_path: Path, train: Path, **extra) -> Path:
        path = tmp_path / "job.yaml"
        path.write_text(json.dumps(tiny_spec(train, **extra)))  # JSON is YAML
        return path

    return write


def chat(i: int) -> str:
    return json.dumps(
        {
            "messages": [
                {"role": "user", "content": f"q{i}"},
                {"role": "assistant", "content": f"a{i}"},
            ]
        }
    )


def test_malformed_jsonl_line_names_file_and_line(write_spec, rayft, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join([chat(1), chat(2), '{"messages": [oops', chat(4)]) + "\n")
    done = rayft("train", str(write_spec(tmp_path, data)), home=tmp_path)
    assert done.returncode == 2, done.stderr
    assert f"{data}:3" in done.stderr and "JSON" in done.stderr
    assert "Traceback" not in done.stderr


def test_row_missing_its_fields_names_line_and_field(write_spec, rayft, tmp_path):
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


def test_unknown_config_key_names_dotted_key(write_spec, rayft, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text(chat(1) + "\n")
    spec = write_spec(tmp_path, data, optim={"learning_rate": 1e-4})
    done = rayft("train", str(spec), home=tmp_path)
    assert done.returncode == 2
    assert "optim.learning_rate" in done.stderr and "unknown key" in done.stderr


def test_wrong_type_override_names_dotted_key(write_spec, rayft, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text(chat(1) + "\n")
    done = rayft("train", str(write_spec(tmp_path, data)), "lora.r=many", home=tmp_path)
    assert done.returncode == 2
    assert "lora.r" in done.stderr and "many" in done.stderr


def test_missing_data_file_is_named(write_spec, rayft, tmp_path):
    missing = tmp_path / "nope.jsonl"
    done = rayft("train", str(write_spec(tmp_path, missing)), home=tmp_path)
    assert done.returncode == 2
    assert str(missing) in done.stderr


def test_missing_config_file(rayft, tmp_path):
    done = rayft("train", str(tmp_path / "absent.yaml"), home=tmp_path)
    assert done.returncode == 2 and "config file not found" in done.stderr


@pytest.mark.parametrize("command", [["validate"], ["train"]])
def test_validate_reports_every_problem(rayft, tmp_path, command):
    spec = tmp_path / "bad.yaml"
    spec.write_text(
        "model: {name: tiny-llama}\ndata: {train: x.jsonl}\noptim: {lr: -1}\nbogus: 1\n"
    )
    done = rayft(*command, str(spec), home=tmp_path)
    assert done.returncode == 2
    assert "optim.lr" in done.stderr and "bogus" in done.stderr


def test_validate_accepts_the_shipped_configs(rayft, tmp_path):
    done = rayft("validate", "configs/extract-lora.yaml", "optim.lr=5e-4", home=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "valid" in done.stdout


def test_models_list_shows_builtins(rayft, tmp_path):
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


# ----------------------------------------------------------------- which errors are the user's


def test_bad_input_is_the_users_file_key_model_or_address():
    from rayft.cluster.cli import is_bad_input
    from rayft.cluster.submit import SubmitError
    from rayft.trainers.config import ConfigError
    from rayft.trainers.data import DataError
    from rayft.trainers.models import ModelError
    from rayft.trainers.registry import RegistryError

    users = [
        ConfigError([("optim.lr", "must be > 0")]),
        DataError("train.jsonl:3: not JSON"),
        ModelError("no model named x"),
        RegistryError("no adapter named y"),
        SubmitError("--address: cannot reach"),
        FileNotFoundError(2, "No such file or directory", "/data/train.jsonl"),
    ]
    internal = [
        # os.getcwd() in a directory that was removed: no file name, nothing to fix.
        FileNotFoundError(2, "No such file or directory"),
        RuntimeError("Request failed with status code 500"),
        KeyError("loss"),
    ]
    assert [is_bad_input(e) for e in users] == [True] * len(users)
    assert [is_bad_input(e) for e in internal] == [False] * len(internal)


def raised_from(outer: BaseException, inner: BaseException) -> BaseException:
    """``outer`` as ``raise outer from inner`` leaves it."""
    try:
        try:
            raise inner
        except BaseException as err:
            raise outer from err
    except BaseException as err:
        return err


def test_root_cause_follows_the_explicit_chain():
    from rayft.cluster.cli import _root_cause

    outer = raised_from(RuntimeError("training failed"), ConnectionResetError("peer went away"))
    assert _root_cause(outer) == "ConnectionResetError: peer went away"
    assert _root_cause(ValueError("plain")) == "ValueError: plain"


def test_root_cause_stops_at_an_error_that_explains_its_cause():
    # A full disk reads as rayft's own message (what to do), not as the worker's text.
    from rayft.cluster.cli import _root_cause
    from rayft.trainers.storage import StorageFullError

    outer = raised_from(
        StorageFullError("run r stopped: no space left; free space there"),
        RuntimeError("Training failed due to controller error: No space left on device"),
    )
    assert _root_cause(outer) == "StorageFullError: run r stopped: no space left; free space there"

    # So does a worker group that could not start: the resources and the setting, not Ray's
    # bare timeout.
    from rayft.trainers.startup import StartTimeoutError

    outer = raised_from(
        RuntimeError("run r failed"),
        raised_from(
            StartTimeoutError("the 3 training workers did not get their resources (CPU: 2 each)"),
            TimeoutError("WorkerGroupStartupTimeoutError: 3 workers after 45 s"),
        ),
    )
    assert _root_cause(outer) == (
        "StartTimeoutError: the 3 training workers did not get their resources (CPU: 2 each)"
    )


def test_internal_error_prints_one_line_and_keeps_the_traceback_in_a_log(
    tmp_path, monkeypatch, capsys
):
    import rayft.cluster.models_cli as models_cli
    from rayft.cluster.cli import main

    def broken(args):
        raise FileNotFoundError(2, "No such file or directory")

    monkeypatch.setenv("RAYFT_LOG_DIR", str(tmp_path / "logs"))
    monkeypatch.setattr(models_cli, "cmd_models", broken)
    assert main(["models", "list"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "internal error: FileNotFoundError" in err
    (log,) = (tmp_path / "logs").glob("rayft-*.log")
    assert f"the traceback is in {log}" in err
    text = log.read_text()
    assert text.startswith("rayft models list") and "Traceback" in text and "broken" in text


def test_named_missing_file_is_bad_input(monkeypatch, capsys):
    import rayft.cluster.models_cli as models_cli
    from rayft.cluster.cli import main

    def missing(args):
        raise FileNotFoundError(2, "No such file or directory", "/nowhere/x.json")

    monkeypatch.setattr(models_cli, "cmd_models", missing)
    assert main(["models", "list"]) == 2
    assert "/nowhere/x.json" in capsys.readouterr().err


def test_console_level_comes_from_the_flag_or_the_environment(monkeypatch):
    from rayft.cluster import console
    from rayft.cluster.cli import UserError, parse_args

    monkeypatch.delenv("RAYFT_LOG_LEVEL", raising=False)
    assert console.log_level() == "warning" and not console.is_verbose()
    monkeypatch.setenv("RAYFT_LOG_LEVEL", "DEBUG")
    assert console.is_verbose()
    monkeypatch.setenv("RAYFT_LOG_LEVEL", "loud")
    with pytest.raises(UserError, match="RAYFT_LOG_LEVEL"):
        console.log_level()
    # --verbose is accepted after any command, nested ones included, and before it.
    assert parse_args(["train", "job.yaml", "--verbose"]).verbose
    assert parse_args(["jobs", "list", "-v"]).verbose
    assert parse_args(["--verbose", "models", "list"]).verbose
    assert not parse_args(["models", "list"]).verbose
