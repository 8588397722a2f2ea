"""``rayft train`` itself killed mid-run: the run reads as interrupted, and resumes to the end.

The CLI runs as a child process with its embedded Ray cluster. Once Ray Train has
registered a checkpoint the child is killed with SIGKILL (no handler runs), and every
process it started (Ray's head processes and workers, found by pid) with it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from processes import kill_tree
from specs import tiny_spec

from rayft.trainers.records import INTERRUPTED, live_state, newest_checkpoint, read_record
from rayft.trainers.storage import StorageRoot

pytestmark = [pytest.mark.fault, pytest.mark.slow]

STEPS = 60
EVERY = 5
RUN_ID = "driver-kill-run"


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "rayft.cluster.cli", *args]


def test_killed_driver_is_interrupted_and_resume_finishes(
    rayft_home, tiny_model_dir, tmp_path, color_chats
):
    data = color_chats(tmp_path / "colors.jsonl", 64, colors=4)
    config = tmp_path / "job.yaml"
    spec = tiny_spec(
        data,
        data={"format": "chat", "max_seq_len": 64},
        lora={"r": 4, "alpha": 8, "dropout": 0.0},
        optim={"max_steps": STEPS, "batch_size": 4, "scheduler": "constant"},
        scaling={"num_workers": 1},
        checkpoint={"every_steps": EVERY, "keep": 2},
        output={"name": "driver-kill"},
    )
    config.write_text(yaml.safe_dump(spec))
    ray_tmp = Path(f"/tmp/rft-dk-{os.getpid()}")
    ray_tmp.mkdir(exist_ok=True)
    env = {
        **os.environ,
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_TMPDIR": str(ray_tmp),
        "RAYFT_HOME": str(rayft_home),
    }
    root = StorageRoot.resolve(str(rayft_home))
    log = open(tmp_path / "first.log", "w")  # noqa: SIM115 - closed below
    first = subprocess.Popen(
        cli("train", str(config), "--run-id", RUN_ID),
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 600
        while newest_checkpoint(root, RUN_ID) is None:
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.time() < deadline, "no checkpoint within 600 s"
            time.sleep(0.1)
    finally:
        kill_tree(first)
        log.close()
    killed_at = newest_checkpoint(root, RUN_ID)[1]
    assert 0 < killed_at < STEPS

    # The record still says running (nobody wrote otherwise); every reader says interrupted.
    record = read_record(root, RUN_ID)
    assert record["state"] == "running" and record["pid"] == first.pid
    assert live_state(record) == INTERRUPTED
    status = subprocess.run(
        cli("jobs", "status", RUN_ID, "--storage", str(rayft_home)),
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert status.returncode == 0, status.stderr
    assert "state     interrupted" in status.stdout
    assert f"rayft train --resume {RUN_ID}" in status.stdout

    resumed = subprocess.Popen(
        cli("train", "--resume", RUN_ID, "--storage", str(rayft_home)),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = resumed.communicate(timeout=900)
    finally:
        if resumed.poll() is None:
            kill_tree(resumed)
    assert resumed.returncode == 0, err[-3000:]
    final = json.loads(out.strip().splitlines()[-1])
    assert final["run_id"] == RUN_ID and final["metrics"]["step"] == STEPS

    record = read_record(root, RUN_ID)
    assert record["state"] == "finished" and record["pid"] == resumed.pid
    status = subprocess.run(
        cli("jobs", "status", RUN_ID, "--storage", str(rayft_home), "--json"),
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    view = json.loads(status.stdout)
    assert view["state"] == "finished" and view["step"] == STEPS
    assert view["resumed_from"] is not None and view["resumed_from"] >= killed_at
