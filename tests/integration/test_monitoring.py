"""Monitoring of served traffic on a local Ray Serve app (CPU, tiny-llama): Prometheus
metrics read from Ray's metrics export over HTTP, the request log, and evaluations on
the logged traffic.

One module-scoped server: the embedded cluster started by ``cluster.connect`` with a
fixed metrics export port, the app with ``request_log`` and ``log_payloads`` on and an
LRU of one adapter, so alternating adapters evicts.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest_serving import make_peft_adapter

pytestmark = pytest.mark.slow

SAMPLE = re.compile(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)$")
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


@pytest.fixture(scope="module")
def monitored(rayft_home: Path, tiny_model_dir: Path) -> Iterator[dict]:
    import ray
    from ray import serve

    from rayft.cluster.connect import connect
    from rayft.serving.client import free_port, run_app

    for name, seed in (("m1", 21), ("m2", 22)):
        make_peft_adapter(rayft_home, name, seed)
    port = free_port()
    # Ray exports every 10 s by default; the test reads sooner.
    os.environ["RAY_metrics_report_interval_ms"] = "1000"
    connect(None, metrics_export_port=port)
    args = {
        "model": "tiny-llama",
        "storage": str(rayft_home),
        "max_loaded_adapters": 1,
        "dtype": "float32",
        "max_tokens_limit": 16,
        "num_cpus": 1,
        "request_log": True,
        "log_payloads": True,
    }
    try:
        url = run_app(args)
        yield {"url": url, "metrics": f"http://127.0.0.1:{port}/metrics", "home": rayft_home}
    finally:
        os.environ.pop("RAY_metrics_report_interval_ms", None)
        serve.shutdown()
        ray.shutdown()


def scrape(url: str) -> list[tuple[str, dict[str, str], float]]:
    """``(name, labels, value)`` of every sample in a Prometheus text exposition."""
    samples = []
    for line in httpx.get(url, timeout=10).text.splitlines():
        match = SAMPLE.match(line)
        if match and not line.startswith("#"):
            labels = dict(LABEL.findall(match.group(2) or ""))
            samples.append((match.group(1), labels, float(match.group(3))))
    return samples


def total(samples, name: str, **labels: str) -> float:
    return sum(v for n, lab, v in samples if n == name and labels.items() <= lab.items())


def chat(model: str, text: str, **extra) -> dict:
    return {
        "model": model,
        "messages": [{"role": "user", "content": text}],
        "max_tokens": 6,
        "temperature": 0,
        **extra,
    }


def send_traffic(url: str) -> list[dict]:
    """Requests to the base model and to two adapters, answered and refused; what each got."""
    sent = []

    def post(path: str, **kwargs) -> httpx.Response:
        response = httpx.post(f"{url}{path}", timeout=120, **kwargs)
        sent.append({"path": path, "status": response.status_code, "response": response})
        return response

    for text in ("name a red thing", "hello", "name a blue thing"):
        post("/v1/chat/completions", json=chat("tiny-llama", text))
    post(
        "/v1/completions",
        json={"model": "m1", "prompt": "the sky is", "max_tokens": 5, "temperature": 0},
    )
    post(
        "/v1/completions",
        json={"model": "m1", "prompt": "snow is", "max_tokens": 4, "temperature": 0, "n": 2},
    )
    body = chat("m2", "name a green thing", stream=True, stream_options={"include_usage": True})
    post("/v1/chat/completions", json=body)  # loads m2: m1 is evicted
    post("/v1/chat/completions", json=chat("m1", "hello again"))  # m2 is evicted
    post("/v1/chat/completions", json=chat("m1", "too long", max_tokens=999))  # 400
    post("/v1/chat/completions", json=chat("no-such-adapter", "hi"))  # 404
    post("/v1/chat/completions", content=b"{not json")  # 400
    return sent


def usage(entry: dict) -> dict:
    response = entry["response"]
    if response.headers["content-type"].startswith("text/event-stream"):
        events = [line[6:] for line in response.text.splitlines() if line.startswith("data: {")]
        return json.loads(events[-1])["usage"]
    return response.json()["usage"]


@pytest.fixture(scope="module")
def traffic(monitored) -> list[dict]:
    sent = send_traffic(monitored["url"])
    assert [s["status"] for s in sent] == [200] * 7 + [400, 404, 400]
    return sent


def expected_counts(sent: list[dict]) -> dict:
    """Per model: requests by (route, status) and token sums, from what the clients got."""
    want: dict = {}
    models = ["tiny-llama"] * 3 + ["m1", "m1", "m2", "m1", "m1", "(none)", "(none)"]
    for entry, model in zip(sent, models, strict=True):
        per = want.setdefault(model, {"requests": {}, "prompt": 0, "generated": 0, "ok": 0})
        key = (entry["path"], str(entry["status"]))
        per["requests"][key] = per["requests"].get(key, 0) + 1
        if entry["status"] == 200:
            per["ok"] += 1
            per["prompt"] += usage(entry)["prompt_tokens"]
            per["generated"] += usage(entry)["completion_tokens"]
    return want


def wait_for_export(metrics_url: str, want: dict, timeout_s: float = 90.0) -> list:
    """The scraped samples once every expected counter and both gauges show (Ray exports
    every second or so); the last scrape when the deadline passes.

    Ray's metrics agent keeps a gauge for two export intervals after the replica last
    reported it, so on a busy machine a late export drops the series from one scrape
    until the next report brings it back: a gauge is read when it is there.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        samples = scrape(metrics_url)
        names = {n for n, _, _ in samples}
        done = (
            all(
                total(samples, "ray_rayft_requests_total", model=m, route=r, status=s) >= n
                for m, per in want.items()
                for (r, s), n in per["requests"].items()
            )
            and total(samples, "ray_rayft_adapter_evictions_total") >= 2
            and {"ray_rayft_loaded_adapters", "ray_rayft_queued_rows"} <= names
        )
        if done or time.monotonic() > deadline:
            return samples
        time.sleep(1.0)


def test_prometheus_endpoint_has_per_model_counters_matching_the_traffic(monitored, traffic):
    want = expected_counts(traffic)
    samples = wait_for_export(monitored["metrics"], want)
    for model, per in want.items():
        for (route, status), count in per["requests"].items():
            got = total(
                samples, "ray_rayft_requests_total", model=model, route=route, status=status
            )
            assert got == count, (model, route, status)
        assert total(samples, "ray_rayft_prompt_tokens_total", model=model) == per["prompt"]
        assert total(samples, "ray_rayft_generated_tokens_total", model=model) == per["generated"]
        # Every answered completion had a first token; refusals have none.
        ttft = total(samples, "ray_rayft_time_to_first_token_seconds_count", model=model)
        assert ttft == per["ok"], model
    # Latency buckets are cumulative and end at the request count.
    chat_route = {"model": "tiny-llama", "route": "/v1/chat/completions"}
    buckets = sorted(
        (float(lab["le"]), v)
        for n, lab, v in samples
        if n == "ray_rayft_request_latency_seconds_bucket" and chat_route.items() <= lab.items()
    )
    assert buckets and buckets[-1] == (math.inf, 3.0)
    assert all(a[1] <= b[1] for a, b in zip(buckets, buckets[1:], strict=False))
    assert total(samples, "ray_rayft_request_latency_seconds_count", **chat_route) == 3
    # m1 -> m2 -> m1 with room for one adapter: each was evicted once; one is held.
    assert total(samples, "ray_rayft_adapter_evictions_total", model="m1") == 1
    assert total(samples, "ray_rayft_adapter_evictions_total", model="m2") == 1
    loaded = [v for n, _, v in samples if n == "ray_rayft_loaded_adapters"]
    assert loaded == [1.0]
    assert any(n == "ray_rayft_queued_rows" for n, _, _ in samples)
    # Serve's own tags name the replica the numbers come from.
    assert all(
        lab.get("deployment") == "rayft" for n, lab, _ in samples if n.startswith("ray_rayft_")
    )


def test_serve_prints_the_scrape_url_and_the_log(monitored, capsys):
    from rayft.cluster.serve_cli import print_monitoring
    from rayft.serving.app import parse_args

    cfg = parse_args({"storage": str(monitored["home"]), "request_log": True})
    print_monitoring(cfg)
    out = capsys.readouterr().out.splitlines()
    assert f"metrics: {monitored['metrics']}" in out
    assert any(line.startswith(f"request log: {monitored['home']}/request_logs") for line in out)


def test_request_log_has_one_line_per_request_with_its_counts(monitored, traffic):
    from rayft.serving.request_log import read_log
    from rayft.trainers.storage import StorageRoot

    lines = read_log(StorageRoot.resolve(str(monitored["home"])))
    assert len(lines) == len(traffic)
    assert len({line["request_id"] for line in lines}) == len(lines)
    assert [line["status"] for line in lines] == [s["status"] for s in traffic]
    for line, entry in zip(lines, traffic, strict=True):
        assert line["route"] == entry["path"]
        assert line["latency_s"] > 0
        if entry["status"] == 200:
            got = usage(entry)
            assert line["prompt_tokens"] == got["prompt_tokens"]
            assert line["completion_tokens"] == got["completion_tokens"]
            assert line["ttft_s"] is not None and 0 < line["ttft_s"] <= line["latency_s"]
    stream = lines[5]
    assert stream["model"] == "m2" and stream["stream"] is True
    assert lines[8]["error"] == "model_not_found" and lines[8]["model"] is None
    # Payloads were asked for: what was sent and what was answered.
    assert lines[4]["prompt"] == "snow is" and lines[4]["n"] == 2
    assert lines[4]["outputs"] == [c["text"] for c in traffic[4]["response"].json()["choices"]]


def test_evaluation_on_the_traffic_an_adapter_served(monitored, traffic):
    url = monitored["url"]
    # The rows m1 answered, built independently from the responses its clients got.
    rows = []
    for entry in traffic[3:5]:
        prompt = json.loads(entry["response"].request.content)["prompt"]
        choices = entry["response"].json()["choices"]
        rows += [{"prompt": prompt, "completion": c["text"]} for c in choices]
    messages = [{"role": "user", "content": "hello again"}]
    answer = traffic[6]["response"].json()["choices"][0]["message"]["content"]
    rows.append({"messages": [*messages, {"role": "assistant", "content": answer}]})

    def evaluate(**body) -> httpx.Response:
        return httpx.post(f"{url}/v1/evaluations", json={"metrics": ["loss"], **body}, timeout=300)

    logged = evaluate(model="m1", dataset={"request_log": {}})
    assert logged.status_code == 200, logged.text
    inline = evaluate(model="m1", rows=rows)
    assert logged.json()["rows"] == len(rows) == 4
    assert logged.json()["metrics"]["loss"] == pytest.approx(inline.json()["metrics"]["loss"])
    # Another model scored on m1's traffic; and a model that served nothing.
    base = evaluate(model="tiny-llama", dataset={"request_log": {"model": "m1", "limit": 1}})
    assert base.status_code == 200 and base.json()["rows"] == 1
    none = evaluate(model="tiny-llama", dataset={"request_log": {"since": "2999-01-01T00:00:00Z"}})
    assert none.status_code == 404 and none.json()["error"]["code"] == "no_logged_requests"
