"""What the compatibility shims of ``trainers/compat.py`` do to the real libraries."""

from __future__ import annotations

import socket
import subprocess
import sys

SHM_PROBE = """
import os, sys
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0",
                  WORLD_SIZE="1", LOCAL_RANK="0")
import torch, torch.distributed as dist
dist.init_process_group("gloo")
import deepspeed
from rayft.trainers.compat import skip_deepspeed_shm_op
skip_deepspeed_shm_op()
model = torch.nn.Linear(4, 4)
engine, *_ = deepspeed.initialize(
    model=model, optimizer=torch.optim.AdamW(model.parameters()),
    config={"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 2}},
    dist_init_required=False,
)
from deepspeed.comm import comm
print("shm_comm_op:", comm.cdb.shm_comm_op)
dist.destroy_process_group()
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_deepspeed_engine_on_cpu_builds_no_shared_memory_op():
    proc = subprocess.run(
        [sys.executable, "-c", SHM_PROBE, str(_free_port())],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "shm_comm_op: None" in proc.stdout, proc.stdout[-2000:]
    assert "built successfully" not in proc.stdout + proc.stderr
