"""The vLLM server's launcher (``serving/vllm_launch.py``) leaves no process behind: real
processes in real sessions, with a stand-in for vLLM's server (no vLLM needed)."""

from __future__ import annotations

import sys

import pytest


def live_in_group(group: int) -> list[int]:
    import os

    import psutil

    alive = []
    for pid in psutil.pids():
        try:
            if os.getpgid(pid) == group and psutil.Process(pid).status() != "zombie":
                alive.append(pid)
        except (ProcessLookupError, psutil.NoSuchProcess):
            pass
    return alive


@pytest.mark.parametrize("killed", ["parent", "server"])
def test_the_launchers_session_ends_when_its_parent_or_the_server_dies(tmp_path, killed):
    # A stand-in for vLLM's server, whose engine child ignores SIGTERM as vLLM's engine
    # processes can: once the launcher's parent (a replica, killed as Ray kills an actor)
    # or the server itself (ended by SIGTERM) is gone, nothing of its session is left.
    import os
    import subprocess
    import time

    from rayft.serving.vllm_engine import LAUNCHER

    server = tmp_path / "vllm" / "entrypoints" / "openai"
    server.mkdir(parents=True)
    for folder in (server.parent.parent, server.parent, server):
        (folder / "__init__.py").write_text("")
    engine = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
    (server / "api_server.py").write_text(
        f"import subprocess, sys, time\nsubprocess.Popen([sys.executable, '-c', {engine!r}])\n"
        "time.sleep(600)\n"
    )
    starter = (
        "import subprocess, sys, time\n"
        f"p = subprocess.Popen([sys.executable, {str(LAUNCHER)!r}], start_new_session=True)\n"
        "print(p.pid, flush=True)\ntime.sleep(600)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "RAYFT_VLLM_STOP_GRACE_S": "1"}
    parent = subprocess.Popen([sys.executable, "-c", starter], stdout=subprocess.PIPE, env=env)
    group = int(parent.stdout.readline())
    try:
        deadline = time.monotonic() + 20
        while len(live_in_group(group)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(live_in_group(group)) == 2  # the server and its engine
        if killed == "parent":
            parent.kill()  # no chance to stop anything
            parent.wait()
        else:
            os.kill(group, 15)  # the server's pid leads its group
        deadline = time.monotonic() + 15
        while live_in_group(group) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert live_in_group(group) == []
    finally:
        parent.kill()
        for pid in live_in_group(group):
            os.kill(pid, 9)
