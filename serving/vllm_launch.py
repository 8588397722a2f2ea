"""Run vLLM's OpenAI server for as long as the process that started it lives.

``serving.vllm_engine.VllmServer`` runs this file (not a rayft import: vLLM's Python
environment need not have rayft) as the leader of a session of its own, so that stopping
the server stops its engine processes too. A guardian process, forked first into a
session of its own, outlives both: once the process that started the server (a replica,
a rollout engine) or the server itself is gone, it ends whatever is left of the server's
session. A replica killed without a chance to stop anything, or a server ended by
SIGTERM whose engine processes outlive it, leaves nothing behind. The arguments are
vLLM's.
"""

import os
import runpy
import signal
import sys
import time

POLL_S = 1.0
GRACE_S = float(os.environ.get("RAYFT_VLLM_STOP_GRACE_S", "10"))
"""How long the session's processes may take to end after SIGTERM, before SIGKILL."""


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (FileNotFoundError, IndexError):
        return False


def _end_group(group: int) -> None:
    """SIGTERM every process of ``group``, then SIGKILL what is left after ``GRACE_S``."""
    try:
        os.killpg(group, signal.SIGTERM)
        deadline = time.monotonic() + GRACE_S
        while time.monotonic() < deadline:
            time.sleep(0.2)
            os.killpg(group, 0)  # ProcessLookupError once every process is gone
        os.killpg(group, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _guard(starter: int, server: int) -> None:
    """Fork the guardian: it waits for ``starter`` or ``server`` to end, then ends the
    server's session (whose group id is the server's pid)."""
    if os.fork() != 0:
        return
    os.setsid()  # out of the server's group: its SIGTERM and SIGKILL spare the guardian
    while _alive(starter) and _alive(server):
        time.sleep(POLL_S)
    _end_group(server)
    os._exit(0)


if __name__ == "__main__":
    _guard(os.getppid(), os.getpid())
    sys.argv = ["vllm.entrypoints.openai.api_server", *sys.argv[1:]]
    runpy.run_module("vllm.entrypoints.openai.api_server", run_name="__main__", alter_sys=True)
