"""Prometheus metrics of served traffic, exported through Ray's metrics agent.

Every replica records into ``ray.serve.metrics`` objects; Ray's metrics agent on each
node serves them with every other Ray metric at ``http://<node>:<metrics export
port>/metrics`` (``ray.init(_metrics_export_port=P)`` / ``ray start
--metrics-export-port=P``; ``rayft serve --metrics-port P`` for the embedded cluster,
which binds it to 127.0.0.1). Ray prefixes every name with ``ray_`` and Serve adds the
``deployment``, ``replica`` and ``application`` tags. ``model`` is the base model's
name or the adapter's (``(none)`` for requests that named nothing servable):

    ray_rayft_requests_total{model, route, status}      requests by HTTP status
    ray_rayft_prompt_tokens_total{model}                 prompt tokens
    ray_rayft_generated_tokens_total{model}              generated tokens
    ray_rayft_time_to_first_token_seconds{model}         histogram (completions and chats)
    ray_rayft_request_latency_seconds{model, route}      histogram, arrival to last byte
    ray_rayft_queued_rows                                rows waiting in the decode loop
    ray_rayft_running_rows                               rows in the running batch
    ray_rayft_loaded_adapters                            adapters held by the replica
    ray_rayft_adapter_evictions_total{model}             adapters evicted by the LRU

``RequestMonitor`` is the one place where requests are observed: an ASGI middleware
around the whole app, so answers from every route, from the body and key checks and
from the error handlers are counted alike. (A 429 from Serve's own queue limit is
answered by Serve's proxy before a replica sees the request; Serve counts it in
``ray_serve_num_http_error_requests_total``.)
"""

from __future__ import annotations

import logging
from typing import Any

from rayft.serving.request_log import (
    GENERATION_ROUTES,
    RequestRecord,
    bind,
    new_request_id,
    unbind,
)

NO_MODEL = "(none)"
# From a few milliseconds (a GPU answering a short prompt) to minutes (a CPU decoding
# long answers): every rayft deployment finds its range inside.
LATENCY_BOUNDARIES_S = [
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0, 300.0, 600.0,
]  # fmt: skip
TTFT_BOUNDARIES_S = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
]  # fmt: skip
ERROR_BODY_BYTES = 4096

log = logging.getLogger(__name__)


class NullMetrics:
    """Records nothing: a service used outside Ray (tests, ``rayft eval --in-process``)."""

    def observe_request(self, record: RequestRecord) -> None:
        """Count one finished request (its status, tokens and latencies)."""

    def set_rows(self, queued: int, running: int) -> None:
        """Rows waiting in the decode loop and rows in the running batch now."""

    def set_loaded_adapters(self, count: int) -> None:
        """Adapters the replica holds now."""

    def adapter_evicted(self, name: str) -> None:
        """The LRU evicted ``name`` to make room for another adapter."""


class ServingMetrics(NullMetrics):
    """The replica's metrics as ``ray.serve.metrics`` objects (Ray must be initialised)."""

    def __init__(self) -> None:
        from ray.serve.metrics import Counter, Gauge, Histogram

        self.requests = Counter(
            "rayft_requests",
            description="HTTP requests answered, by model, route and status code.",
            tag_keys=("model", "route", "status"),
        )
        self.prompt_tokens = Counter(
            "rayft_prompt_tokens", description="Prompt tokens, by model.", tag_keys=("model",)
        )
        self.generated_tokens = Counter(
            "rayft_generated_tokens", description="Generated tokens, by model.", tag_keys=("model",)
        )
        self.ttft = Histogram(
            "rayft_time_to_first_token_seconds",
            description="Seconds from a request's arrival to its first generated token.",
            boundaries=TTFT_BOUNDARIES_S,
            tag_keys=("model",),
        )
        self.latency = Histogram(
            "rayft_request_latency_seconds",
            description="Seconds from a request's arrival to the end of its answer.",
            boundaries=LATENCY_BOUNDARIES_S,
            tag_keys=("model", "route"),
        )
        self.queued = Gauge("rayft_queued_rows", description="Rows waiting in the decode loop.")
        self.running = Gauge("rayft_running_rows", description="Rows in the running batch.")
        self.loaded = Gauge("rayft_loaded_adapters", description="Adapters held by the replica.")
        self.evictions = Counter(
            "rayft_adapter_evictions",
            description="Adapters evicted by the replica's LRU, by adapter.",
            tag_keys=("model",),
        )
        self.set_rows(0, 0)
        self.set_loaded_adapters(0)

    def observe_request(self, record: RequestRecord) -> None:
        model = record.model or NO_MODEL
        by_model = {"model": model}
        self.requests.inc(1, {**by_model, "route": record.route, "status": str(record.status)})
        if record.latency_s is not None:
            self.latency.observe(record.latency_s, {**by_model, "route": record.route})
        # Ray's counters refuse increments of 0.
        if record.prompt_tokens > 0:
            self.prompt_tokens.inc(record.prompt_tokens, by_model)
        if record.completion_tokens > 0:
            self.generated_tokens.inc(record.completion_tokens, by_model)
        if record.ttft_s is not None and record.route in GENERATION_ROUTES:
            self.ttft.observe(record.ttft_s, by_model)

    def set_rows(self, queued: int, running: int) -> None:
        self.queued.set(queued, {})
        self.running.set(running, {})

    def set_loaded_adapters(self, count: int) -> None:
        self.loaded.set(count, {})

    def adapter_evicted(self, name: str) -> None:
        self.evictions.inc(1, {"model": name})


def replica_metrics() -> NullMetrics:
    """``ServingMetrics`` when Ray is running here, else ``NullMetrics``."""
    import ray

    if not ray.is_initialized():
        return NullMetrics()
    try:
        return ServingMetrics()
    except Exception:  # noqa: BLE001 - monitoring must never keep a replica from serving
        log.exception("cannot create the serving metrics; serving without them")
        return NullMetrics()


def metrics_urls() -> list[str]:
    """The Prometheus scrape URL of every live node of the connected Ray cluster."""
    import ray

    urls = []
    for node in ray.nodes():
        port = node.get("MetricsExportPort")
        if node.get("Alive") and port and int(port) > 0:
            urls.append(f"http://{node['NodeManagerAddress']}:{port}/metrics")
    return urls


# ------------------------------------------------------------ the middleware


class RequestMonitor:
    """ASGI middleware: one ``RequestRecord`` per HTTP request, observed when it ends.

    The record is the current request (``serving.request_log.current_request``) while
    the app runs, so the routes and the decode loop note the model, token counts and
    first token on it; the status comes from the response itself. At the end the
    service counts it in the metrics and writes its request-log line.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        record = RequestRecord(
            new_request_id(), method=scope.get("method", ""), path=scope.get("path", "")
        )
        # Bodies are kept only where their prompts are logged (never file uploads).
        keep_body = record.path in GENERATION_ROUTES and bool(
            getattr(scope["app"].state.service, "keeps_payloads", False)
        )
        chunks: list[bytes] = []

        async def tee() -> dict[str, Any]:
            message = await receive()
            if keep_body and message["type"] == "http.request":
                chunks.append(message.get("body", b""))
            return message

        async def watch(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                record.status = int(message["status"])
            elif message["type"] == "http.response.body" and record.status >= 400:
                if record.error is None:
                    record.error = _error_code(message.get("body", b""))
            await send(message)

        token = bind(record)
        try:
            await self.app(scope, tee, watch)
        except Exception:
            record.status = record.status or 500
            raise
        finally:
            unbind(token)
            record.latency_s = record.elapsed()
            record.status = record.status or 499  # the client went away before an answer
            record.route = _route(scope)
            record.body = b"".join(chunks)
            scope["app"].state.service.observe(record)


def _route(scope: dict[str, Any]) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    if isinstance(path, str):
        return path
    # Refused before routing (body size, API key): name the route only if it is one.
    wanted = scope.get("path", "")
    for candidate in getattr(scope["app"], "routes", ()):
        if getattr(candidate, "path", None) == wanted:
            return wanted
    return "other"


def _error_code(body: bytes) -> str:
    import json

    try:
        error = json.loads(body[:ERROR_BODY_BYTES])["error"]
        return str(error.get("code") or error.get("type") or "error")
    except (ValueError, KeyError, TypeError, AttributeError):
        return "error"
