"""Stopping what a test started in another process (imported as ``processes``; ``tests/``
is on ``sys.path`` because ``tests/conftest.py`` lives there)."""

from __future__ import annotations

import os
import signal
import subprocess

import psutil


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a process and every process under it, each by its pid."""
    try:
        tree = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    for pid in [proc.pid, *(child.pid for child in tree)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=60)
    psutil.wait_procs(tree, timeout=60)
