"""``POST /v1/files`` under abuse: huge, endless, malformed and concurrent uploads.

A real ``ModelService`` (tiny-llama) with the files routes behind the real API over HTTP
on 127.0.0.1. Bodies are generated while they are sent (chunked), as a client streaming
a large file would send them.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from serving_http import http_server

from rayft.serving.engine import ModelEngine

pytestmark = pytest.mark.fault

BOUNDARY = "rayft-upload-boundary"
MB = 1024 * 1024


def multipart(
    filename: str, chunks: Iterator[bytes], purpose: str = "fine-tune"
) -> Iterator[bytes]:
    """A multipart/form-data body (``purpose``, then ``file``) generated chunk by chunk."""
    yield (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\n{purpose}\r\n'
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; '
        f'filename="{filename}"\r\nContent-Type: application/octet-stream\r\n\r\n'
    ).encode()
    yield from chunks
    yield f"\r\n--{BOUNDARY}--\r\n".encode()


APPS: dict[str, Any] = {}
"""The app behind each test server's URL (to see its upload slots)."""
HEADERS = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}


def rows(total_bytes: int, row_bytes: int = 64 * 1024) -> Iterator[bytes]:
    """JSON lines of prompt/completion rows of ``row_bytes`` each, ``total_bytes`` in all."""
    overhead = len(json.dumps({"prompt": "", "completion": "c"})) + 1
    row = (json.dumps({"prompt": "p" * (row_bytes - overhead), "completion": "c"}) + "\n").encode()
    for _ in range(max(1, total_bytes // len(row))):
        yield row


def upload(url: str, filename: str, chunks: Iterator[bytes], **kw: Any) -> httpx.Response:
    body = multipart(filename, chunks, **kw)
    return httpx.post(f"{url}/v1/files", content=body, headers=HEADERS, timeout=120)


@pytest.fixture(scope="module")
def engine(rayft_home: Path, tiny_model_dir: Path) -> ModelEngine:
    return ModelEngine("tiny-llama", storage=str(rayft_home), dtype="float32")


def _server(engine: ModelEngine, home: Path, **limits: Any) -> Iterator[str]:
    from rayft.cluster.fine_tuning_api import router
    from rayft.serving.openai_api import create_api
    from rayft.serving.service import Limits, ModelService

    service = ModelService(engine, Limits(**limits), api_key="")
    app = create_api(service, [router])
    with http_server(app) as url:
        APPS[url] = app
        yield url
    service.close()


@pytest.fixture(scope="module")
def server(engine: ModelEngine, rayft_home: Path) -> Iterator[str]:
    """Uploads up to 256 MiB, one at a time."""
    yield from _server(engine, rayft_home, max_file_bytes=256 * MB, max_concurrent_uploads=1)


@pytest.fixture(scope="module")
def small(engine: ModelEngine, rayft_home: Path) -> Iterator[str]:
    """Uploads up to 1 MiB."""
    yield from _server(engine, rayft_home, max_file_bytes=MB)


def leftovers(home: Path) -> list[str]:
    """Staging files of uploads (none may outlive its request)."""
    folder = home / "datasets"
    return sorted(p.name for p in folder.glob(".upload-*")) if folder.is_dir() else []


def test_a_200_mb_upload_streams_to_disk_with_bounded_memory(server, rayft_home) -> None:
    # A first, small upload loads the modules the check uses (pyarrow, datasets): their
    # code is not memory an upload holds.
    assert upload(server, "warm.jsonl", rows(4096, row_bytes=1024)).status_code == 200
    process = psutil.Process()
    baseline = process.memory_info().rss
    peak = [baseline]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.005):
            peak[0] = max(peak[0], process.memory_info().rss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.monotonic()
    try:
        answer = upload(server, "big.jsonl", rows(200 * MB))
    finally:
        done.set()
        sampler.join()
    assert answer.status_code == 200, answer.text
    record = answer.json()
    assert record["bytes"] > 199 * MB and record["rayft"]["rows"] == record["bytes"] // (64 * 1024)
    growth = (peak[0] - baseline) / MB
    print(f"200 MB upload: {time.monotonic() - started:.1f} s, peak RSS growth {growth:.1f} MiB")
    assert growth < 64, f"the replica grew by {growth:.0f} MiB while receiving 200 MiB"
    assert leftovers(rayft_home) == []
    stored = rayft_home / record["rayft"]["path"]
    assert stored.stat().st_size == record["bytes"]
    assert httpx.delete(f"{server}/v1/files/{record['id']}").json()["deleted"] is True


def test_a_chunked_upload_past_max_file_bytes_is_413_and_leaves_nothing(small, rayft_home) -> None:
    before = httpx.get(f"{small}/v1/files").json()["data"]
    answer = upload(small, "endless.jsonl", rows(3 * MB, row_bytes=1024))
    assert answer.status_code == 413
    assert answer.json()["error"]["message"].endswith("split the file or raise max_file_bytes")
    assert leftovers(rayft_home) == []
    assert httpx.get(f"{small}/v1/files").json()["data"] == before


@pytest.mark.parametrize(
    ("filename", "content", "says"),
    [
        ("latin1.json", b'[{"prompt": "caf\xe9", "completion": "x"}]', "big.json"),
        (
            "latin1.jsonl",
            b'{"prompt": "ok", "completion": "x"}\n{"prompt": "\xe9"}\n',
            ":2: not UTF-8",
        ),
        ("deep.json", b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        ("deep.jsonl", b'{"prompt": "a", "completion": "b"}\n' + b"[" * 100_000, ":2: JSON nested"),
        ("huge-row.jsonl", b'{"prompt": "' + b"x" * (5 * MB) + b'"}\n', ":1: the line is over"),
        (
            "array.json",
            b"["
            + b",\n".join([b'{"prompt": "%s", "completion": "c"}' % (b"p" * 1000)] * 5000)
            + b"]",
            "JSON lines (.jsonl",
        ),
    ],
)
def test_malformed_files_are_400_naming_the_row(
    server, rayft_home, filename, content, says
) -> None:
    answer = upload(
        server, filename, iter([content[i : i + MB] for i in range(0, len(content), MB)])
    )
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == "file" and error["type"] == "invalid_request_error"
    if says != "big.json":
        assert says in error["message"]
    else:
        assert "latin1.json:1: not UTF-8" in error["message"]
    assert leftovers(rayft_home) == []


def test_uploads_past_max_concurrent_uploads_get_429(server) -> None:
    release = threading.Event()
    first: dict[str, Any] = {}

    def held_open() -> Iterator[bytes]:
        yield from rows(256 * 1024, row_bytes=1024)
        release.wait(30)
        yield from rows(1024, row_bytes=1024)

    def slow_upload() -> None:
        try:
            first["r"] = upload(server, "slow.jsonl", held_open())
        except Exception as err:  # noqa: BLE001 - shown by the assertion below
            first["r"] = err

    slow = threading.Thread(target=slow_upload)
    slow.start()
    try:
        deadline = time.monotonic() + 10
        while getattr(APPS[server].state, "upload_slots", None) is None or (
            APPS[server].state.upload_slots.active == 0 and time.monotonic() < deadline
        ):  # until the first upload holds the one slot
            time.sleep(0.02)
        second = upload(server, "second.jsonl", rows(1024, row_bytes=1024))
        assert second.status_code == 429, second.text
        assert (
            second.headers["Retry-After"] and second.json()["error"]["code"] == "too_many_uploads"
        )
    finally:
        release.set()
        slow.join()
    assert first["r"].status_code == 200
    assert upload(server, "third.jsonl", rows(1024, row_bytes=1024)).status_code == 200


def test_a_file_of_another_format_or_a_second_file_is_400_and_leaves_nothing(
    server, rayft_home
) -> None:
    csv = upload(server, "table.csv", iter([b"a,b\n1,2\n"]))
    assert csv.status_code == 400 and csv.json()["error"]["code"] == "invalid_file_format"
    part = (
        f'\r\n--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; '
        'filename="two.jsonl"\r\n\r\n'
    ).encode()
    two = upload(server, "one.jsonl", iter([*rows(2048, row_bytes=1024), part, *rows(1024)]))
    assert two.status_code == 400 and "one file" in two.json()["error"]["message"]
    assert leftovers(rayft_home) == []


def test_a_body_that_is_not_multipart_is_400(server) -> None:
    answer = httpx.post(
        f"{server}/v1/files", content=b"{}", headers={"Content-Type": "application/json"}
    )
    assert answer.status_code in (400, 415), answer.text  # never a 500
    missing = httpx.post(
        f"{server}/v1/files",
        content=multipart("t.jsonl", rows(2048), purpose="batch"),
        headers=HEADERS,
    )
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "purpose"
