"""``rayft serve`` stopped with SIGTERM drains: it finishes what it admitted, then exits 0.

The CLI runs in its own process on tiny-llama (an embedded Ray cluster, Serve's proxy,
one replica). A long generation is in flight when SIGTERM arrives: it must still be
answered 200 in full; new requests must be refused (503 with ``Retry-After``, or the
connection refused once the proxy is gone); the command must exit 0 having printed one
line after the signal, with no native stack trace.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from processes import kill_tree

pytestmark = pytest.mark.fault

# Two rows of up to 120 tokens (this seed runs to the limit): seconds of decoding on a CPU.
LONG = {
    "model": "tiny-llama",
    "prompt": "count to ten",
    "n": 2,
    "max_tokens": 120,
    "temperature": 1.0,
    "seed": 7,
}


def _wait_for_url(out: Path, proc: subprocess.Popen, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for line in out.read_text().splitlines():
            if line.startswith("http://"):
                return line.strip()
        assert proc.poll() is None, f"rayft serve exited {proc.returncode}"
        time.sleep(0.5)
    raise AssertionError(f"rayft serve printed no URL within {timeout_s} s")


def _refused(url: str) -> bool:
    try:
        answer = httpx.get(f"{url}/v1/models", timeout=10)
    except httpx.TransportError:
        return True
    return answer.status_code == 503 and bool(answer.headers.get("Retry-After"))


def test_sigterm_drains_in_flight_requests_and_exits_zero(rayft_home, tiny_model_dir, tmp_path):
    from rayft.serving.client import free_port

    unset = ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_ADDRESS", "RAYFT_BIND_ADDRESS")
    env = {k: v for k, v in os.environ.items() if k not in unset}
    env.update(RAYFT_HOME=str(rayft_home), TOKENIZERS_PARALLELISM="false")
    out, err = tmp_path / "out.txt", tmp_path / "err.txt"
    command = [sys.executable, "-m", "rayft.cluster.cli", "serve", "model=tiny-llama"]
    command += ["dtype=float32", "--port", str(free_port()), "--grace-period", "120"]
    with open(out, "w") as stdout, open(err, "w") as stderr:
        proc = subprocess.Popen(command, env=env, stdout=stdout, stderr=stderr)
    try:
        url = _wait_for_url(out, proc, 300)
        answers: list[httpx.Response] = []
        long = threading.Thread(
            target=lambda: answers.append(
                httpx.post(f"{url}/v1/completions", json=LONG, timeout=300)
            )
        )
        long.start()
        deadline = time.monotonic() + 60
        while httpx.get(f"{url}/health", timeout=10).json()["running_rows"] == 0:
            assert time.monotonic() < deadline and long.is_alive(), "the request never ran"
            time.sleep(0.05)
        said_before = len(err.read_text().splitlines())
        proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        assert long.is_alive(), "the long request ended before the signal: make it longer"
        refused = False
        while long.is_alive() and not refused:
            refused = _refused(url)
            time.sleep(0.1)
        long.join(timeout=300)
        rc = proc.wait(timeout=180)
    finally:
        if proc.poll() is None:
            kill_tree(proc)
    said = err.read_text()
    after = [line for line in said.splitlines()[said_before:] if line.strip()]
    assert answers and answers[0].status_code == 200, answers and answers[0].text
    assert len(answers[0].json()["choices"]) == 2
    assert refused or _refused(url), "a request after the signal was admitted"
    assert rc == 0, said[-3000:]
    assert "Aborted" not in said and "Stack trace" not in said and "Fatal" not in said
    assert len(after) == 1 and after[0].startswith("[rayft] stopped"), after
    assert time.monotonic() - signalled < 180
