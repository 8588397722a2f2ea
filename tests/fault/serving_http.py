"""A rayft API served over real HTTP on 127.0.0.1, in this process, for fault tests.

The replica's FastAPI app (``create_api``) runs under uvicorn on a background thread with
one event loop for the server's whole life, as it does inside a Serve replica; tests
reach its engine directly to inject faults.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx


@contextmanager
def http_server(app: Any) -> Iterator[str]:
    """Serve ``app`` on a free loopback port; yields its base URL, stops it on exit."""
    import uvicorn

    from rayft.serving.client import free_port

    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="rayft-test-http", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError(f"the test HTTP server on {url} did not start")
        time.sleep(0.05)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def wait_drained(url: str, timeout_s: float = 10.0, headers: dict | None = None) -> dict:
    """``/health`` once no row is routed, queued or running (or the last one seen)."""
    deadline = time.monotonic() + timeout_s
    while True:
        state = httpx.get(f"{url}/health", headers=headers, timeout=10).json()
        idle = state["open_routes"] == state["queued_rows"] == state["running_rows"] == 0
        if idle or time.monotonic() > deadline:
            return state
        time.sleep(0.05)
