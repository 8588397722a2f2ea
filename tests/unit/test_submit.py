"""Job submission without a cluster: runtime env, data shipping, size limits, the rayft
job view, and the cluster definitions (launcher YAML against Ray's own schema)."""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from rayft.cluster.cli import EXIT_BAD_INPUT, UserError, main
from rayft.cluster.jobs import build_view, format_view, rayft_state, read_run
from rayft.cluster.submit import (
    META_KIND,
    META_RUN_ID,
    META_STORAGE,
    SubmitError,
    auth_headers,
    build_entrypoint,
    build_package,
    parse_env,
    plan_data,
    resolve_token,
)
from rayft.trainers.config import validate_spec
from rayft.trainers.records import parse_events, summarize
from rayft.trainers.storage import StorageRoot

MANIFESTS = Path(__file__).resolve().parents[2] / "cluster" / "manifests"


def make_spec(train, storage: str | None = "/shared/rayft", **data) -> object:
    spec = {
        "model": {"name": "tiny-llama"},
        "data": {"train": train, **data},
        "output": {"name": "demo"},
    }
    if storage:
        spec["storage"] = storage
    return validate_spec(spec)


@pytest.fixture
def files(tmp_path: Path) -> Path:
    (tmp_path / "train.jsonl").write_text('{"text": "a"}\n' * 10)
    (tmp_path / "eval.jsonl").write_text('{"text": "b"}\n')
    return tmp_path


@pytest.fixture
def package(files: Path, tmp_path: Path):
    spec = make_spec(["train.jsonl", "s3://bucket/more.jsonl"], eval="eval.jsonl")
    pkg = build_package(spec, cwd=files, staging_parent=tmp_path)
    yield pkg
    assert pkg.workdir.parent == tmp_path  # staged where asked, so the test cleans it up


def test_local_data_is_shipped_and_the_spec_points_into_the_working_dir(package) -> None:
    shipped = yaml.safe_load((package.workdir / "spec.yaml").read_text())
    assert shipped["data"]["train"] == ["data/train-0-train.jsonl", "s3://bucket/more.jsonl"]
    assert shipped["data"]["eval"] == "data/eval-0-eval.jsonl"  # a string stays a string
    assert (package.workdir / "data/train-0-train.jsonl").read_text().count("\n") == 10
    assert shipped["storage"] == "/shared/rayft"
    validate_spec(shipped)  # what the cluster reads is a valid spec


def test_runtime_env_carries_working_dir_code_and_no_secrets(package) -> None:
    env = package.runtime_env
    assert env["working_dir"] == str(package.workdir)
    assert env["env_vars"]["RAY_OVERRIDE_JOB_RUNTIME_ENV"] == "1"
    assert not any(key.startswith("RAY_AUTH") for key in env["env_vars"])
    # The project's code travels with the job: the entrypoint imports it from the working dir.
    assert (package.workdir / "rayft" / "cluster" / "cli.py").is_file()
    assert (package.workdir / "rayft" / "trainers" / "driver.py").is_file()
    assert not list(package.workdir.rglob("__pycache__"))


def test_entrypoint_names_the_run_chosen_at_submit_time(package) -> None:
    argv = shlex.split(package.entrypoint)
    assert argv[:4] == ["python", "-m", "rayft.cluster.cli", "train"]
    assert argv[argv.index("--run-id") + 1] == package.run_id == package.submission_id
    assert package.run_id.startswith("demo-")
    assert package.metadata == {
        META_KIND: "train",
        META_RUN_ID: package.run_id,
        META_STORAGE: "/shared/rayft",
    }


def test_resume_entrypoint_continues_the_named_run(files: Path, tmp_path: Path) -> None:
    pkg = build_package(
        make_spec("train.jsonl"), cwd=files, staging_parent=tmp_path, resume="demo-1"
    )
    argv = shlex.split(pkg.entrypoint)
    assert argv[argv.index("--resume") + 1] == "demo-1"
    assert argv[argv.index("--storage") + 1] == "/shared/rayft"
    assert "spec.yaml" not in argv and pkg.run_id == "demo-1"
    assert pkg.submission_id.startswith("demo-1-resume-")
    # The same data lands at the same place, so the run's stored spec still finds it.
    assert (pkg.workdir / "data/train-0-train.jsonl").is_file()


def test_installed_code_ships_only_spec_and_data(files: Path, tmp_path: Path) -> None:
    pkg = build_package(
        make_spec("train.jsonl"), cwd=files, staging_parent=tmp_path, code="installed"
    )
    assert sorted(pkg.shipped_files) == ["data/train-0-train.jsonl", "spec.yaml"]
    assert not (pkg.workdir / "rayft").exists()


def test_tune_specs_submit_as_sweeps(files: Path, tmp_path: Path) -> None:
    spec = validate_spec(
        {"data": {"train": "train.jsonl"}, "storage": "/s", "tune": {"num_samples": 2}}
    )
    pkg = build_package(spec, cwd=files, staging_parent=tmp_path)
    argv = shlex.split(pkg.entrypoint)
    assert pkg.kind == "tune" and argv[3:5] == ["tune", "spec.yaml"]
    # The sweep is named after the run id chosen at submit time, which `jobs status` reads.
    assert argv[5:] == ["--id", pkg.run_id] and pkg.submission_id == f"sweep-{pkg.run_id}"
    assert build_entrypoint("tune", "x", "/s").endswith("tune spec.yaml --id x")


def test_uris_and_paths_on_shared_storage_pass_through(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    (shared / "data").mkdir(parents=True)
    (shared / "data" / "big.parquet").write_bytes(b"x" * 4096)
    spec = make_spec([str(shared / "data" / "big.parquet"), "gs://b/x.jsonl"], storage=str(shared))
    data, copies = plan_data(spec, str(shared), tmp_path, max_bytes=10)
    assert data["train"] == [str(shared / "data" / "big.parquet"), "gs://b/x.jsonl"]
    assert copies == []  # nothing shipped, so the 10-byte limit does not apply


def test_data_over_the_limit_is_refused_with_what_to_do(files: Path) -> None:
    (files / "big.jsonl").write_bytes(b"{}\n" * 400_000)  # ~1.1 MiB
    with pytest.raises(SubmitError) as err:
        plan_data(make_spec("big.jsonl"), "/shared", files, max_bytes=1024 * 1024)
    text = str(err.value)
    assert "1.1 MiB" in text and "1.0 MiB" in text
    assert "shared storage" in text and "s3://" in text and "--max-upload-mb" in text


def test_missing_data_file_names_the_key_and_path(files: Path) -> None:
    with pytest.raises(SubmitError, match=r"data\.eval: nope\.jsonl: file not found"):
        plan_data(make_spec("train.jsonl", eval="nope.jsonl"), "/shared", files, 10**9)


def test_storage_is_required_for_a_submitted_job(files: Path, tmp_path: Path) -> None:
    spec = make_spec("train.jsonl", storage=None)
    with pytest.raises(SubmitError, match="storage"):
        build_package(spec, cwd=files, staging_parent=tmp_path)
    pkg = build_package(spec, storage=str(tmp_path / "nfs"), cwd=files, staging_parent=tmp_path)
    assert pkg.metadata[META_STORAGE] == str(tmp_path / "nfs")


def test_submit_errors_are_user_errors_with_exit_2(files: Path, capsys, monkeypatch) -> None:
    assert issubclass(SubmitError, UserError)
    config = files / "job.yaml"
    config.write_text(yaml.safe_dump({"data": {"train": "missing.jsonl"}, "storage": "/s"}))
    monkeypatch.chdir(files)
    assert main(["submit", str(config), "--address", "http://127.0.0.1:9"]) == EXIT_BAD_INPUT
    assert "data.train: missing.jsonl: file not found" in capsys.readouterr().err
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main(["submit", str(config)]) == EXIT_BAD_INPUT
    assert "--address" in capsys.readouterr().err


def test_token_precedence_and_header(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    assert resolve_token() is None and auth_headers(None) == {}
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-home\n")
    assert resolve_token() == "from-home"
    (tmp_path / "tok").write_text("from-path")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "tok"))
    assert resolve_token() == "from-path"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert resolve_token() == "from-env"
    (tmp_path / "flag").write_text("from-flag")
    assert resolve_token(str(tmp_path / "flag")) == "from-flag"
    assert auth_headers("t") == {"Authorization": "Bearer t"}
    with pytest.raises(SubmitError, match="not found"):
        resolve_token(str(tmp_path / "absent"))


def test_env_pairs_and_token_refusal() -> None:
    assert parse_env(["A=1", "HF_HUB_OFFLINE=1"]) == {"A": "1", "HF_HUB_OFFLINE": "1"}
    with pytest.raises(SubmitError, match="KEY=VALUE"):
        parse_env(["novalue"])
    with pytest.raises(SubmitError, match="visible"):
        parse_env(["RAY_AUTH_TOKEN=secret"])


# ----------------------------------------------------------------- the rayft view of a job

EVENTS_TEXT = (
    '{"time": 1, "type": "state", "state": "running"}\n'
    '{"time": 2, "type": "resumed", "step": 4, "checkpoint": "/s/runs/demo-1/c4"}\n'
    '{"time": 3, "type": "train", "step": 5, "total_steps": 10, "loss": 2.5, "lr": 0.001}\n'
    '{"time": 4, "type": "eval", "step": 6, "total_steps": 10, "eval_loss": 2.25}\n'
    '{"time": 5, "type": "train", "step": 7, "total_steps": 10, "loss": 2.1, "lr": 0.001}\n'
)
EVENTS = parse_events(EVENTS_TEXT)


def test_events_give_progress_resume_and_outcome() -> None:
    parsed = summarize(EVENTS)
    assert parsed["step"] == 7 and parsed["total_steps"] == 10 and parsed["resumed_from"] == 4
    assert parsed["metrics"] == {"loss": 2.1, "eval_loss": 2.25}
    final = (
        EVENTS_TEXT
        + '{"time": 6, "type": "train", "step": 10, "total_steps": 10, "loss": 1.5}\n'
        + '{"time": 7, "type": "artifact", "location": "/s/adapters/demo"}\n'
        + '{"time": 8, "type": "state", "state": "fini'  # a torn last line is skipped
    )
    parsed = summarize(parse_events(final))
    assert parsed["step"] == 10 and parsed["artifact"] == "/s/adapters/demo"
    assert parsed["metrics"]["loss"] == 1.5 and parsed["state"] == "running"


@pytest.mark.parametrize(
    ("ray_status", "record", "state"),
    [
        ("RUNNING", "running", "running"),
        ("STOPPED", "running", "stopped"),
        ("SUCCEEDED", "finished", "finished"),
        ("FAILED", "failed", "failed"),
        ("PENDING", None, "pending"),
    ],
)
def test_rayft_state(ray_status: str, record: str | None, state: str) -> None:
    assert rayft_state(ray_status, record) == state


def _info(status: str) -> SimpleNamespace:
    return SimpleNamespace(
        submission_id="demo-1",
        job_id="02000000",
        status=SimpleNamespace(value=status),
        metadata={META_KIND: "train", META_RUN_ID: "demo-1", META_STORAGE: "/s"},
        message=None,
        entrypoint="python -m rayft.cluster.cli train spec.yaml",
        start_time=1000,
        end_time=None,
    )


def test_stopped_job_view_points_at_its_checkpoint_and_resume() -> None:
    run = {
        "record": {"state": "running"},
        "checkpoint_step": 6,
        "checkpoint": "/s/runs/c6",
        "history_tail": [{"kind": "train", "step": 6, "total_steps": 10, "loss": 2.2}],
    }
    view = build_view(_info("STOPPED"), {**run, "events": EVENTS})
    assert view.state == "stopped" and view.step == 7 and view.checkpoint == "/s/runs/c6"
    assert view.artifact is None
    text = format_view(view)
    assert "state     stopped" in text and "--resume demo-1" in text and "step      7/10" in text


def test_finished_job_view_takes_the_run_record() -> None:
    run = {
        "record": {
            "state": "finished",
            "artifact": "/s/adapters/demo",
            "metrics": {"step": 10, "eval_loss": 1.9},
        }
    }
    view = build_view(_info("SUCCEEDED"), {**run, "events": EVENTS})
    assert view.state == "finished" and view.step == 10
    assert view.artifact == "/s/adapters/demo" and view.metrics["eval_loss"] == 1.9
    assert "artifact  /s/adapters/demo" in format_view(view)
    assert json.loads(json.dumps(view.to_dict()))["run_id"] == "demo-1"


def test_read_run_trusts_only_checkpoints_in_rays_snapshot(tmp_path: Path) -> None:
    run = tmp_path / "runs" / "demo-1"
    for name, step in (("checkpoint_a", 4), ("checkpoint_b", 6)):
        (run / name).mkdir(parents=True)
        history = [
            {"kind": "train", "step": i, "total_steps": 10, "loss": 3.0 - i / 10}
            for i in range(1, step + 1)
        ]
        (run / name / "trainer_state.json").write_text(
            json.dumps({"step": step, "history": history})
        )
    (run / "rayft_run.json").write_text(json.dumps({"state": "running"}))
    assert "checkpoint" not in read_run(
        StorageRoot.resolve(str(tmp_path)), "demo-1"
    )  # nothing registered yet
    # checkpoint_b was still being written when the job stopped: Ray never registered it.
    (run / "checkpoint_manager_snapshot.json").write_text(
        json.dumps(
            {
                "latest_checkpoint_result": {
                    "checkpoint_dir_name": "checkpoint_a",
                    "metrics": {"step": 4},
                }
            }
        )
    )
    found = read_run(StorageRoot.resolve(str(tmp_path)), "demo-1")
    assert found["checkpoint_step"] == 4 and found["checkpoint"].endswith("checkpoint_a")
    assert found["record"] == {"state": "running"} and found["history_tail"][-1]["step"] == 4
    assert read_run(StorageRoot.resolve(str(tmp_path)), "no-such-run") == {}


# ----------------------------------------------------------------- cluster definitions


def test_launcher_yaml_passes_rays_schema_and_config_checks() -> None:
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((MANIFESTS / "launcher.yaml").read_text())
    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    jsonschema.validate(config, json.loads(schema_path.read_text()))
    validate_config(prepare_config(config))
    types = config["available_node_types"]
    assert any(t["resources"].get("GPU") for t in types.values())
    assert any(
        not t["resources"].get("GPU") and n != config["head_node_type"] for n, t in types.items()
    )
    # Never expose the Jobs API: dashboard on loopback, token auth on every node.
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "RAY_AUTH_MODE=token" in head_start
    assert all(
        "RAY_AUTH_MODE=token" in c for c in config["worker_start_ray_commands"] if "ray start" in c
    )


def _kuberay_cluster_spec(spec: dict) -> list[dict]:
    """The fields KubeRay requires of a RayCluster spec, and rayft's security defaults."""
    assert spec["rayVersion"] == "2.60.0"
    assert spec["authOptions"]["mode"] == "token"
    head = spec["headGroupSpec"]
    assert "rayStartParams" in head and head["template"]["spec"]["containers"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    groups = spec["workerGroupSpecs"]
    for group in groups:
        assert group["groupName"] and "rayStartParams" in group
        assert group["template"]["spec"]["containers"][0]["image"]
        assert group.get("minReplicas", 0) <= group.get("replicas", 0) <= group["maxReplicas"]
    return groups


def _has_gpu(group: dict) -> bool:
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    return "nvidia.com/gpu" in limits


def test_raycluster_manifest_has_cpu_and_gpu_groups_and_token_auth() -> None:
    docs = list(yaml.safe_load_all((MANIFESTS / "raycluster.yaml").read_text()))
    cluster = next(d for d in docs if d["kind"] == "RayCluster")
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["metadata"]["name"]
    groups = _kuberay_cluster_spec(cluster["spec"])
    assert any(_has_gpu(g) for g in groups) and any(not _has_gpu(g) for g in groups)
    env = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "RAYFT_HOME", "value": "/mnt/rayft"} in env


def test_rayjob_manifest_runs_rayft_on_its_own_cluster() -> None:
    docs = list(yaml.safe_load_all((MANIFESTS / "rayjob.yaml").read_text()))
    job = next(d for d in docs if d["kind"] == "RayJob")
    assert job["apiVersion"] == "ray.io/v1" and job["metadata"]["name"]
    assert job["spec"]["entrypoint"].startswith("python -m rayft.cluster.cli train /etc/rayft/")
    _kuberay_cluster_spec(job["spec"]["rayClusterSpec"])
    config_map = next(d for d in docs if d["kind"] == "ConfigMap")
    spec = validate_spec(yaml.safe_load(config_map["data"]["job.yaml"]))
    assert spec.storage == "/mnt/rayft"


def test_sweep_job_view_shows_trials_best_and_artifact() -> None:
    info = _info("SUCCEEDED")
    info.metadata = {META_KIND: "tune", META_RUN_ID: "sw-1", META_STORAGE: "/s"}
    sweep = {
        "sweep_id": "sw-1",
        "metric": "eval_loss",
        "artifact": "/s/adapters/best",
        "best": {"trial": 1, "run_id": "sw-1-trial-1", "eval_loss": 0.5},
        "trials": [{"state": "finished"}, {"state": "finished"}, {"state": "early_stopped"}],
    }
    view = build_view(info, {}, sweep)
    assert view.state == "finished" and view.kind == "tune" and view.run_id == "sw-1"
    assert view.trials == {"finished": 2, "early_stopped": 1}
    assert view.metrics["best_eval_loss"] == 0.5 and view.artifact == "/s/adapters/best"
    text = format_view(view)
    assert "trials    1 early_stopped, 2 finished" in text and "best      trial 1" in text
    info.status = SimpleNamespace(value="STOPPED")
    assert "rayft tune --resume sw-1 --storage /s" in format_view(build_view(info, {}, {}))


# ----------------------------------------------------------------- the job's first moments


def test_job_leaves_the_working_dir_and_reads_shipped_data_from_storage(
    files: Path, tmp_path: Path
) -> None:
    from rayft.cluster.job_start import JOB_ENV, stage_job

    shared = tmp_path / "shared"
    spec = make_spec(["train.jsonl", "s3://bucket/more.jsonl"], storage=str(shared))
    package = build_package(spec, cwd=files, staging_parent=tmp_path)
    assert package.runtime_env["env_vars"][JOB_ENV] == "1"
    argv = shlex.split(package.entrypoint)[3:]  # after `python -m rayft.cluster.cli`

    private = tmp_path / "private"
    private.mkdir()
    staged = stage_job(package.workdir, private, argv)
    # The entrypoint now names the private copy's spec; the code is there too.
    assert staged[0] == "train" and staged[1] == str(private / "spec.yaml")
    assert staged[2:] == argv[2:]
    assert (private / "rayft" / "cluster" / "cli.py").is_file()
    # Shipped data lives on the job's storage, where every node reads it; URIs stay.
    data = yaml.safe_load((private / "spec.yaml").read_text())["data"]
    shipped = shared / "datasets" / "jobs" / package.run_id / "train-0-train.jsonl"
    assert data["train"] == [str(shipped), "s3://bucket/more.jsonl"]
    assert shipped.read_text() == (files / "train.jsonl").read_text()
    validate_spec(yaml.safe_load((private / "spec.yaml").read_text()))
    # Ray's directory may vanish now: nothing the job reads is in it any more.
    shutil.rmtree(package.workdir)
    assert shipped.is_file() and (private / "spec.yaml").is_file()


def test_resumed_job_stages_without_a_spec(files: Path, tmp_path: Path) -> None:
    from rayft.cluster.job_start import job_key, stage_job

    spec = make_spec("train.jsonl", storage=str(tmp_path / "shared"))
    package = build_package(spec, cwd=files, staging_parent=tmp_path, resume="run-7")
    argv = shlex.split(package.entrypoint)[3:]
    assert job_key(argv) == "run-7"
    private = tmp_path / "private"
    assert stage_job(package.workdir, private, argv) == argv


class AgentStartingClient:
    """Answers like a head node whose job agent comes up after ``ready_after`` attempts."""

    def __init__(self, ready_after: int) -> None:
        self.ready_after = ready_after
        self.attempts = 0

    def submit_job(self, **kwargs) -> str:
        self.attempts += 1
        if self.attempts <= self.ready_after:
            raise RuntimeError(
                "Request failed with status code 500: No available agent to submit job, "
                "please try again later.."
            )
        return kwargs["submission_id"]


def test_submit_waits_visibly_for_the_job_agent(package) -> None:
    from rayft.cluster.submit import submit_package

    lines: list[str] = []
    client = AgentStartingClient(ready_after=2)
    job = submit_package(client, package, wait_for_agent_s=5, poll_s=0.01, say=lines.append)
    assert job == package.submission_id and client.attempts == 3
    assert len(lines) == 2 and "attempt 1" in lines[0] and "attempt 2" in lines[1]
    assert all("job agent is not ready" in line for line in lines)


def test_submit_gives_up_on_the_job_agent_with_one_line_exit_1(package, capsys) -> None:
    from rayft.cluster.cli import report_error
    from rayft.cluster.errors import ClusterError
    from rayft.cluster.submit import submit_package

    lines: list[str] = []
    with pytest.raises(ClusterError) as err:
        submit_package(
            AgentStartingClient(ready_after=10**6),
            package,
            wait_for_agent_s=0.05,
            poll_s=0.01,
            say=lines.append,
        )
    assert lines and "no job agent ready" in str(err.value)
    assert report_error(err.value) == 1
    printed = capsys.readouterr().err
    assert printed.count("\n") == 1 and "Traceback" not in printed
    assert "no job agent ready" in printed and "submit again" in printed


def test_job_workers_leave_a_removed_working_dir(tmp_path: Path, monkeypatch) -> None:
    import os
    import tempfile

    from rayft.cluster.job_start import WORKER_SETUP_HOOK, leave_ray_working_dir

    gone = tmp_path / "_ray_pkg_x"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()  # what another node's agent does to a shared working dir
    with pytest.raises(FileNotFoundError):
        os.getcwd()
    leave_ray_working_dir()
    assert os.getcwd() == os.path.realpath(tempfile.gettempdir())
    module, _, name = WORKER_SETUP_HOOK.rpartition(".")
    assert getattr(__import__(module, fromlist=[name]), name) is leave_ray_working_dir


def test_the_job_runtime_env_forwards_variables_only_to_a_cluster_at_an_address(
    monkeypatch,
) -> None:
    from rayft.cluster.connect import _job_runtime_env
    from rayft.cluster.job_start import COPY_ENV, WORKER_SETUP_HOOK

    for key in (COPY_ENV, "RAYFT_MODEL_CACHE", "RAYFT_SMOLLM2_GGUF", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("RAYFT_HOME", "/data/rayft")
    # Embedded workers inherit the driver's environment: no runtime env to set up.
    assert _job_runtime_env(embedded=True) is None
    assert _job_runtime_env(embedded=False) == {"env_vars": {"RAYFT_HOME": "/data/rayft"}}
    # A submitted job's driver: its workers run the set-up hook either way.
    monkeypatch.setenv(COPY_ENV, "1")
    assert _job_runtime_env(embedded=True) == {"worker_process_setup_hook": WORKER_SETUP_HOOK}
    assert _job_runtime_env(embedded=False)["worker_process_setup_hook"] == WORKER_SETUP_HOOK
