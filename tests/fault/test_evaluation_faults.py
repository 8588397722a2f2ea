"""Evaluations past their deadline or at their row limit, over real HTTP in this process.

A real ``ModelEngine`` (tiny-llama) behind the real API on 127.0.0.1; the engine's forward
pass is slowed (never faked) to make scoring outlast the deadline.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from serving_http import http_server

from rayft.serving.engine import ModelEngine

pytestmark = pytest.mark.fault

ROW = {"prompt": "the quick brown fox", "completion": " jumps over the lazy dog"}


@pytest.fixture(scope="module")
def engine(rayft_home: Path, tiny_model_dir: Path) -> ModelEngine:
    return ModelEngine("tiny-llama", storage=str(rayft_home), dtype="float32")


@pytest.fixture(scope="module")
def server(engine: ModelEngine) -> Iterator[str]:
    """Default limits (2000 evaluation rows), a 1 s deadline."""
    from rayft.serving.openai_api import create_api
    from rayft.serving.service import ModelService

    service = ModelService(engine, api_key="", request_timeout_s=1.0)
    with http_server(create_api(service)) as url:
        yield url
    service.close()


def test_an_evaluation_past_its_deadline_stops_scoring_on_the_engine(server, engine, monkeypatch):
    forwards: list[float] = []
    real = engine._run_model

    def slow(*args: Any, **kwargs: Any) -> Any:
        forwards.append(time.monotonic())
        time.sleep(0.05)
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "_run_model", slow)
    started = time.monotonic()
    body = {"model": "tiny-llama", "rows": [ROW] * 800}  # 100 batches: about 5 s of scoring
    answer = httpx.post(f"{server}/v1/evaluations", json=body, timeout=30)
    assert answer.status_code == 503 and answer.json()["error"]["code"] == "request_timeout"
    assert time.monotonic() - started < 3
    at_answer = len(forwards)
    time.sleep(0.5)
    assert len(forwards) - at_answer <= 1  # the batch under way at most, then scoring stopped
    assert len(forwards) < 60
    monkeypatch.setattr(engine, "_run_model", real)
    after = httpx.post(f"{server}/v1/evaluations", json={"model": "tiny-llama", "rows": [ROW]})
    assert after.status_code == 200 and after.json()["rows"] == 1


def test_an_evaluation_of_max_eval_rows_fits_the_decode_queue(engine) -> None:
    from rayft.serving.service import Limits, ModelService

    for limits in (Limits(), Limits(max_eval_rows=5000, max_queued_rows=5000)):
        service = ModelService(engine, limits, api_key="")
        try:
            # An evaluation queues all its generation rows at once: an idle server takes it.
            service.loop.check_capacity(limits.max_eval_rows)
        finally:
            service.close()
    with pytest.raises(ValueError, match="max_queued_rows"):
        Limits(max_eval_rows=3000)
