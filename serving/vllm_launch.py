"""Run vLLM's OpenAI server for as long as the process that started it lives.

``serving.vllm_engine.VllmServer`` runs this file (not a rayft import: vLLM's Python
environment need not have rayft) in a session of its own, so that stopping the server
stops its engine processes too. A replica that is killed without a chance to stop it
leaves no server behind: a thread here watches the parent and ends the whole session
once the parent is gone. The arguments are vLLM's.
"""

import os
import runpy
import signal
import sys
import threading
import time

POLL_S = 1.0


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(POLL_S)
    os.killpg(os.getpgrp(), signal.SIGTERM)
    time.sleep(10)
    os.killpg(os.getpgrp(), signal.SIGKILL)


if __name__ == "__main__":
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    sys.argv = ["vllm.entrypoints.openai.api_server", *sys.argv[1:]]
    runpy.run_module("vllm.entrypoints.openai.api_server", run_name="__main__", alter_sys=True)
