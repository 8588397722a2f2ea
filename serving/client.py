"""Starting the serving application from Python and asking it questions over HTTP.

``run_app`` puts the application on the connected Ray cluster with Serve's HTTP proxy
on a chosen host and port; ``serve_and_ask`` is the end of the quick-start job: serve
a freshly trained adapter, ask the base model and the adapter the same question, and
take the application down again.
"""

from __future__ import annotations

import socket
import time
from typing import Any

from rayft.serving.http_guard import InsecureServing, check_exposure, is_loopback
from rayft.trainers.compat import serve_proxy_address

__all__ = [
    "APP_NAME",
    "InsecureServing",
    "check_exposure",
    "free_port",
    "is_loopback",
    "drain_app",
    "run_app",
]

APP_NAME = "rayft"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def run_app(
    args: dict[str, Any],
    host: str = "127.0.0.1",
    port: int | None = None,
    name: str = APP_NAME,
    insecure: bool = False,
    routers: list[str] | None = None,
) -> str:
    """Deploy the rayft application on the connected Ray cluster and wait until it is ready.

    Args:
        args: ``ServeArgs`` fields.
        host: Interface for Serve's HTTP proxy (loopback unless the caller widens it).
        port: Proxy port; a free one when ``None``. Ignored when Serve already runs,
            in which case its proxy's address is used.
        name: Serve application name.
        insecure: Serve beyond loopback even without ``RAYFT_API_KEY``.
        routers: Import paths of more routers to mount (``build_app``'s ``routers``);
            ``cluster.service_app.ROUTERS`` adds the fine-tuning jobs API.

    Returns:
        The base URL, e.g. ``http://127.0.0.1:8000``.

    Raises:
        InsecureServing: ``host`` is not loopback, no API key is set and not ``insecure``.
    """
    from ray import serve

    from rayft.serving.app import bind_app

    storage = args.get("storage") if isinstance(args, dict) else getattr(args, "storage", None)
    check_exposure(host, insecure, storage)
    version = app_version(args, routers)
    app = bind_app(args, routers, http_host=host, insecure=insecure, version=version)
    port = port or free_port(host)
    serve.start(http_options={"host": host, "port": port})
    serve.run(app, name=name, route_prefix="/", blocking=False)
    url = proxy_url(default=f"http://{host}:{port}")
    wait_healthy(url)
    return url


def drain_app(
    args: dict[str, Any],
    host: str = "127.0.0.1",
    name: str = APP_NAME,
    insecure: bool = False,
    routers: list[str] | None = None,
) -> None:
    """Stop the running application admitting requests; return once admitted ones finished.

    Redeploys the application that ``run_app`` deployed with the same arguments and
    ``user_config`` ``{"draining": true}``: Serve hands that to every replica's
    ``reconfigure`` in place (no replica restarts), each answers new requests 503 with
    ``Retry-After`` and returns once its requests in flight finished or its
    ``grace_period_s`` passed; ``serve.run`` returns when every replica has.
    Fine-tuning jobs run in detached actors of their own and are not touched.
    """
    import logging

    from ray import serve

    from rayft.serving.app import bind_app

    version = app_version(args, routers)
    app = bind_app(args, routers, http_host=host, insecure=insecure, draining=True, version=version)
    # Serve announces a redeploy as a new app ("connecting", "ready"); stopping says one line.
    serve_logger = logging.getLogger("ray.serve")
    level = serve_logger.level
    serve_logger.setLevel(logging.WARNING)
    try:
        serve.run(app, name=name, route_prefix="/", blocking=False)
    finally:
        serve_logger.setLevel(level)


def app_version(args: dict[str, Any], routers: list[str] | None = None) -> str:
    """Serve's code version of the app ``run_app`` deploys: the same for the same arguments.

    Without one Serve gives every deploy a new version and replaces the replicas; with
    it, the draining redeploy of ``drain_app`` reconfigures them in place.
    """
    import hashlib
    import json

    described = json.dumps([args, routers or []], sort_keys=True, default=str)
    return hashlib.sha256(described.encode()).hexdigest()[:16]


def proxy_url(default: str) -> str:
    """The URL of the running Serve HTTP proxy, or ``default`` if it cannot be read."""
    try:
        host, port = serve_proxy_address()
    except Exception:  # noqa: BLE001 - private API: fall back to what was asked for
        return default
    host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return f"http://{host}:{port}"


def wait_healthy(url: str, timeout_s: float = 300.0) -> None:
    """Block until ``GET {url}/health`` answers 200 (model loaded on a replica)."""
    import httpx

    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        try:
            response = httpx.get(f"{url}/health", timeout=5.0)
            if response.status_code == 200:
                return
            last = f"HTTP {response.status_code}"
        except httpx.HTTPError as err:
            last = type(err).__name__
        time.sleep(0.5)
    raise TimeoutError(f"the rayft application at {url} did not become healthy ({last})")


def greedy_chat(model: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    """The ``/v1/chat/completions`` body of one greedy question from the user."""
    return {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }


def ask(
    url: str,
    model: str,
    prompt: str,
    max_tokens: int = 64,
    api_key: str | None = None,
) -> str:
    """One greedy chat answer from ``model`` at ``url``."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    response = httpx.post(
        f"{url}/v1/chat/completions",
        json=greedy_chat(model, prompt, max_tokens),
        headers=headers,
        timeout=600.0,
    )
    if response.status_code != 200:
        raise RuntimeError(f"{model}: HTTP {response.status_code}: {response.text}")
    return response.json()["choices"][0]["message"]["content"]


def serve_and_ask(
    adapter: str,
    prompt: str,
    max_tokens: int = 64,
    storage: str | None = None,
    dtype: str = "auto",
) -> tuple[str, str]:
    """Serve ``adapter`` and its base model, ask both ``prompt``, then shut the app down.

    Ray must already be initialised (``cluster.connect.connect``). The base model is
    read from the adapter's ``rayft.json``.

    Returns:
        ``(base_answer, adapter_answer)``, both greedy.
    """
    import os

    from ray import serve

    from rayft.trainers.registry import ArtifactManifest, resolve_adapter
    from rayft.trainers.storage import StorageRoot

    manifest = ArtifactManifest.find(resolve_adapter(adapter, StorageRoot.resolve(storage)))
    base = manifest.base_model if manifest is not None else None
    if not base:
        raise ValueError(f"adapter {adapter!r} has no base_model in its rayft.json")
    url = run_app({"model": base, "storage": storage, "max_loaded_adapters": 1, "dtype": dtype})
    try:
        key = os.environ.get("RAYFT_API_KEY")
        return ask(url, base, prompt, max_tokens, key), ask(url, adapter, prompt, max_tokens, key)
    finally:
        serve.delete(APP_NAME)
        serve.shutdown()
