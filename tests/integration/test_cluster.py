"""rayft on a real multi-node Ray cluster: a head and two worker nodes on this machine.

The cluster runs with token authentication, its dashboard/Jobs API on 127.0.0.1, and
one ``rayft_slot`` resource on each worker node (none on the head), so the two training
workers of a run must land on different nodes. Jobs go through ``rayft submit`` and are
inspected, stopped and resumed with ``rayft jobs``; runs and adapters live in one shared
directory, as they would on a shared filesystem. The nodes share one session directory,
as a cluster tried out on one machine does.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import sys
import time
from pathlib import Path

import pytest
import yaml
from specs import merged, tiny_spec

from rayft.cluster.cli import main

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared storage every node sees (one machine here, a shared filesystem on a cluster)."""
    return tmp_path_factory.mktemp("shared")


@pytest.fixture(scope="module")
def cluster(shared: Path):
    """Head (no rayft_slot) + two worker nodes (one rayft_slot each), token auth, loopback only."""
    from ray.cluster_utils import Cluster
    from ray.dashboard.modules.job.sdk import JobSubmissionClient

    token = _process_token()
    saved = dict(os.environ)
    os.environ.update(
        {
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": token,
            "RAYFT_HOME": str(shared),
            # Jobs run `python -m rayft.cluster.cli`: the cluster's `python` must be this venv's.
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        }
    )
    _reload_ray_config()
    port = _free_port()
    ray_cluster = Cluster(initialize_head=False)
    try:
        # Free ports for the dashboard and its agent: Ray's defaults (8265, 52365) may be
        # held by another Ray instance on this machine.
        ray_cluster.add_node(
            num_cpus=2,
            include_dashboard=True,
            dashboard_port=port,
            dashboard_host="127.0.0.1",
            dashboard_agent_listen_port=_free_port(),
        )
        # The worker nodes share the head's session directory, as they do when someone
        # tries a cluster on a laptop: every node's runtime-env agent unpacks a job's
        # working_dir into the same path, removing what is there first, while the job's
        # driver runs (cluster/job_start.py is why that no longer matters).
        workers = [ray_cluster.add_node(num_cpus=1, resources={"rayft_slot": 1}) for _ in range(2)]
        ray_cluster.wait_for_nodes()
        url = f"http://127.0.0.1:{port}"
        headers = {"Authorization": f"Bearer {token}"}
        deadline = time.time() + 90
        while True:  # the Jobs API starts a little after the nodes
            try:
                JobSubmissionClient(url, headers=headers).list_jobs()
                break
            except Exception:
                if time.time() > deadline:
                    raise
                time.sleep(1)
        yield {
            "url": url,
            "token": token,
            "headers": headers,
            "head_id": ray_cluster.head_node.node_id,
            "worker_ids": {w.node_id for w in workers},
        }
    finally:
        ray_cluster.shutdown()
        os.environ.clear()
        os.environ.update(saved)
        _reload_ray_config()


def _process_token() -> str:
    """The token of the local clusters this process starts (Ray keeps it in ~/.ray/auth_token).

    Ray caches the token once per process, so the multi-node cluster must use the same
    one as every embedded cluster the other tests start, in whatever order they run.
    """
    path = Path.home() / ".ray" / "auth_token"
    if path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    token = secrets.token_hex(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(token)
    path.chmod(0o600)
    return token


def _reload_ray_config() -> None:
    # Ray reads RAY_AUTH_MODE once per process; the nodes this test starts inherit the
    # environment, but this process must re-read it to join them (and again to leave).
    from ray._raylet import Config

    Config.initialize("")


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory, color_chats) -> Path:
    path = tmp_path_factory.mktemp("laptop") / "colors.jsonl"
    color_chats(path, 64)
    return path


def write_config(tmp: Path, data_file: Path | str, shared: Path, name: str, **extra) -> Path:
    spec = tiny_spec(
        data_file,
        data={"format": "chat", "max_seq_len": 48},
        method="lora",
        lora={"r": 4, "alpha": 8, "dropout": 0.0},
        optim={
            "lr": 3e-3,
            "max_steps": 4,
            "batch_size": 4,
            "warmup_ratio": 0.0,
            "scheduler": "constant",
        },
        scaling={
            "num_workers": 2,
            "cpus_per_worker": 1,
            "resources_per_worker": {"rayft_slot": 1},
        },
        eval={"at_start": False},
        output={"name": name},
        storage=str(shared),
    )
    spec = merged(spec, extra)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def rayft(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    """Run the CLI in-process; returns exit code, stdout and stderr."""
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_lora_run_spreads_over_two_nodes_and_publishes_to_shared_storage(
    cluster, shared, data_file, tmp_path, capsys
):
    from ray.util.state.api import StateApiClient
    from ray.util.state.common import ListApiOptions, StateResource

    config = write_config(tmp_path, data_file, shared, "colors-cluster")
    code, out, err = rayft(capsys, "submit", str(config), "--address", cluster["url"], "--follow")
    assert code == 0, (out + err)[-4000:]
    job_id = out.splitlines()[0].strip()
    assert "[rayft] resumed" not in out

    # Both training workers ran, each on its own worker node (never on the head).
    client = StateApiClient(address=cluster["url"], headers=cluster["headers"])
    from ray.dashboard.modules.job.sdk import JobSubmissionClient

    ray_job = JobSubmissionClient(cluster["url"], headers=cluster["headers"]).get_job_info(job_id)
    actors = client.list(
        StateResource.ACTORS,
        options=ListApiOptions(
            filters=[("class_name", "=", "RayTrainWorker"), ("job_id", "=", ray_job.job_id)],
            detail=True,
        ),
        raise_on_missing_output=False,
    )
    nodes = {actor.node_id for actor in actors}
    assert len(actors) == 2 and len(nodes) == 2, actors
    assert nodes == cluster["worker_ids"]

    # The adapter is in the shared storage, loadable from there.
    adapter = shared / "adapters" / "colors-cluster"
    assert (adapter / "adapter_config.json").is_file()
    assert (adapter / "adapter_model.safetensors").is_file()
    run_id = json.loads((adapter / "rayft.json").read_text())["run_id"]
    assert job_id == run_id  # the submission is named after the run it starts
    record = json.loads((shared / "runs" / run_id / "rayft_run.json").read_text())
    assert record["state"] == "finished"

    # `jobs status` shows rayft's view: state, step and the published artifact.
    code, out, _ = rayft(capsys, "jobs", "status", job_id, "--address", cluster["url"])
    assert code == 0
    assert "state     finished" in out and "step      4/4" in out, out
    assert f"artifact  {adapter}" in out
    code, out, _ = rayft(capsys, "jobs", "status", job_id, "--json", "--address", cluster["url"])
    view = json.loads(out)
    assert view["step"] == 4 and view["artifact"] == str(adapter) and "loss" in view["metrics"]

    code, out, _ = rayft(capsys, "jobs", "logs", job_id, "--address", cluster["url"])
    assert code == 0 and f"[rayft] run {run_id}" in out and "train step 4/4" in out

    code, out, _ = rayft(capsys, "jobs", "list", "--address", cluster["url"])
    assert code == 0 and job_id in out and "SUCCEEDED" in out

    code, out, _ = rayft(capsys, "cluster", "status", "--address", cluster["url"])
    assert code == 0
    assert "3 alive" in out and "rayft_slot=1" in out, out


def test_sweep_submitted_as_a_tune_job_reports_its_trials_and_best(
    cluster, shared, data_file, tmp_path, capsys
):
    config = write_config(
        tmp_path,
        data_file,
        shared,
        "colors-sweep",
        data={"eval_fraction": 0.2},
        optim={"max_steps": 2},
        scaling={"num_workers": 1},
        eval={"every_steps": 2},
        tune={
            "search_space": {"optim.lr": {"grid": [3e-3, 1e-2]}},
            "scheduler": {"type": "none"},
            "search": "grid",
        },
    )
    code, out, err = rayft(capsys, "submit", str(config), "--address", cluster["url"], "--follow")
    assert code == 0, (out + err)[-4000:]
    job_id = out.splitlines()[0].strip()
    assert job_id.startswith("sweep-")
    sweep_id = job_id.removeprefix("sweep-")

    # The sweep's table and the best trial's adapter are in the shared storage.
    results = json.loads((shared / "sweeps" / sweep_id / "results.json").read_text())
    assert sorted(r["optim.lr"] for r in results["trials"]) == [3e-3, 1e-2]
    assert {r["state"] for r in results["trials"]} == {"finished"}
    adapter = shared / "adapters" / "colors-sweep"
    manifest = json.loads((adapter / "rayft.json").read_text())
    assert manifest["sweep"]["id"] == sweep_id

    code, out, _ = rayft(capsys, "jobs", "status", job_id, "--json", "--address", cluster["url"])
    view = json.loads(out)
    assert code == 0 and view["kind"] == "tune" and view["state"] == "finished"
    assert view["trials"] == {"finished": 2} and view["artifact"] == str(adapter)
    assert view["best"]["trial"] == manifest["sweep"]["trial"]
    assert view["metrics"]["best_eval_loss"] == results["best"]["eval_loss"]


def test_stopped_job_keeps_its_checkpoint_and_resumes(cluster, shared, data_file, tmp_path, capsys):
    steps = 16
    config = write_config(
        tmp_path,
        data_file,
        shared,
        "colors-resume",
        optim={"max_steps": steps},
        checkpoint={"every_steps": 2},
    )
    code, out, err = rayft(capsys, "submit", str(config), "--address", cluster["url"])
    assert code == 0, err
    job_id = out.strip()
    run_dir = shared / "runs" / job_id

    # Stop once a checkpoint is complete, i.e. registered in Ray Train's snapshot.
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    deadline = time.time() + 240
    while not (snapshot.is_file() and '"checkpoint_dir_name"' in snapshot.read_text()):
        assert time.time() < deadline, "no complete checkpoint appeared"
        time.sleep(0.5)
    code, out, _ = rayft(capsys, "jobs", "stop", job_id, "--address", cluster["url"])
    assert code == 0 and "stopped" in out and f"--resume {job_id}" in out

    code, out, _ = rayft(capsys, "jobs", "status", job_id, "--json", "--address", cluster["url"])
    view = json.loads(out)
    assert view["state"] == "stopped" and view["artifact"] is None
    stopped_at = view["checkpoint_step"]
    assert 0 < stopped_at < steps and view["checkpoint"].startswith(str(run_dir))
    assert not (shared / "adapters" / "colors-resume").exists()

    code, out, err = rayft(
        capsys, "submit", str(config), "--resume", job_id, "--address", cluster["url"], "--follow"
    )
    assert code == 0, (out + err)[-4000:]
    resumed_job = out.splitlines()[0].strip()
    resumed_from = int(out.split("[rayft] resumed from step ")[1].split()[0])
    assert resumed_from == stopped_at  # the newest complete checkpoint, nothing lost
    assert "train step 1/" not in out and f"train step {resumed_from + 1}/{steps}" in out
    record = json.loads((run_dir / "rayft_run.json").read_text())
    assert record["state"] == "finished" and record["metrics"]["step"] == steps
    assert (shared / "adapters" / "colors-resume" / "adapter_model.safetensors").is_file()

    code, out, _ = rayft(
        capsys, "jobs", "status", resumed_job, "--json", "--address", cluster["url"]
    )
    view = json.loads(out)
    assert view["run_id"] == job_id and view["resumed_from"] == resumed_from
    assert view["step"] == steps and view["state"] == "finished"


def test_bad_token_is_refused_with_exit_2(
    cluster, shared, data_file, tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("RAY_AUTH_TOKEN", "not-the-token")
    config = write_config(tmp_path, data_file, shared, "colors-denied")
    code, _, err = rayft(capsys, "submit", str(config), "--address", cluster["url"])
    assert code == 2 and "rejected the token" in err and "RAY_AUTH_TOKEN" in err
    code, _, err = rayft(capsys, "jobs", "list", "--address", cluster["url"])
    assert code == 2 and "rejected the token" in err


def test_unknown_job_is_exit_2(cluster, capsys):
    code, _, err = rayft(capsys, "jobs", "status", "no-such-job", "--address", cluster["url"])
    assert code == 2 and "no-such-job" in err


def test_unreachable_address_is_exit_2(data_file, shared, tmp_path, capsys):
    url = f"http://127.0.0.1:{_free_port()}"
    config = write_config(tmp_path, data_file, shared, "colors-nowhere")
    code, _, err = rayft(capsys, "submit", str(config), "--address", url)
    assert code == 2 and f"cannot reach the Ray Jobs API at {url}" in err
    code, _, err = rayft(capsys, "jobs", "list", "--address", url)
    assert code == 2 and "cannot reach" in err


def test_missing_data_file_is_exit_2_before_contacting_the_cluster(shared, tmp_path, capsys):
    config = write_config(tmp_path, tmp_path / "nope.jsonl", shared, "colors-missing")
    code, _, err = rayft(capsys, "submit", str(config), "--address", "http://127.0.0.1:9")
    assert code == 2
    assert "data.train" in err and "nope.jsonl" in err and "file not found" in err
