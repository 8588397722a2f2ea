"""A web page cannot drive the API: host, origin, content type and JSON depth checks.

The API runs over real HTTP on 127.0.0.1 with no key (the default on loopback) and the
fine-tuning routes mounted, as the Serve deployment builds it (loopback names only).
Each test sends what a page in a browser could send (a rebound ``Host``, a cross-site
``Origin``, a ``text/plain`` "simple" request) or a body built to crash the JSON parser,
and checks the answer's status and OpenAI-shaped error; an ordinary client still works.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from serving_http import http_server

pytestmark = pytest.mark.fault

JOB = {"model": "tiny-llama", "training_file": "file-unknown"}
CHAT = {"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.fixture(scope="module")
def guarded(rayft_home: Path, tiny_model_dir: Path) -> Iterator[tuple[str, object]]:
    from rayft.cluster.fine_tuning_api import router as fine_tuning_router
    from rayft.serving.engine import ModelEngine
    from rayft.serving.http_guard import Admission
    from rayft.serving.openai_api import create_api
    from rayft.serving.service import ModelService

    service = ModelService(ModelEngine("tiny-llama", storage=str(rayft_home), dtype="float32"))
    admission = Admission()
    api = create_api(service, [fine_tuning_router], allowed_hosts=[], admission=admission)
    with http_server(api) as url:
        yield url, admission
    service.close()


def _error(response: httpx.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"]
    if code is not None:
        assert error["code"] == code
    return error


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "127.0.0.1.evil.example"])
def test_a_rebound_host_is_refused(guarded, host):
    url, _ = guarded
    for method, path, body in (("GET", "/v1/files", None), ("POST", "/v1/fine_tuning/jobs", JOB)):
        answer = httpx.request(method, f"{url}{path}", json=body, headers={"Host": host})
        _error(answer, 400, "invalid_host")


def test_loopback_names_with_any_port_are_answered(guarded):
    url, _ = guarded
    port = url.rsplit(":", 1)[1]
    for host in ("127.0.0.1", f"localhost:{port}", "LOCALHOST", f"[::1]:{port}"):
        assert httpx.get(f"{url}/v1/models", headers={"Host": host}).status_code == 200, host


def test_a_cross_site_post_is_refused_and_the_job_is_not_created(guarded):
    url, _ = guarded
    before = httpx.get(f"{url}/v1/fine_tuning/jobs").json()["data"]
    for origin in ("http://evil.example", "null", "http://localhost:3000"):
        answer = httpx.post(f"{url}/v1/fine_tuning/jobs", json=JOB, headers={"Origin": origin})
        _error(answer, 403, "cross_origin")
        cancel = httpx.post(f"{url}/v1/fine_tuning/jobs/ftjob-x/cancel", headers={"Origin": origin})
        _error(cancel, 403, "cross_origin")
    assert httpx.get(f"{url}/v1/fine_tuning/jobs").json()["data"] == before
    # The server's own origin (its docs page) may post; a GET with any Origin is a read.
    own = httpx.post(f"{url}/v1/fine_tuning/jobs", json=JOB, headers={"Origin": url})
    _error(own, 400, "invalid_training_file")
    assert httpx.get(f"{url}/v1/models", headers={"Origin": "http://evil.example"}).is_success


@pytest.mark.parametrize("media", ["text/plain", "application/x-www-form-urlencoded"])
def test_a_simple_request_body_is_refused_with_415(guarded, media):
    import json

    url, _ = guarded
    for path, body in (("/v1/fine_tuning/jobs", JOB), ("/v1/chat/completions", CHAT)):
        answer = httpx.post(
            f"{url}{path}", content=json.dumps(body), headers={"Content-Type": media}
        )
        _error(answer, 415, "unsupported_media_type")
    upload = httpx.post(
        f"{url}/v1/files", content=b'{"a": 1}', headers={"Content-Type": "application/json"}
    )
    _error(upload, 415, "unsupported_media_type")


@pytest.mark.parametrize("path", ["/v1/fine_tuning/jobs", "/v1/chat/completions"])
def test_a_deeply_nested_body_is_400_not_500(guarded, path):
    url, _ = guarded
    deep = b'{"model": ' + b"[" * 10_000 + b"]" * 10_000 + b"}"
    answer = httpx.post(f"{url}{path}", content=deep, headers={"Content-Type": "application/json"})
    _error(answer, 400, "json_too_deep")
    # Brackets inside strings are text, not nesting.
    text = {**CHAT, "messages": [{"role": "user", "content": "[{" * 200 + '\\"'}]}
    assert httpx.post(f"{url}/v1/chat/completions", json=text).status_code == 200


def test_an_ordinary_client_still_works(guarded):
    import openai

    url, _ = guarded
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    chat = client.chat.completions.create(**CHAT)
    assert chat.choices[0].message.content is not None
    assert any(m.id == "tiny-llama" for m in client.models.list().data)
    with pytest.raises(openai.BadRequestError) as refused:
        client.fine_tuning.jobs.create(**JOB)
    assert refused.value.body["param"] == "training_file"


def test_a_draining_server_answers_503_with_retry_after(guarded):
    url, admission = guarded
    admission.draining = True
    try:
        answer = httpx.post(f"{url}/v1/chat/completions", json=CHAT)
        _error(answer, 503, "shutting_down")
        assert answer.headers["Retry-After"]
    finally:
        admission.draining = False
    assert httpx.post(f"{url}/v1/chat/completions", json=CHAT).status_code == 200
