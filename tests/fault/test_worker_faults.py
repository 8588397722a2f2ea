"""Faults during fine-tuning: a killed worker, corrupted checkpoints; what survives them.

A 2-worker tiny-llama LoRA run (8 steps, a checkpoint every 2) on a local Ray cluster
with real DeepSpeed engines is compared with the same run left alone: the same final
step, the same samples in the same order on every rank, the same final eval loss.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import ray.cloudpickle
from harness import StopAfterCheckpoint
from specs import tiny_spec

from rayft.trainers.config import validate_spec
from rayft.trainers.driver import run_training
from rayft.trainers.loop import LoopCallback, TrainerState

pytestmark = [pytest.mark.fault, pytest.mark.slow]

# Workers unpickle this module's callbacks without importing the test module.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

STEPS = 8
EVERY = 2


class PidAfterCheckpoint(LoopCallback):
    """On ``rank`` after the checkpoint of ``step``: write this worker's pid and wait.

    The test kills the process by that pid; the file also marks that the fault happened,
    so the restarted worker does not wait again.
    """

    def __init__(self, step: int, rank: int, pid_file: str) -> None:
        self.step, self.rank, self.pid_file = step, rank, pid_file

    def on_checkpoint(self, state: TrainerState) -> None:
        import ray.train

        if state.step != self.step or ray.train.get_context().get_world_rank() != self.rank:
            return
        if os.path.exists(self.pid_file):
            return
        tmp = self.pid_file + ".tmp"
        Path(tmp).write_text(str(os.getpid()))
        os.replace(tmp, self.pid_file)
        time.sleep(120)  # killed long before this ends


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory, color_chats) -> Path:
    path = tmp_path_factory.mktemp("data") / "colors.jsonl"
    return color_chats(path, 80, colors=4)


def make_spec(chat_file: Path, name: str, max_failures: int = 3):
    return validate_spec(
        tiny_spec(
            chat_file,
            data={"format": "chat", "max_seq_len": 64, "eval_fraction": 0.15},
            method="lora",
            lora={"r": 8, "alpha": 16, "dropout": 0.0},
            deepspeed={"zero_stage": 2},
            optim={
                "lr": 3e-3,
                "max_steps": STEPS,
                "batch_size": 4,
                "warmup_ratio": 0.0,
                "scheduler": "constant",
            },
            scaling={"num_workers": 2, "max_failures": max_failures},
            checkpoint={"every_steps": EVERY, "keep": 4},
            eval={"every_steps": 4, "at_start": False},
            output={"name": name, "overwrite": True},
        )
    )


def read_order(run_dir: Path) -> dict[str, list[tuple[int, list]]]:
    logs = {}
    for path in sorted((run_dir / "data_order").glob("rank*.jsonl")):
        entries = [json.loads(line) for line in path.read_text().splitlines()]
        logs[path.name] = [(e["step"], e["samples"]) for e in entries]
    return logs


@pytest.fixture(scope="module")
def straight(ray_cluster, chat_file, rayft_home):
    """The uninterrupted run everything is compared with."""
    outcome = run_training(make_spec(chat_file, "faults-straight"), show_progress=False)
    return outcome, read_order(rayft_home / "runs" / outcome.run_id)


def assert_same_run(outcome, order, straight) -> None:
    reference, reference_order = straight
    assert outcome.metrics["step"] == reference.metrics["step"] == STEPS
    assert set(order) == {"rank0.jsonl", "rank1.jsonl"}
    assert order == reference_order  # same samples, same steps, every rank
    assert outcome.evals()[-1]["eval_loss"] == pytest.approx(
        reference.evals()[-1]["eval_loss"], abs=1e-3
    )


def test_killed_worker_restarts_from_its_checkpoint_and_finishes_the_same_run(
    straight, chat_file, rayft_home, tmp_path, capsys
):
    pid_file = tmp_path / "rank1.pid"
    killed: list[int] = []

    def kill_when_ready() -> None:
        deadline = time.time() + 150
        while time.time() < deadline and not pid_file.exists():
            time.sleep(0.1)
        if pid_file.exists():
            pid = int(pid_file.read_text())
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    killer = threading.Thread(target=kill_when_ready, daemon=True)
    killer.start()
    outcome = run_training(
        make_spec(chat_file, "faults-killed"),
        run_id="faults-killed-run",
        show_progress=False,
        loop_callbacks=[PidAfterCheckpoint(4, 1, str(pid_file))],
    )
    killer.join(timeout=5)
    assert killed, "the rank-1 worker never reached the checkpoint of step 4"

    lines = [
        ln
        for ln in capsys.readouterr().err.splitlines()
        if ln.startswith("[rayft]") and "restarting" in ln
    ]
    # Killed right after checkpoint 4: nothing past it is lost, nothing before it redone.
    assert lines == ["[rayft] worker 1 lost, restarting from step 4"]
    assert_same_run(outcome, read_order(rayft_home / "runs" / "faults-killed-run"), straight)


def corrupt(rayft_home: Path, run_id: str) -> dict[int, Path]:
    """Truncate a file of the newest checkpoint and flip one byte in the one before."""
    by_step = {}
    for ckpt in sorted((rayft_home / "runs" / run_id).glob("checkpoint_*/")):
        if not ckpt.is_dir():
            continue  # Ray Train's checkpoint_manager_snapshot.json
        by_step[json.loads((ckpt / "trainer_state.json").read_text())["step"]] = ckpt
    model = by_step[6] / "state" / "mp_rank_00_model_states.pt"
    model.write_bytes(model.read_bytes()[:100])
    shard = by_step[4] / "state" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x10
    shard.write_bytes(bytes(data))
    return by_step


def test_resume_refuses_corrupted_checkpoints_and_continues_from_a_complete_one(
    straight, chat_file, rayft_home, capsys
):
    spec = make_spec(chat_file, "faults-corrupt", max_failures=0)
    with pytest.raises((ray.train.TrainingFailedError, RuntimeError)):
        run_training(
            spec,
            run_id="faults-corrupt-run",
            show_progress=False,
            loop_callbacks=[StopAfterCheckpoint(6)],
        )
    by_step = corrupt(rayft_home, "faults-corrupt-run")
    assert sorted(by_step) == [2, 4, 6]
    capsys.readouterr()

    resumed = run_training(spec, run_id="faults-corrupt-run", resume=True, show_progress=False)
    refused = [
        ln
        for ln in capsys.readouterr().err.splitlines()
        if ln.startswith("[rayft]") and "refused" in ln
    ]
    assert refused == [
        f"[rayft] checkpoint {by_step[6].name} refused: state/mp_rank_00_model_states.pt has "
        f"100 bytes, {_written_size(by_step[6])} were written; resuming from the previous "
        "complete one",
        f"[rayft] checkpoint {by_step[4].name} refused: state/zero_pp_rank_1_mp_rank_00_optim_"
        "states.pt has a different sha256 than was written; resuming from the previous "
        "complete one",
    ]
    train_steps = [r["step"] for r in resumed.history if r["kind"] == "train"]
    assert train_steps == list(range(1, STEPS + 1))  # steps 3.. were trained again from 2
    assert_same_run(resumed, read_order(rayft_home / "runs" / "faults-corrupt-run"), straight)


def _written_size(ckpt: Path) -> int:
    manifest = json.loads((ckpt / "rayft_manifest.rank0.json").read_text())
    return manifest["files"]["state/mp_rank_00_model_states.pt"]["size"]


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MB tmpfs: room for tiny-llama and a run's records, not for full-weight checkpoints."""
    import subprocess

    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(disk)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"no tmpfs can be mounted here: {mounted.stderr.decode().strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_full_disk_stops_the_run_saying_what_to_do_and_frees_its_cpus(
    ray_cluster, chat_file, small_disk
):
    # Through the Python API, as a user meets it: rayft.TrainingFailed says what to do.
    import rayft
    from rayft.trainers.models import pull_builtin
    from rayft.trainers.storage import StorageFullError, StorageRoot, is_storage_full

    pull_builtin("tiny-llama", StorageRoot.resolve(str(small_disk)).models)
    spec = tiny_spec(
        chat_file,
        storage=str(small_disk),
        method="full",
        optim={"max_steps": 6, "batch_size": 4},
        scaling={"num_workers": 2, "max_failures": 1},
        checkpoint={"every_steps": 1},
        output={"name": "full-disk"},
    )
    with pytest.raises(rayft.TrainingFailed) as caught:
        rayft.train(spec, run_id="full-disk-run", show_progress=False)
    message = str(caught.value)
    assert message.startswith(
        "run full-disk-run failed: StorageFullError: run full-disk-run stopped: no space left "
        f"on the disk of its storage ({small_disk})"
    ), message
    assert "checkpoint.keep=2" in message
    assert "rayft train --resume full-disk-run" in message
    full = caught.value.__cause__
    assert isinstance(full, StorageFullError)
    assert is_storage_full(full.__cause__)  # the worker's or controller's own error
    # The run's workers gave their CPUs back.
    assert_all_cpus_free_within(30)


def test_workers_the_cluster_cannot_place_fail_the_run_in_time_and_the_record_says_why(
    ray_cluster, chat_file, rayft_home
):
    # Three workers of two CPUs each on a cluster of fewer: the worker group cannot start,
    # and after scaling.start_timeout_s the run fails with rayft's own message, which the
    # run's record keeps (not Ray's bare timeout).
    from rayft.trainers.records import read_events, read_record
    from rayft.trainers.startup import StartTimeoutError
    from rayft.trainers.storage import StorageRoot

    cpus = ray.cluster_resources()["CPU"]
    assert cpus < 6
    spec = validate_spec(
        tiny_spec(
            chat_file,
            optim={"max_steps": 2, "batch_size": 4},
            scaling={"num_workers": 3, "cpus_per_worker": 2, "start_timeout_s": 5},
            output={"name": "no-room"},
        )
    )
    started = time.monotonic()
    with pytest.raises(StartTimeoutError) as caught:
        run_training(spec, run_id="no-room-run", show_progress=False)
    assert time.monotonic() - started < 120
    message = str(caught.value)
    assert "the 3 training workers did not get their resources (CPU: 2 each" in message
    assert "within 5 s (scaling.start_timeout_s)" in message
    root = StorageRoot.resolve()
    assert read_record(root, "no-room-run")["state"] == "failed"
    errors = [e for e in read_events(root, "no-room-run") if e["type"] == "error"]
    assert [e["error"] for e in errors] == ["StartTimeoutError"]
    assert errors[0]["message"] == message
    # Nothing was published, and the cluster's CPUs are free again.
    assert not (root.adapters / "no-room").exists()
    assert_all_cpus_free_within(30)


def assert_all_cpus_free_within(seconds: float) -> None:
    """Every CPU of the cluster is free again within ``seconds``."""
    deadline = time.time() + seconds
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"]:
        assert time.time() < deadline, ray.available_resources()
        time.sleep(0.5)
