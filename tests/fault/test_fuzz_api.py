"""Fuzzing the HTTP API from its own OpenAPI schema: no input is answered with a 5xx.

schemathesis generates requests for every operation of the app's ``/openapi.json``,
both schema-valid ones (positive) and ones that break the schema (negative); each is
sent with and without the API key to the real API (a ``ModelService`` on tiny-llama)
served over HTTP on 127.0.0.1 in this process. Every answer must be below 500, every
4xx must be in OpenAI's error shape, requests without the key must be refused (but
``/health``), and the server must be healthy and drained afterwards. Generation is
derandomized, so a failure reproduces on every run.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from serving_http import http_server, wait_drained

pytestmark = pytest.mark.fault

KEY = "fuzz-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
EXAMPLES_PER_OPERATION = 150
MIN_REQUESTS = 1000


@pytest.fixture(scope="module")
def api_url(rayft_home: Path, tiny_model_dir: Path) -> Iterator[str]:
    from rayft.cluster.fine_tuning_api import router as fine_tuning_router
    from rayft.serving.engine import ModelEngine
    from rayft.serving.openai_api import create_api
    from rayft.serving.service import Limits, ModelService

    engine = ModelEngine("tiny-llama", storage=str(rayft_home), dtype="float32")
    # Small limits keep each valid request quick; they are limits, so they are fuzzed too.
    limits = Limits(max_tokens_limit=8, max_prompt_tokens=64, max_eval_rows=8, max_n=4)
    service = ModelService(engine, limits, api_key=KEY)
    with http_server(create_api(service, [fine_tuning_router])) as url:
        yield url
    service.close()


def _check(case: Any, seen: Counter) -> None:
    for headers in (AUTH, {}):
        response = case.call(headers=headers, timeout=120)
        where = f"{case.method} {case.formatted_path} ({'with' if headers else 'without'} key)"
        seen[case.operation.label] += 1
        status = response.status_code
        assert status < 500, f"{where}: {status} {response.text[:500]}"
        if not headers and case.path != "/health":
            assert status == 401, f"{where}: {status} without the API key"
        if 400 <= status < 500:
            error = response.json()["error"]
            assert {"message", "type", "code"} <= set(error), f"{where}: {response.text[:300]}"
            assert isinstance(error["message"], str) and error["message"]


def test_generated_requests_get_no_5xx_and_openai_shaped_4xx(api_url):
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(f"{api_url}/openapi.json", headers=AUTH)
    operations = [result.ok() for result in schema.get_all_operations()]
    labels = {op.label for op in operations}
    assert {
        "GET /health",
        "GET /v1/models",
        "GET /v1/models/{model}",
        "POST /v1/completions",
        "POST /v1/chat/completions",
        "POST /v1/evaluations",
    } <= labels
    seen: Counter = Counter()
    for operation in operations:
        strategy = st.one_of(
            operation.as_strategy(generation_mode=GenerationMode.POSITIVE),
            operation.as_strategy(generation_mode=GenerationMode.NEGATIVE),
        )

        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=strategy)
        def fuzz(case: Any) -> None:
            _check(case, seen)

        fuzz()
    print(f"fuzzed {sum(seen.values())} requests: {dict(seen)}")
    assert set(seen) == labels
    assert sum(seen.values()) >= MIN_REQUESTS, seen
    assert httpx.get(f"{api_url}/health", timeout=30).json()["status"] == "ok"
    state = wait_drained(api_url, headers=AUTH)
    assert (state["open_routes"], state["queued_rows"], state["running_rows"]) == (0, 0, 0)
    ok = httpx.post(
        f"{api_url}/v1/completions",
        json={"model": "tiny-llama", "prompt": "hello", "max_tokens": 4},
        headers=AUTH,
        timeout=60,
    )
    assert ok.status_code == 200, ok.text
