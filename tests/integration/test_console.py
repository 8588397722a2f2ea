"""What ``rayft train`` prints: rayft's lines and one bar by default, Ray's logs with --verbose.

Each test runs the real ``rayft`` entry point in a subprocess on the embedded local Ray
cluster and reads what reached its stdout and stderr.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from specs import tiny_spec

pytestmark = pytest.mark.slow

ROOT = Path(__file__).parents[2]
# Lines that belong in Ray's log files, not on a quiet console.
NOISE = ("TrainingReport(", "PlacementGroupCleaner", "FutureWarning", "(RayTrainWorker")


@pytest.fixture
def job(tmp_path: Path) -> Path:
    data = tmp_path / "chat.jsonl"
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"say {word}"},
                {"role": "assistant", "content": f"{word} {word}"},
            ]
        }
        for word in ("red", "blue", "green", "white", "black", "pink", "gray", "gold") * 4
    ]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    spec = tiny_spec(
        data,
        data={"format": "chat", "max_seq_len": 32, "eval_fraction": 0.25},
        method="lora",
        lora={"r": 4, "alpha": 8},
        optim={"lr": 1e-3, "max_steps": 3, "batch_size": 4},
        scaling={"num_workers": 2},
        eval={"every_steps": 3},
        logging={"every_steps": 1},
        output={"name": "console-check", "overwrite": True},
    )
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def train(job: Path, *extra: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "RAYFT_LOG_LEVEL"}
    environ.update(RAYFT_HOME=str(job.parent / "home"), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    done = subprocess.run(
        [sys.executable, "-m", "rayft.cluster.cli", "train", str(job), *extra],
        cwd=job.parent,
        env=environ,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return done


def test_quiet_console_shows_rayft_lines_and_no_ray_worker_logs(job: Path) -> None:
    done = train(job)
    # stdout is the machine-readable result and nothing else.
    lines = done.stdout.splitlines()
    assert len(lines) == 1, done.stdout
    assert json.loads(lines[0])["metrics"]["step"] == 3
    err = done.stderr
    assert "[rayft] run " in err and "[rayft] data: " in err
    # One line says what the run chose: its steps, effective batch and learning rate.
    assert (
        "[rayft] plan: 3 optimizer steps (optim.max_steps), effective batch 8 "
        "(4 per worker x 1 accumulation x 2 workers), lr 0.001"
    ) in err
    assert "train step 3/3" in err and "eval  step 3/3" in err
    assert "[rayft] adapter published: " in err
    assert "training:" in err  # the bar
    for noise in NOISE:
        assert noise not in err, f"{noise!r} on the console:\n{err[-3000:]}"


def test_verbose_brings_back_ray_worker_logs(job: Path) -> None:
    done = train(job, "--verbose")
    assert "(RayTrainWorker" in done.stderr + done.stdout
    assert "train step 3/3" in done.stderr
