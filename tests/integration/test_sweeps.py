"""Sweeps end to end: Ray Tune trials that are real rayft training runs (tiny model, CPU)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from specs import tiny_spec

from rayft.raytune.sweep import TRIALS_DIR, read_trial_record, run_sweep, sweep_path
from rayft.trainers.config import validate_spec
from rayft.trainers.registry import ArtifactManifest, adapter_path
from rayft.trainers.storage import StorageRoot

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory, color_chats) -> Path:
    path = tmp_path_factory.mktemp("sweep-data") / "colors.jsonl"
    return color_chats(path, 48)


@pytest.fixture(scope="module")
def ray_env(tmp_path_factory) -> dict[str, str]:
    """Environment for this module's Ray clusters: loopback, and a private temp dir so
    that ``ray.init`` starts its own cluster even when another one runs on the machine."""
    tmp = Path(f"/tmp/rft-sw-{os.getpid()}")
    tmp.mkdir(exist_ok=True)
    env = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_TMPDIR": str(tmp)}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def sweep_data(chat_file: Path, name: str, space: dict, **tune) -> dict:
    return tiny_spec(
        chat_file,
        data={"format": "chat", "max_seq_len": 64, "eval_fraction": 0.2},
        method="lora",
        lora={"r": 8, "alpha": 16, "dropout": 0.0},
        optim={
            "lr": 3e-3,
            "max_steps": 6,
            "batch_size": 4,
            "warmup_ratio": 0.0,
            "scheduler": "constant",
        },
        scaling={"num_workers": 1},
        eval={"every_steps": 2, "at_start": False},
        checkpoint={"every_steps": 2, "keep": 1},
        output={"name": name},
        tune={"search_space": space, "max_concurrent_trials": 2, **tune},
    )


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path) as handle:
        return list(csv.DictReader(handle))


def test_bad_search_space_fails_before_any_trial_naming_the_key(chat_file, tmp_path, ray_env):
    for space, key, says in [
        (
            {"optim.learning_rate": {"loguniform": [1e-4, 1e-2]}},
            "optim.learning_rate",
            "not a job-spec key",
        ),
        ({"optim.lr": {"loguniform": [0.0, 1e-2]}}, "optim.lr", "0 < lo"),
        ({"lora.r": {"uniform": [4, 16]}}, "lora.r", "rejected"),
    ]:
        config = tmp_path / "bad.yaml"
        config.write_text(yaml.safe_dump(sweep_data(chat_file, "bad", space)))
        proc = subprocess.run(
            [sys.executable, "-m", "rayft.cluster.cli", "tune", str(config), "--id", "bad-sweep"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "RAYFT_HOME": str(tmp_path / "home")},
        )
        assert proc.returncode == 2, proc.stderr
        assert f"tune.search_space.{key}" in proc.stderr and says in proc.stderr
        # Nothing started: no sweep directory, no run.
        assert not (tmp_path / "home" / "sweeps").exists()
        assert not (tmp_path / "home" / "runs").exists()


def test_asha_sweep_over_lr_stops_a_trial_early_and_publishes_the_best(
    ray_cluster, chat_file, rayft_home
):
    import ray

    # The absurd rate runs after two sane ones have reached the first rung, so ASHA
    # has results to compare it with.
    lrs = [1e-2, 3e-3, 50.0, 1e-4]
    spec = validate_spec(
        sweep_data(
            chat_file,
            "sweep-asha",
            {"optim.lr": {"grid": lrs}},
            scheduler={"type": "asha", "grace_period": 1, "reduction_factor": 2},
        )
    )
    outcome = run_sweep(spec, sweep_id="asha-lr", show_progress=False)

    assert len(outcome.rows) == 4
    assert sorted(r["optim.lr"] for r in outcome.rows) == sorted(lrs)
    stopped = outcome.by_state("early_stopped")
    assert stopped, [(r["optim.lr"], r["state"], r["step"]) for r in outcome.rows]
    assert all(r["step"] < 6 for r in stopped)
    absurd = next(r for r in outcome.rows if r["optim.lr"] == 50.0)
    assert absurd["state"] == "early_stopped" and absurd["rank"] > 1
    finished = outcome.by_state("finished")
    assert finished and all(r["step"] == 6 for r in finished)

    # The table: sorted by the metric, saved as CSV and JSON; and the plot.
    table = read_csv(outcome.table_csv)
    assert [int(r["trial"]) for r in table] == [r["trial"] for r in outcome.rows]
    losses = [float(r["eval_loss"]) for r in table if r["eval_loss"] not in ("", "inf")]
    assert losses == sorted(losses)
    assert {r["state"] for r in table} >= {"finished", "early_stopped"}
    data = json.loads(outcome.table_json.read_text())
    assert data["best"]["trial"] == outcome.best["trial"] and data["complete"]
    assert outcome.plot.read_bytes()[:4] == b"\x89PNG"
    assert outcome.path == sweep_path("asha-lr", StorageRoot.resolve())

    # The best trial that ran to the end is published under output.name, naming the sweep
    # and the trial. ASHA is asynchronous: a trial stopped at a rung can hold a lower loss,
    # taken earlier, than every finished trial's last one; it ranks higher in the table but
    # is not published.
    best = outcome.best
    assert best["state"] == "finished" and best["rank"] == min(r["rank"] for r in finished)
    assert best["eval_loss"] == min(r["eval_loss"] for r in finished)
    assert all(r["state"] == "early_stopped" for r in outcome.rows if r["rank"] < best["rank"])
    assert outcome.artifact == adapter_path("sweep-asha", StorageRoot.resolve())
    manifest = ArtifactManifest.read(outcome.artifact)
    assert manifest.sweep.id == "asha-lr" and manifest.sweep.trial == best["trial"]
    assert manifest.sweep.params == {"optim.lr": best["optim.lr"]}
    assert manifest.spec["optim"]["lr"] == best["optim.lr"]
    assert manifest.run_id == best["run_id"] and len(manifest.base_fingerprint) == 64
    assert (outcome.artifact / "adapter_model.safetensors").is_file()
    # Without tune.publish_all no trial publishes: only the best, once, under output.name.
    assert not any(
        adapter_path(f"sweep-asha-trial-{k}", StorageRoot.resolve()).exists() for k in range(4)
    )
    assert not (
        adapter_path("sweep-asha", StorageRoot.resolve()).parent
        / ".versions"
        / "sweep-asha-trial-0"
    ).exists()
    assert (
        len(
            list(
                (
                    adapter_path("sweep-asha", StorageRoot.resolve()).parent
                    / ".versions"
                    / "sweep-asha"
                ).iterdir()
            )
        )
        == 1
    )
    records = [
        json.loads(read_trial_record(StorageRoot.resolve(), "asha-lr", f"{k}.json") or "{}")
        for k in range(4)
    ]
    assert all(r.get("artifact") is None for r in records)

    # Stopped trials gave back their workers' resources.
    deadline = time.time() + 30
    while time.time() < deadline:
        if ray.available_resources().get("CPU", 0) == ray.cluster_resources()["CPU"]:
            break
        time.sleep(1)
    assert ray.available_resources().get("CPU", 0) == ray.cluster_resources()["CPU"]


def test_grid_over_lora_rank_runs_exactly_the_grid(ray_cluster, chat_file, rayft_home):
    spec = validate_spec(
        sweep_data(
            chat_file,
            "sweep-rank",
            {"lora.r": {"grid": [2, 4]}},
            scheduler={"type": "none"},
            search="grid",
            publish_all=True,
        )
    )
    outcome = run_sweep(spec, sweep_id="grid-rank", show_progress=False)
    assert sorted(r["lora.r"] for r in outcome.rows) == [2, 4]
    assert [r["state"] for r in outcome.rows] == ["finished", "finished"]
    for row in outcome.rows:
        path = adapter_path(f"sweep-rank-trial-{row['trial']}", StorageRoot.resolve())
        config = json.loads((path / "adapter_config.json").read_text())
        assert config["r"] == row["lora.r"]
        assert ArtifactManifest.read(path).sweep.params == {"lora.r": row["lora.r"]}
    best = json.loads((outcome.artifact / "adapter_config.json").read_text())
    assert best["r"] == outcome.best["lora.r"]
    assert len(outcome.trial_artifacts) == 2


@pytest.mark.parametrize(("search", "scheduler"), [("optuna", "hyperband"), ("hyperopt", "asha")])
def test_model_based_search_samples_the_space_and_publishes_the_best(
    ray_cluster, chat_file, rayft_home, search, scheduler
):
    pytest.importorskip(search)
    name = f"sweep-{search}"
    spec = validate_spec(
        sweep_data(
            chat_file,
            name,
            {
                "optim.lr": {"loguniform": [1e-4, 3e-2]},
                "lora.r": {"choice": [2, 4, 8]},
            },
            scheduler={"type": scheduler, "reduction_factor": 2},
            search=search,
            num_samples=2,
        )
    )
    outcome = run_sweep(spec, sweep_id=f"{search}-{scheduler}", show_progress=False)

    assert len(outcome.rows) == 2
    assert {r["state"] for r in outcome.rows} <= {"finished", "early_stopped"}
    assert outcome.by_state("finished")
    for row in outcome.rows:
        assert 1e-4 <= row["optim.lr"] <= 3e-2 and row["lora.r"] in (2, 4, 8)
    # The searcher proposed two different points, each trained as such.
    assert len({r["optim.lr"] for r in outcome.rows}) == 2
    best = outcome.best
    manifest = ArtifactManifest.read(outcome.artifact)
    assert manifest.sweep.params == {"optim.lr": best["optim.lr"], "lora.r": best["lora.r"]}
    assert manifest.spec["optim"]["lr"] == best["optim.lr"]
    config = json.loads((outcome.artifact / "adapter_config.json").read_text())
    assert config["r"] == best["lora.r"]
    data = json.loads(outcome.table_json.read_text())
    assert data["complete"] and data["best"]["trial"] == best["trial"]


def test_pbt_exploit_continues_the_better_trial_with_a_mutated_lr(
    ray_cluster, chat_file, rayft_home
):
    # Two trials, one with an absurd learning rate. Synchronous PBT makes the first to
    # reach the perturbation at step 4 (2 evals, a checkpoint) wait for the other, however
    # far apart their runs started; then the worse trial restarts from the better one's
    # checkpoint with a mutated learning rate. Every restart is a new Train run.
    data = sweep_data(
        chat_file,
        "sweep-pbt",
        {"optim.lr": {"grid": [3e-3, 50.0]}},
        scheduler={
            "type": "pbt",
            "perturbation_interval": 2,
            "mutations": {"optim.lr": {"choice": [2e-3, 4e-3]}},
            "synch": True,
        },
        search="grid",
        publish_all=True,
    )
    data["optim"].update(max_steps=8, batch_size=8)
    spec = validate_spec(data)
    outcome = run_sweep(spec, sweep_id="pbt-lr", show_progress=False)
    assert [r["state"] for r in outcome.rows] == ["finished", "finished"]

    starts = {
        row["trial"]: [
            json.loads(line)
            for line in (outcome.path / "trials" / f"{row['trial']}.starts.jsonl")
            .read_text()
            .splitlines()
        ]
        for row in outcome.rows
    }
    absurd = next(r for r in outcome.rows if starts[r["trial"]][0]["values"]["optim.lr"] == 50.0)
    good = next(r for r in outcome.rows if r is not absurd)
    # A restart from a trial's own checkpoint is PBT pausing it; from the other's, an exploit.
    exploits = [
        s for s in starts[absurd["trial"]][1:] if good["trial_id"] in (s["started_from"] or "")
    ]
    assert exploits, starts
    first = exploits[0]
    # PBT resamples from the mutations or scales the donor's value by 0.8 or 1.2.
    mutated = first["values"]["optim.lr"]
    assert first["run_id"].startswith(f"{absurd['run_id'].rsplit('-g', 1)[0]}-g")
    assert 1.6e-3 <= mutated <= 4.8e-3
    # The new run continued the donor's weights from its checkpoint step, not from step 0.
    order = rayft_home / "runs" / first["run_id"] / "data_order" / "rank0.jsonl"
    steps = [json.loads(line)["step"] for line in order.read_text().splitlines()]
    assert min(steps) > 1

    # The absurd trial ended as a copy of a good one: its last run trained at a mutated
    # lr after the exploit and finished with a sane loss.
    manifest = ArtifactManifest.read(
        adapter_path(f"sweep-pbt-trial-{absurd['trial']}", StorageRoot.resolve())
    )
    assert manifest.run_id == absurd["run_id"] == starts[absurd["trial"]][-1]["run_id"]
    lrs = [r["lr"] for r in manifest.history if r["kind"] == "train"]
    assert lrs[-1] == pytest.approx(starts[absurd["trial"]][-1]["values"]["optim.lr"])
    assert absurd["eval_loss"] < 2 * min(r["eval_loss"] for r in outcome.rows)


def test_resume_after_interrupt_reruns_no_finished_trial(chat_file, tmp_path, ray_env):
    home = tmp_path / "home"
    config = tmp_path / "sweep.yaml"
    data = sweep_data(
        chat_file, "sweep-resume", {"optim.lr": {"grid": [1e-2, 3e-3]}}, scheduler={"type": "none"}
    )
    data["tune"]["max_concurrent_trials"] = 1
    config.write_text(yaml.safe_dump(data))
    env = {**os.environ, "RAYFT_HOME": str(home)}
    trials = home / "sweeps" / "resume-me" / TRIALS_DIR
    cmd = [sys.executable, "-m", "rayft.cluster.cli", "tune"]

    first = subprocess.Popen(
        [*cmd, str(config), "--id", "resume-me", "--quiet"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        # Interrupt once trial 0 has finished and trial 1 has checkpointed mid-way.
        run1 = home / "runs" / "resume-me-trial-1"
        deadline = time.time() + 400
        while time.time() < deadline and not (
            (trials / "0.json").exists() and any(run1.glob("checkpoint_*"))
        ):
            assert first.poll() is None, first.stdout.read()[-3000:]
            time.sleep(0.5)
        assert (trials / "0.json").exists(), "the first trial did not finish in time"
        first.send_signal(signal.SIGINT)  # as Ctrl-C: Tune saves the experiment and stops
        out, _ = first.communicate(timeout=180)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 130, out[-3000:]
    assert "rayft tune --resume resume-me" in out
    assert not (trials / "1.json").exists()

    second = subprocess.run(
        [*cmd, "--resume", "resume-me", "--quiet"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=500,
    )
    assert second.returncode == 0, second.stderr[-4000:]
    summary = json.loads(second.stdout.strip().splitlines()[-1])
    assert summary["trials"]["finished"] == 2

    # Trial 0 finished before the interrupt and was not started again.
    starts0 = (trials / "0.starts.jsonl").read_text().splitlines()
    assert len(starts0) == 1
    assert (trials / "1.json").exists()
    # Trial 1 was started again and continued its own run, which had a checkpoint.
    starts1 = [json.loads(line) for line in (trials / "1.starts.jsonl").read_text().splitlines()]
    assert len(starts1) == 2 and starts1[-1]["resume"] is True
    assert starts1[-1]["run_id"] == "resume-me-trial-1"
    table = read_csv(home / "sweeps" / "resume-me" / "results.csv")
    assert sorted(r["state"] for r in table) == ["finished", "finished"]
    assert (home / "adapters" / "sweep-resume" / "adapter_model.safetensors").is_file()
