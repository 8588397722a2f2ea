"""Per-project quotas over real HTTP: a project past its file, byte, job or request-rate
quota gets 429 ``quota_exceeded`` in the API's error shape, saying which quota and how
much is used, and another project is not affected; finished jobs' checkpoints are
removed after retention when jobs are listed.

The API (inference plus the files and fine-tuning jobs routes) runs on tiny-llama over
HTTP on 127.0.0.1 in this process with small quotas and its own key store. No Ray: jobs
are recorded with the jobs service's own functions.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from types import SimpleNamespace

import httpx
import pytest
from serving_http import http_server

pytestmark = pytest.mark.fault

ROWS = "".join(
    json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
    + "\n"
    for q, a in (("sky?", "blue"), ("grass?", "green"), ("blood?", "red"), ("snow?", "white"))
).encode()
BURST = 20


@pytest.fixture(scope="module")
def api(tmp_path_factory, tiny_model_dir) -> Iterator[SimpleNamespace]:
    from rayft.cluster.fine_tuning_api import router as fine_tuning_router
    from rayft.serving.auth import KeyStore
    from rayft.serving.engine import ModelEngine
    from rayft.serving.openai_api import create_api
    from rayft.serving.service import Limits, ModelService
    from rayft.trainers.job_limits import ProjectQuotas

    root = tmp_path_factory.mktemp("quotas") / "root"
    store = KeyStore(str(root))
    keys = {}
    for project in ("alpha", "beta", "gamma", "noisy", "calm"):
        _, key = store.create(project, "member")
        keys[project] = {"Authorization": f"Bearer {key}"}
    quotas = ProjectQuotas(
        max_files=2,
        max_file_bytes_total=4 * len(ROWS),
        max_active_jobs=1,
        requests_per_s=1,
        burst=BURST,
    )
    engine = ModelEngine("tiny-llama", storage=str(root), dtype="float32")
    limits = Limits(
        max_tokens_limit=8, max_prompt_tokens=64, max_eval_rows=16, project_quotas=quotas
    )
    service = ModelService(engine, limits)
    with http_server(create_api(service, [fine_tuning_router])) as url:
        http = httpx.Client(base_url=url, timeout=60)
        yield SimpleNamespace(http=http, keys=keys, root=engine.storage)
        http.close()
    service.close()


def _quota_error(response: httpx.Response, quota: str) -> dict:
    assert response.status_code == 429, response.text
    error = response.json()["error"]
    assert (error["code"], error["param"], error["type"]) == (
        "quota_exceeded",
        quota,
        "rate_limit_error",
    )
    return error


def _upload(api, project: str, body: bytes = ROWS) -> httpx.Response:
    return api.http.post(
        "/v1/files",
        files={"file": ("colors.jsonl", body)},
        data={"purpose": "fine-tune"},
        headers=api.keys[project],
    )


def _stored(api, project: str) -> list[str]:
    listed = api.http.get("/v1/files", headers=api.keys[project])
    assert listed.status_code == 200, listed.text
    return [f["id"] for f in listed.json()["data"]]


def _staging_files(api) -> list[str]:
    return [p.name for p in api.root.path("datasets").glob(".upload-*")]


def test_a_project_over_its_file_quota_is_refused_and_another_still_uploads(api):
    assert [_upload(api, "alpha").status_code for _ in range(2)] == [200, 200]
    error = _quota_error(_upload(api, "alpha"), "max_files")
    assert "'alpha'" in error["message"] and "2 files stored" in error["message"]
    assert "delete files" in error["message"] and "admin" in error["message"]
    assert len(_stored(api, "alpha")) == 2 and _staging_files(api) == []

    assert _upload(api, "beta").status_code == 200
    assert len(_stored(api, "beta")) == 1

    # Deleting a file frees its place.
    gone = api.http.delete(f"/v1/files/{_stored(api, 'alpha')[0]}", headers=api.keys["alpha"])
    assert gone.status_code == 200
    assert _upload(api, "alpha").status_code == 200


def test_an_upload_past_the_byte_quota_is_refused_and_removed(api):
    error = _quota_error(_upload(api, "gamma", ROWS * 5), "max_file_bytes_total")
    assert f"{5 * len(ROWS)} uploaded" in error["message"]
    assert _stored(api, "gamma") == [] and _staging_files(api) == []
    assert _upload(api, "gamma", ROWS * 4).status_code == 200  # exactly the quota fits


def test_a_burst_past_the_rate_quota_gets_429_with_retry_after_and_others_go_on(api):
    answers = [api.http.get("/v1/models", headers=api.keys["noisy"]) for _ in range(BURST + 5)]
    codes = [a.status_code for a in answers]
    assert codes[:BURST] == [200] * BURST and set(codes[BURST:]) == {429}
    refused = answers[-1]
    _quota_error(refused, "requests_per_s")
    assert int(refused.headers["Retry-After"]) >= 1
    assert api.http.get("/v1/models", headers=api.keys["calm"]).status_code == 200
    # /health is never counted.
    assert api.http.get("/health", headers=api.keys["noisy"]).status_code == 200


def _record(api, project: str, status: str, finished_at: float | None = None) -> str:
    from rayft.cluster import fine_tuning as jobs

    request = jobs.parse_request({"model": "tiny-llama", "training_file": "file-a"})
    job_id = jobs.new_job_id()
    spec, hyper = jobs.build_spec(
        request,
        base_model="tiny-llama",
        parent_adapter=None,
        train_url="/t.jsonl",
        eval_url=None,
        storage=api.root.location,
        output_name=jobs.fine_tuned_name("tiny-llama", None, job_id),
    )
    record = jobs.new_record(job_id, request, spec, hyper, {}, project)
    record.update(status=status, finished_at=finished_at)
    jobs.save_job(api.root, record)
    return job_id


def test_a_project_at_its_job_quota_is_refused_with_retry_after(api):
    running = _record(api, "alpha", "running")
    body = {"model": "tiny-llama", "training_file": "file-" + "0" * 24}
    refused = api.http.post("/v1/fine_tuning/jobs", json=body, headers=api.keys["alpha"])
    error = _quota_error(refused, "max_active_jobs")
    assert running in error["message"] and "cancel" in error["message"]
    assert int(refused.headers["Retry-After"]) >= 1
    # Beta is under its quota: its job goes on to the file check (an unknown file: 400).
    other = api.http.post("/v1/fine_tuning/jobs", json=body, headers=api.keys["beta"])
    assert other.status_code == 400 and other.json()["error"]["param"] == "training_file"


def test_listing_jobs_removes_checkpoints_of_jobs_finished_long_ago(api):
    old = _record(api, "calm", "succeeded", finished_at=time.time() - 100 * 3600)
    recent = _record(api, "calm", "failed", finished_at=time.time() - 3600)
    for job_id in (old, recent):
        ckpt = api.root.run(job_id) / "checkpoint_2026-12-01_10-00-00.000000"
        ckpt.mkdir(parents=True)
        (ckpt / "weights.bin").write_bytes(b"\0" * 32)
        (api.root.run(job_id) / "events.jsonl").write_text("{}\n")
    listed = api.http.get("/v1/fine_tuning/jobs", headers=api.keys["calm"])
    assert listed.status_code == 200, listed.text
    assert {old, recent} <= {j["id"] for j in listed.json()["data"]}
    assert not list(api.root.run(old).glob("checkpoint_*"))
    assert (api.root.run(old) / "events.jsonl").is_file()
    assert len(list(api.root.run(recent).glob("checkpoint_*"))) == 1
