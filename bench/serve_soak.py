"""Serving soak: many requests over base + adapters, no errors, replica memory flat.

    .venv/bin/python bench/serve_soak.py [--model tiny-llama] [--requests 2000]
        [--concurrency 16] [--adapters 3] [--max-tokens 16] [--replica-cpus 1]

A real Ray Serve application (one replica) is sent ``--requests`` requests by
``--concurrency`` concurrent clients over HTTP on 127.0.0.1. Request ``i`` goes to the
base model or one of ``--adapters`` LoRA adapters in turn, and alternates between
``/v1/completions`` and ``/v1/chat/completions``; every fifth one streams. An error is
any answer but 200, a connection failure, or a stream that does not end with
``data: [DONE]``. The replica's resident memory (RSS, read by the pid that ``/health``
reports) is taken after the first 200 requests and after the last; the target is 0
errors and the second within 5 % of the first. The last lines are ``errors=<n>`` and
``rss_growth_pct=<x>``; the exit code is 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import httpx

PROMPTS = [
    "name a red thing",
    "what is the capital of france",
    "write one sentence about the sea",
    "list three numbers",
]
WARM_REQUESTS = 200
RSS_TARGET_PCT = 5.0


def replica_rss(url: str) -> tuple[int, int]:
    """``(pid, RSS in bytes)`` of the replica answering ``url``."""
    import httpx
    import psutil

    pid = int(httpx.get(f"{url}/health", timeout=30).json()["pid"])
    return pid, psutil.Process(pid).memory_info().rss


def request_for(i: int, models: list[str], max_tokens: int) -> tuple[str, dict, bool]:
    """Route, body and whether to stream for request ``i``."""
    model, prompt = models[i % len(models)], PROMPTS[i % len(PROMPTS)]
    stream = i % 5 == 4
    body: dict = {"model": model, "max_tokens": max_tokens, "temperature": 0, "stream": stream}
    if (i // len(models)) % 2:
        return (
            "/v1/chat/completions",
            {**body, "messages": [{"role": "user", "content": prompt}]},
            stream,
        )
    return "/v1/completions", {**body, "prompt": prompt}, stream


def stream_problem(status: int, text: str) -> str | None:
    """What is wrong with a streamed answer (status and SSE body), or None."""
    if status != 200 or not text.rstrip().endswith("data: [DONE]"):
        return f"stream {status}: {text[-200:]!r}"
    if '"error"' in text:
        return f"stream error event: {text[-200:]!r}"
    return None


async def send_request(
    http: httpx.AsyncClient, url: str, route: str, body: dict, stream: bool
) -> str | None:
    """Send one request; None when it succeeded, else what went wrong."""
    import httpx

    try:
        if not stream:
            response = await http.post(f"{url}{route}", json=body)
            return (
                None
                if response.status_code == 200
                else f"{response.status_code} {response.text[:200]}"
            )
        async with http.stream("POST", f"{url}{route}", json=body) as response:
            text = "".join([t async for t in response.aiter_text()])
        return stream_problem(response.status_code, text)
    except httpx.HTTPError as err:
        return f"{type(err).__name__}: {err}"


async def soak(url: str, models: list[str], args: argparse.Namespace) -> dict:
    import httpx

    state = {"next": 0, "done": 0, "errors": [], "latencies": [], "rss_warm": None}

    async def send(http: httpx.AsyncClient, i: int) -> str | None:
        route, body, stream = request_for(i, models, args.max_tokens)
        return await send_request(http, url, route, body, stream)

    async def client(http: httpx.AsyncClient) -> None:
        while state["next"] < args.requests:
            i = state["next"]
            state["next"] += 1
            start = time.perf_counter()
            error = await send(http, i)
            state["latencies"].append(time.perf_counter() - start)
            if error is not None:
                state["errors"].append((i, error))
            state["done"] += 1
            if state["done"] == WARM_REQUESTS:
                state["rss_warm"] = replica_rss(url)
            if state["done"] % 250 == 0:
                print(
                    f"  {state['done']}/{args.requests} requests, {len(state['errors'])} errors",
                    flush=True,
                )

    limits = httpx.Limits(max_connections=args.concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(args.concurrency)))
        state["wall_s"] = time.perf_counter() - start
    return state


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--adapters", type=int, default=3, help="adapters besides the base (1-4)")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--replica-cpus", type=int, default=1)
    parser.add_argument("--storage", default=None, help="rayft root (default: a temporary one)")
    args = parser.parse_args()
    if args.requests <= WARM_REQUESTS:
        parser.error(f"--requests must be above {WARM_REQUESTS} (RSS is first taken there)")

    from serve_throughput import ADAPTERS, make_adapters  # same folder: the bench adapters

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    home = Path(args.storage or tempfile.mkdtemp(prefix="rayft-soak-"))
    os.environ["RAYFT_HOME"] = str(home)
    make_adapters(args.model, home)
    models = [args.model, *ADAPTERS[: args.adapters]]

    import ray
    from ray import serve

    from rayft.serving.client import run_app

    ray.init(
        address="local",
        num_cpus=max(2, args.replica_cpus + 1),
        include_dashboard=False,
        logging_level="ERROR",
        runtime_env={
            "env_vars": {"RAYFT_HOME": str(home), "OMP_NUM_THREADS": str(args.replica_cpus)}
        },
    )
    try:
        url = run_app(
            {
                "model": args.model,
                "storage": str(home),
                "max_loaded_adapters": max(1, args.adapters),
                "dtype": "float32",
                "num_cpus": args.replica_cpus,
                "max_tokens_limit": max(64, args.max_tokens),
            }
        )
        pid_start, rss_start = replica_rss(url)
        print(
            f"soak: model={args.model} requests={args.requests} concurrency={args.concurrency} "
            f"models={','.join(models)} max_tokens={args.max_tokens} replica pid {pid_start}, "
            f"RSS {rss_start / 2**20:.1f} MiB at start",
            flush=True,
        )
        state = asyncio.run(soak(url, models, args))
        pid_end, rss_end = replica_rss(url)
    finally:
        serve.shutdown()
        ray.shutdown()

    pid_warm, rss_warm = state["rss_warm"]
    growth = 100.0 * (rss_end - rss_warm) / rss_warm
    latencies = sorted(state["latencies"])
    for i, error in state["errors"][:10]:
        print(f"  request {i}: {error}")
    print(
        f"{args.requests} requests in {state['wall_s']:.1f} s "
        f"({args.requests / state['wall_s']:.1f} req/s), p50 {statistics.median(latencies):.3f} s, "
        f"p99 {latencies[int(0.99 * (len(latencies) - 1))]:.3f} s"
    )
    print(
        f"replica RSS: {rss_warm / 2**20:.1f} MiB after {WARM_REQUESTS} requests, "
        f"{rss_end / 2**20:.1f} MiB after {args.requests}; "
        f"same replica throughout: {pid_start == pid_warm == pid_end}"
    )
    print(f"errors={len(state['errors'])}")
    print(f"rss_growth_pct={growth:.2f}")
    missed = state["errors"] or growth > RSS_TARGET_PCT or not pid_start == pid_warm == pid_end
    return 1 if missed else 0


if __name__ == "__main__":
    raise SystemExit(main())
