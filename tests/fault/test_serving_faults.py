"""Serving under faults: engine failures, deadlines, oversized bodies, overload, replica loss.

Engine faults are injected by wrapping the engine's forward pass so it raises once, in
prefill or in a decode step, on a real ``ModelEngine`` (tiny-llama) behind the real API
over HTTP on 127.0.0.1. Overload and replica loss run against a real Ray Serve
application (one for the module) over HTTP.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from serving_http import http_server, wait_drained

from rayft.serving.engine import GenerationRequest, ModelEngine, SamplingParams

pytestmark = pytest.mark.fault

PROMPT = "the quick brown fox jumps over"


class FailingForward:
    """Replaces ``engine._run_model``: the ``at``-th forward of ``phase`` raises, once.

    ``phase`` is ``"prefill"`` (a multi-token input) or ``"decode"`` (one token per row).
    """

    def __init__(self, engine: ModelEngine, phase: str, at: int = 1, delay_s: float = 0.0):
        self.engine, self.phase, self.at, self.delay_s = engine, phase, at, delay_s
        self.seen = 0
        self.fired = False
        self.original = engine._run_model

    def __call__(self, adapters: list[str], **inputs: Any) -> Any:
        ids = inputs["input_ids"]
        phase = "prefill" if ids.shape[1] > 1 else "decode"
        if self.delay_s:
            time.sleep(self.delay_s)
        if phase == self.phase and not self.fired:
            self.seen += 1
            if self.seen == self.at:
                self.fired = True
                raise RuntimeError(f"injected {phase} failure")
        return self.original(adapters, **inputs)


@contextmanager
def failing(engine: ModelEngine, phase: str, at: int = 1, delay_s: float = 0.0) -> Iterator:
    fault = FailingForward(engine, phase, at, delay_s)
    engine._run_model = fault
    try:
        yield fault
    finally:
        del engine._run_model  # back to the class's method


@pytest.fixture(scope="module")
def engine(rayft_home: Path, tiny_model_dir: Path) -> ModelEngine:
    return ModelEngine("tiny-llama", storage=str(rayft_home), dtype="float32")


def row(engine: ModelEngine, max_tokens: int) -> GenerationRequest:
    ids = tuple(engine.tokenizer(PROMPT)["input_ids"])
    return GenerationRequest(ids, params=SamplingParams(max_tokens=max_tokens, temperature=0.0))


# ------------------------------------------------------------- engine, directly


def test_prefill_failure_fails_only_admitted_rows_and_keeps_finished_outputs(engine):
    first = engine.submit(row(engine, 2))
    assert [o.request_id for o in engine.step()] == [first]  # prefilled: 1 token
    second = engine.submit(row(engine, 4))
    with failing(engine, "prefill") as fault:
        outputs = {o.request_id: o for o in engine.step()}
    assert fault.fired
    # The first row finished in the same step as the failed prefill: its output survives.
    assert outputs[first].finished and outputs[first].error is None
    assert outputs[first].finish_reason in ("length", "stop")
    failed = outputs[second]
    assert failed.finished and failed.error is not None
    assert (failed.error.status, failed.error.code) == (503, "engine_error")
    assert engine.load() == {"queued_rows": 0, "running_rows": 0}
    assert engine.generate([row(engine, 3)])[0].completion_tokens >= 1


def test_decode_failure_fails_running_rows_and_admits_the_queued(engine):
    running = [engine.submit(row(engine, 8)) for _ in range(2)]
    engine.step()
    assert engine.load()["running_rows"] == 2
    queued = engine.submit(row(engine, 3))
    with failing(engine, "decode") as fault:
        outputs = {o.request_id: o for o in engine.step()}
    assert fault.fired
    for rid in running:
        assert outputs[rid].error is not None and outputs[rid].error.code == "engine_error"
    assert outputs[queued].error is None  # prefilled in the same step, after the failure
    finals = {}
    while engine.has_work():
        finals.update({o.request_id: o for o in engine.step() if o.finished})
    assert finals[queued].error is None and finals[queued].completion_tokens >= 1
    assert engine.load() == {"queued_rows": 0, "running_rows": 0}


# ---------------------------------------------------------------- over HTTP


@pytest.fixture(scope="module")
def server(rayft_home: Path, tiny_model_dir: Path) -> Iterator[tuple[str, Any]]:
    from rayft.serving.openai_api import create_api
    from rayft.serving.service import Limits, ModelService

    engine = ModelEngine("tiny-llama", storage=str(rayft_home), dtype="float32")
    service = ModelService(engine, Limits(max_tokens_limit=64, max_request_bytes=4096), api_key="")
    with http_server(create_api(service)) as url:
        yield url, service
    service.close()


async def _one(http: httpx.AsyncClient, url: str, stream: bool, max_tokens: int) -> dict:
    body = {"model": "tiny-llama", "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0}
    if not stream:
        response = await http.post(f"{url}/v1/completions", json=body)
        return {"status": response.status_code, "body": response.json()}
    async with http.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}) as r:
        raw = "".join([text async for text in r.aiter_text()])
    events = [e.removeprefix("data: ") for e in raw.split("\n\n") if e]
    return {"status": r.status_code, "events": events}


def _outcome(result: dict) -> str:
    """``ok`` or the error code of one request's answer (whole or streamed)."""
    import json

    if "body" in result:
        if result["status"] == 200:
            return "ok"
        assert set(result["body"]["error"]) >= {"message", "type", "code"}
        return result["body"]["error"]["code"]
    assert result["status"] == 200 and result["events"][-1] == "[DONE]"
    payloads = [json.loads(e) for e in result["events"][:-1]]
    errors = [p["error"] for p in payloads if "error" in p]
    return errors[0]["code"] if errors else "ok"


def _burst(url: str, count: int, max_tokens: int) -> list[dict]:
    async def go() -> list[dict]:
        async with httpx.AsyncClient(timeout=60) as http:
            return await asyncio.gather(
                *(_one(http, url, i % 4 == 3, max_tokens) for i in range(count))
            )

    return asyncio.run(go())


@pytest.mark.parametrize(("phase", "at"), [("prefill", 1), ("decode", 3)])
def test_engine_failure_answers_all_8_requests_and_the_next_succeeds(server, phase, at):
    url, service = server
    with failing(service.engine, phase, at) as fault:
        outcomes = [_outcome(r) for r in _burst(url, 8, max_tokens=24)]
    assert fault.fired
    assert len(outcomes) == 8 and set(outcomes) <= {"ok", "engine_error"}
    assert "engine_error" in outcomes
    body = {"model": "tiny-llama", "prompt": PROMPT, "max_tokens": 4}
    assert httpx.post(f"{url}/v1/completions", json=body, timeout=60).status_code == 200
    state = wait_drained(url)
    assert (state["open_routes"], state["queued_rows"], state["running_rows"]) == (0, 0, 0)


def test_engine_failure_answer_is_503_engine_error_in_openais_shape(server):
    url, service = server
    with failing(service.engine, "prefill"):
        response = httpx.post(
            f"{url}/v1/completions",
            json={"model": "tiny-llama", "prompt": PROMPT, "max_tokens": 4},
            timeout=60,
        )
    assert response.status_code == 503
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("server_error", "engine_error")
    assert "prefill" in error["message"]


def test_evaluation_failure_is_503_engine_error_and_the_next_one_succeeds(server):
    url, service = server
    body = {"model": "tiny-llama", "rows": [{"prompt": "one two", "completion": " three"}]}
    with failing(service.engine, "prefill") as fault:
        response = httpx.post(f"{url}/v1/evaluations", json=body, timeout=60)
    assert fault.fired
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "engine_error"
    again = httpx.post(f"{url}/v1/evaluations", json=body, timeout=60)
    assert again.status_code == 200 and again.json()["tokens"] > 0


def test_every_request_ends_by_its_deadline(server):
    url, service = server
    service.loop.request_timeout_s = 0.5
    try:
        # Every forward pass slowed to 50 ms: 60 tokens cannot finish in 0.5 s.
        with failing(service.engine, "none", delay_s=0.05):
            start = time.monotonic()
            results = _burst(url, 4, max_tokens=60)
            elapsed = time.monotonic() - start
    finally:
        service.loop.request_timeout_s = 600.0
    assert [_outcome(r) for r in results] == ["request_timeout"] * 4
    assert elapsed < 5.0
    assert [r["status"] for r in results if "body" in r] == [503] * 3
    state = wait_drained(url)
    assert (state["open_routes"], state["queued_rows"], state["running_rows"]) == (0, 0, 0)


def test_chunked_body_over_the_limit_is_413_over_http(server):
    url, _ = server

    def chunks(count: int) -> Iterator[bytes]:
        yield b'{"model": "tiny-llama", "prompt": "hi", "max_tokens": 2, "user": "'
        for _ in range(count):
            yield b"x" * 1024
        yield b'"}'

    headers = {"content-type": "application/json"}
    big = httpx.post(f"{url}/v1/completions", content=chunks(8), headers=headers, timeout=30)
    assert big.status_code == 413 and big.json()["error"]["message"]
    small = httpx.post(f"{url}/v1/completions", content=chunks(1), headers=headers, timeout=30)
    assert small.status_code == 200, small.text


# ------------------------------------------------------------- real Ray Serve

CAPACITY = {"max_ongoing_requests": 2, "max_queued_requests": 2}


@pytest.fixture(scope="module")
def serve_url(ray_cluster, rayft_home: Path) -> Iterator[str]:
    """One rayft Serve application for the module's overload and replica-loss tests, on
    the shared cluster (which outlives the module: only Serve is shut down)."""
    from ray import serve

    from rayft.serving.client import run_app

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    args = {
        "model": "tiny-llama",
        "storage": str(rayft_home),
        "dtype": "float32",
        "num_cpus": 1,
        "max_tokens_limit": 1000,
        **CAPACITY,
    }
    try:
        yield run_app(args)
    finally:
        serve.shutdown()


LONG = {"model": "tiny-llama", "prompt": PROMPT, "max_tokens": 400, "temperature": 0}


def test_four_times_capacity_gets_fast_429s_and_admitted_requests_succeed(serve_url):
    capacity = sum(CAPACITY.values())
    count = 4 * capacity

    async def go() -> list[tuple[int, float, httpx.Headers, Any]]:
        limits = httpx.Limits(max_connections=count, max_keepalive_connections=count)
        async with httpx.AsyncClient(timeout=120, limits=limits) as http:
            # Open every connection first, so the burst measures the server, not TCP setup.
            await asyncio.gather(*(http.get(f"{serve_url}/health") for _ in range(count)))

            async def timed() -> tuple[int, float, httpx.Headers, Any]:
                start = time.perf_counter()
                response = await http.post(f"{serve_url}/v1/completions", json=LONG)
                elapsed = time.perf_counter() - start
                body = response.json() if response.status_code == 200 else response.text
                return response.status_code, elapsed, response.headers, body

            return await asyncio.gather(*(timed() for _ in range(count)))

    results = asyncio.run(go())
    statuses = sorted(r[0] for r in results)
    assert set(statuses) <= {200, 429}, statuses
    admitted = [r for r in results if r[0] == 200]
    rejected = [r for r in results if r[0] == 429]
    # Serve's router counts a request as queued only until it is handed to a replica, so
    # while hand-offs are under way a few more than the capacity can slip in (seen: 7 for a
    # capacity of 4 on a loaded 2-core machine); at least half of a 4x burst is shed at once.
    assert 1 <= len(admitted) <= 2 * capacity
    assert len(rejected) >= count - 2 * capacity
    for _, elapsed, headers, _ in rejected:
        assert elapsed < 0.1, f"a 429 took {elapsed * 1000:.0f} ms"
        assert int(headers["retry-after"]) >= 1
    for *_, body in admitted:
        assert body["usage"]["completion_tokens"] >= 1


def test_killed_replica_is_replaced_and_in_flight_requests_get_an_error(serve_url):
    old_pid = httpx.get(f"{serve_url}/health", timeout=30).json()["pid"]
    body = {**LONG, "max_tokens": 1000}

    async def in_flight() -> tuple[int | str, str]:
        async with httpx.AsyncClient(timeout=60) as http:

            async def whole() -> int | str:
                try:
                    return (await http.post(f"{serve_url}/v1/completions", json=body)).status_code
                except httpx.TimeoutException:
                    return "hang"

            whole_task = asyncio.create_task(whole())
            stream_body = {**body, "stream": True}
            try:
                async with http.stream(
                    "POST", f"{serve_url}/v1/completions", json=stream_body
                ) as response:
                    chunks = response.aiter_text()
                    seen = await chunks.__anext__()  # the replica is decoding both now
                    os.kill(old_pid, signal.SIGKILL)
                    async for text in chunks:
                        seen += text
                streamed = "complete" if seen.rstrip().endswith("data: [DONE]") else "cut"
            except httpx.TimeoutException:
                streamed = "hang"
            except httpx.HTTPError:
                streamed = "cut"  # the connection broke off: the client knows at once
            return await whole_task, streamed

    start = time.monotonic()
    status, streamed = asyncio.run(in_flight())
    assert isinstance(status, int) and status >= 500, status
    assert streamed == "cut"
    body = {"model": "tiny-llama", "prompt": PROMPT, "max_tokens": 4}
    recovered = None
    while time.monotonic() - start < 60:
        try:
            response = httpx.post(f"{serve_url}/v1/completions", json=body, timeout=10)
            if response.status_code == 200:
                recovered = time.monotonic() - start
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    assert recovered is not None, "no request succeeded within 60 s of the kill"
    assert httpx.get(f"{serve_url}/health", timeout=30).json()["pid"] != old_pid
