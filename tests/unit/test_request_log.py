"""The request log: its line format, the reader, rows for evaluation, and the log the
in-process API writes (tiny-llama, no Ray)."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timezone
from pathlib import Path

import httpx
import pytest

from rayft.serving.errors import BadRequest, NotFound
from rayft.serving.request_log import (
    LOG_DIR,
    RequestLog,
    RequestRecord,
    log_line,
    log_rows,
    read_log,
)
from rayft.trainers.storage import StorageRoot

T0 = datetime(2026, 12, 1, 23, 59, 0, tzinfo=timezone.utc).timestamp()
CHAT = json.dumps({"model": "a", "messages": [{"role": "user", "content": "hi"}]}).encode()


def record(started: float, model: str | None = "a", status: int = 200, **fields) -> RequestRecord:
    values = {
        "route": "/v1/chat/completions",
        "prompt_tokens": 7,
        "completion_tokens": 3,
        "latency_s": 0.25,
        "ttft_s": 0.05,
        "outputs": ["hello there"],
        "body": CHAT,
        **fields,
    }
    return RequestRecord("rid", started=started, model=model, status=status, **values)


def test_a_line_holds_counts_and_times_and_payloads_only_when_asked():
    line = log_line(record(T0), log_payloads=False)
    assert line == {
        "time": "2026-12-01T23:59:00.000Z",
        "ts": T0,
        "request_id": "rid",
        "route": "/v1/chat/completions",
        "model": "a",
        "status": 200,
        "stream": False,
        "prompt_tokens": 7,
        "completion_tokens": 3,
        "latency_s": 0.25,
        "ttft_s": 0.05,
        "error": None,
        "project": None,
        "key_id": None,
    }
    keyed = log_line(record(T0, project="team-a", key_id="3f9c0a7d1e2b4c5d"))
    assert (keyed["project"], keyed["key_id"]) == ("team-a", "3f9c0a7d1e2b4c5d")
    with_payloads = log_line(record(T0), log_payloads=True)
    assert with_payloads["messages"] == [{"role": "user", "content": "hi"}]
    assert with_payloads["outputs"] == ["hello there"]
    assert set(with_payloads) - set(line) == {"messages", "outputs"}


def test_reader_filters_by_model_and_time_keeps_order_and_skips_torn_lines(tmp_path: Path):
    root = StorageRoot.resolve(str(tmp_path))
    log = RequestLog(root, "replica-1")
    other = RequestLog(root, "replica-2")
    # Across midnight (UTC): two day folders; two writers interleaved in time.
    for i in range(6):
        (log if i % 2 else other).write(record(T0 + 30 * i, model="a" if i < 5 else "b"))
    log.close()
    other.close()
    days = sorted(p.name for p in (tmp_path / LOG_DIR).iterdir())
    assert days == ["2026-12-01", "2026-12-02"]
    torn = tmp_path / LOG_DIR / "2026-12-02" / "replica-1.jsonl"
    with open(torn, "a") as handle:
        handle.write('{"ts": 17961')  # a writer died mid-line
    assert [line["ts"] for line in read_log(root)] == [T0 + 30 * i for i in range(6)]
    assert len(read_log(root, model="a")) == 5
    since = datetime.fromtimestamp(T0 + 60, tz=timezone.utc)
    until = datetime.fromtimestamp(T0 + 120, tz=timezone.utc)
    assert [line["ts"] for line in read_log(root, "a", since, until)] == [T0 + 60, T0 + 90]
    assert [line["ts"] for line in read_log(root, "a", limit=2)] == [T0 + 90, T0 + 120]
    assert read_log(StorageRoot.resolve(str(tmp_path / "elsewhere"))) == []


def test_rows_pair_each_prompt_with_what_was_answered():
    chat = log_line(record(T0), log_payloads=True)
    body = json.dumps({"prompt": ["p1", "p2"], "n": 2}).encode()
    completion = log_line(
        record(T0, route="/v1/completions", body=body, outputs=["a", "b", "c", "d"]), True
    )
    ids = log_line(record(T0, body=json.dumps({"prompt": [1, 2, 3]}).encode()), True)
    refused = log_line(record(T0, status=400, outputs=None), True)
    rows = log_rows([chat, completion, ids, refused], "a")
    assert rows == [
        {
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello there"},
            ]
        },
        {"prompt": "p1", "completion": "a"},
        {"prompt": "p1", "completion": "b"},
        {"prompt": "p2", "completion": "c"},
        {"prompt": "p2", "completion": "d"},
    ]


def test_rows_need_answered_requests_logged_with_payloads():
    with pytest.raises(BadRequest, match="log_payloads") as err:
        log_rows([log_line(record(T0), log_payloads=False)], "a")
    assert err.value.code == "no_logged_payloads"
    with pytest.raises(NotFound, match="no answered request of 'a'"):
        log_rows([log_line(record(T0, status=404), log_payloads=True)], "a")


def test_payloads_without_the_log_is_refused_naming_the_key():
    from rayft.serving.app import parse_args
    from rayft.trainers.config import ConfigError

    with pytest.raises(ConfigError, match="log_payloads"):
        parse_args({"log_payloads": True})
    assert parse_args({"request_log": True, "log_payloads": True}).log_payloads


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The API in process with a request log without payloads."""
    from rayft.serving.engine import ModelEngine
    from rayft.serving.openai_api import create_api
    from rayft.serving.service import ModelService

    home = tmp_path_factory.mktemp("request-log")
    engine = ModelEngine("tiny-llama", storage=str(home), dtype="float32")
    service = ModelService(
        engine, api_key="", request_log=RequestLog(StorageRoot.resolve(str(home)), "in-process")
    )
    yield create_api(service), home
    service.close()


def test_the_api_logs_every_completion_request_once_with_its_status(served):
    app, home = served
    chat = {"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}]}

    async def go() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://rayft") as client:
            sent = [
                await client.post("/v1/chat/completions", json={**chat, "max_tokens": 3}),
                await client.post(
                    "/v1/completions",
                    json={"model": "tiny-llama", "prompt": "a b", "max_tokens": 2, "n": 2},
                ),
                await client.post(
                    "/v1/chat/completions", json={**chat, "max_tokens": 3, "stream": True}
                ),
                await client.post("/v1/chat/completions", json={**chat, "model": "nope"}),
                await client.post("/v1/chat/completions", content=b"{"),
                await client.get("/v1/models"),  # not a completion: not logged
            ]
            evaluation = await client.post(
                "/v1/evaluations", json={"model": "tiny-llama", "dataset": {"request_log": {}}}
            )
            return sent, evaluation

    sent, evaluation = asyncio.run(go())
    lines = read_log(StorageRoot.resolve(str(home)))
    assert [line["status"] for line in lines] == [200, 200, 200, 404, 400]
    assert [line["error"] for line in lines[3:]] == ["model_not_found", "invalid_json"]
    assert [line["model"] for line in lines] == ["tiny-llama"] * 3 + [None, None]
    assert [line["stream"] for line in lines] == [False, False, True, False, False]
    for line, response in zip(lines[:2], sent[:2], strict=True):
        assert line["prompt_tokens"] == response.json()["usage"]["prompt_tokens"]
        assert line["completion_tokens"] == response.json()["usage"]["completion_tokens"]
    assert lines[2]["ttft_s"] is not None and lines[2]["completion_tokens"] >= 1
    assert not any({"messages", "prompt", "outputs"} & set(line) for line in lines)
    # Logged without payloads: nothing to evaluate on, and the answer says why.
    assert evaluation.status_code == 400
    assert evaluation.json()["error"]["code"] == "no_logged_payloads"


def test_a_limited_read_takes_the_newest_lines_without_parsing_the_whole_log(
    tmp_path: Path, monkeypatch
):
    from rayft.serving import request_log

    root = StorageRoot.resolve(str(tmp_path))
    log = RequestLog(root, "replica-1")
    for i in range(2000):  # two days, served by two models
        log.write(record(T0 - 1000 + i, model="a" if i % 4 else "b", status=200 if i % 3 else 500))
    log.close()
    parsed = []
    real = request_log._Match.line
    monkeypatch.setattr(
        request_log._Match, "line", lambda self, raw: parsed.append(1) or real(self, raw)
    )

    def answered(line: dict) -> bool:
        return line["status"] == 200

    lines = read_log(root, "a", limit=30, where=answered)
    expected = [T0 - 1000 + i for i in range(2000) if i % 4 and i % 3][-30:]
    assert [line["ts"] for line in lines] == expected
    assert len(parsed) < 100  # about 30 / (1/2 answered of 3/4 of model a) from the end
    # A bounded range and no limit reads the range only, oldest first.
    since = datetime.fromtimestamp(T0 + 990, tz=timezone.utc)
    assert [line["ts"] for line in read_log(root, "b", since)] == [T0 + 992, T0 + 996]


def test_days_past_the_retention_are_deleted_and_recent_ones_kept(tmp_path: Path):
    log = RequestLog(StorageRoot.resolve(str(tmp_path)), "replica-1", retention_days=2)
    for days_ago in (0, 1, 2, 40):
        log.write(record(T0 - days_ago * 86400))
    log.close()
    assert log.prune(now=T0) == ["2026-10-22", "2026-11-29"]
    assert sorted(p.name for p in (tmp_path / LOG_DIR).iterdir()) == ["2026-11-30", "2026-12-01"]
