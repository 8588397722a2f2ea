"""Projects and scoped keys over real HTTP: one project's key cannot see, change or
probe another's files, jobs, adapters or logged traffic; an inference key only calls
models; revoked and expired keys are refused; ``RAYFT_API_KEY`` is an admin; ``/health``
tells a caller without an admin key nothing but that the server is up.

The API (inference plus the files and fine-tuning jobs routes, as the rayft service
mounts them) runs on tiny-llama over HTTP on 127.0.0.1 in this process, on a private
copy of the adapter registry with its own key store. No Ray: the one job is recorded
with the jobs service's own functions and has ended, so no runner is looked up.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from serving_http import http_server

pytestmark = pytest.mark.fault

ENV_KEY = "env-admin-secret"
ROWS = "".join(
    json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
    + "\n"
    for q, a in (("sky?", "blue"), ("grass?", "green"), ("blood?", "red"), ("snow?", "white"))
).encode()


@pytest.fixture(scope="module")
def api(tmp_path_factory, published_adapters: Path, tiny_model_dir: Path) -> Iterator:
    from harness import copy_registry

    from rayft.cluster import fine_tuning as jobs
    from rayft.cluster.fine_tuning_api import router as fine_tuning_router
    from rayft.serving.auth import KeyStore
    from rayft.serving.engine import ModelEngine
    from rayft.serving.openai_api import create_api
    from rayft.serving.request_log import RequestLog
    from rayft.serving.service import Limits, ModelService
    from rayft.trainers.manifest import ArtifactManifest
    from rayft.trainers.storage import StorageRoot

    root = copy_registry(published_adapters, tmp_path_factory.mktemp("projects") / "root")
    # a1 is alpha's (published by one of its jobs); a2 stays shared.
    ArtifactManifest(kind="adapter", base_model="tiny-llama", project="alpha").write(
        root / "adapters" / "a1"
    )
    store = KeyStore(str(root))
    keys = {}
    for name, project, role in (
        ("alpha", "alpha", "member"),
        ("beta", "beta", "member"),
        ("infer", "alpha", "inference"),
        ("ops", "ops", "admin"),
        ("revoked", "alpha", "member"),
    ):
        record, key = store.create(project, role)
        keys[name] = SimpleNamespace(id=record.id, key=key, auth={"Authorization": f"Bearer {key}"})
    store.revoke(keys["revoked"].id)
    _, expired = store.create("alpha", "member", expires_at=time.time() - 1)
    keys["expired"] = SimpleNamespace(auth={"Authorization": f"Bearer {expired}"})
    keys["env"] = SimpleNamespace(auth={"Authorization": f"Bearer {ENV_KEY}"})

    engine = ModelEngine("tiny-llama", storage=str(root), dtype="float32")
    limits = Limits(max_tokens_limit=8, max_prompt_tokens=64, max_eval_rows=16)
    service = ModelService(
        engine,
        limits,
        api_key=ENV_KEY,
        request_log=RequestLog(StorageRoot.resolve(str(root)), "projects-test", log_payloads=True),
    )
    with http_server(create_api(service, [fine_tuning_router])) as url:
        http = httpx.Client(base_url=url, timeout=120)
        upload = http.post(
            "/v1/files",
            files={"file": ("colors.jsonl", ROWS)},
            data={"purpose": "fine-tune"},
            headers=keys["alpha"].auth,
        )
        assert upload.status_code == 200, upload.text
        file_id = upload.json()["id"]
        job_id = _alpha_job(jobs, engine.storage, file_id, keys["alpha"].id)
        yield SimpleNamespace(
            http=http, keys=keys, file_id=file_id, job_id=job_id, root=root, store=store
        )
        http.close()
    service.close()


def _alpha_job(jobs, root, file_id: str, key_id: str) -> str:
    """A fine-tuning job of project alpha, recorded as the service records one, then ended."""
    request = jobs.parse_request({"model": "tiny-llama", "training_file": file_id})
    job_id = jobs.new_job_id()
    spec, hyper = jobs.build_spec(
        request,
        base_model="tiny-llama",
        parent_adapter=None,
        train_url=root.url(f"datasets/{file_id}.jsonl"),
        eval_url=None,
        storage=root.location,
        output_name=jobs.fine_tuned_name("tiny-llama", None, job_id),
    )
    checked = jobs.validate_job_spec(spec, request).to_dict()
    record = jobs.new_record(job_id, request, checked, hyper, {}, "alpha", key_id)
    jobs.save_job(root, record)
    jobs.fail(root, job_id, "runner_not_started", "no Ray cluster in this test")
    return job_id


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert {"message", "type", "code"} <= set(error)
    return error


def test_another_projects_file_is_not_found_and_not_listed(api):
    beta, alpha = api.keys["beta"].auth, api.keys["alpha"].auth
    unknown = "file-" + "0" * 24
    for method, path in (
        ("GET", "/v1/files/{}"),
        ("GET", "/v1/files/{}/content"),
        ("DELETE", "/v1/files/{}"),
    ):
        theirs = _error(api.http.request(method, path.format(api.file_id), headers=beta), 404)
        missing = _error(api.http.request(method, path.format(unknown), headers=beta), 404)
        # Answered exactly as an id that does not exist: nothing to probe.
        assert theirs["code"] == missing["code"] == "file_not_found"
        assert theirs["message"] == missing["message"].replace(unknown, api.file_id)
    assert api.http.get("/v1/files", headers=beta).json()["data"] == []
    mine = api.http.get("/v1/files", headers=alpha).json()["data"]
    assert [f["id"] for f in mine] == [api.file_id]
    assert mine[0]["rayft"]["project"] == "alpha"
    assert mine[0]["rayft"]["key_id"] == api.keys["alpha"].id
    content = api.http.get(f"/v1/files/{api.file_id}/content", headers=alpha)
    assert content.status_code == 200 and content.content == ROWS


def test_another_projects_job_is_not_found_and_not_listed(api):
    beta, alpha = api.keys["beta"].auth, api.keys["alpha"].auth
    for method, suffix in (
        ("GET", ""),
        ("GET", "/events"),
        ("GET", "/checkpoints"),
        ("POST", "/cancel"),
    ):
        path = f"/v1/fine_tuning/jobs/{api.job_id}{suffix}"
        assert _error(api.http.request(method, path, headers=beta), 404)["code"] == "job_not_found"
    assert api.http.get("/v1/fine_tuning/jobs", headers=beta).json()["data"] == []
    listed = api.http.get("/v1/fine_tuning/jobs", headers=alpha).json()["data"]
    assert [j["id"] for j in listed] == [api.job_id]
    assert listed[0]["rayft"]["project"] == "alpha"
    events = api.http.get(f"/v1/fine_tuning/jobs/{api.job_id}/events", headers=alpha).json()
    created = [e for e in events["data"] if (e["data"] or {}).get("status") == "validating_files"]
    assert created[0]["data"]["key_id"] == api.keys["alpha"].id  # which key acted, not the key
    assert api.keys["alpha"].key not in json.dumps(events)


def test_a_job_cannot_train_on_another_projects_file_or_adapter(api):
    beta = api.keys["beta"].auth
    body = {"model": "tiny-llama", "training_file": api.file_id}
    refused = _error(api.http.post("/v1/fine_tuning/jobs", json=body, headers=beta), 400)
    assert refused["param"] == "training_file" and "not an uploaded file" in refused["message"]
    body = {"model": "a1", "training_file": "file-" + "0" * 24}
    assert _error(api.http.post("/v1/fine_tuning/jobs", json=body, headers=beta), 404)


def test_another_projects_adapter_is_hidden_and_not_callable(api):
    beta, alpha = api.keys["beta"].auth, api.keys["alpha"].auth
    seen_by_beta = {m["id"] for m in api.http.get("/v1/models", headers=beta).json()["data"]}
    seen_by_alpha = {m["id"] for m in api.http.get("/v1/models", headers=alpha).json()["data"]}
    assert "a1" not in seen_by_beta and {"tiny-llama", "a2", "a3"} <= seen_by_beta
    assert {"a1", "a2"} <= seen_by_alpha
    body = {"model": "a1", "prompt": "hi", "max_tokens": 2}
    theirs = _error(api.http.post("/v1/completions", json=body, headers=beta), 404)
    missing = _error(
        api.http.post("/v1/completions", json={**body, "model": "zz"}, headers=beta), 404
    )
    assert theirs["message"] == missing["message"].replace("'zz'", "'a1'")
    assert _error(api.http.get("/v1/models/a1", headers=beta), 404)["code"] == "model_not_found"
    chat = {"model": "a1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert _error(api.http.post("/v1/chat/completions", json=chat, headers=beta), 404)
    evaluation = {"model": "a1", "rows": [{"text": "hello there"}]}
    assert _error(api.http.post("/v1/evaluations", json=evaluation, headers=beta), 404)
    assert api.http.post("/v1/completions", json=body, headers=alpha).status_code == 200
    admin = api.keys["ops"].auth
    assert api.http.post("/v1/completions", json=body, headers=admin).status_code == 200


def test_evaluations_read_only_the_keys_projects_files_and_logged_traffic(api):
    beta, alpha = api.keys["beta"].auth, api.keys["alpha"].auth
    on_file = {"model": "tiny-llama", "dataset": api.file_id}
    assert _error(api.http.post("/v1/evaluations", json=on_file, headers=beta), 404)
    assert api.http.post("/v1/evaluations", json=on_file, headers=alpha).status_code == 200
    chat = {"model": "a2", "messages": [{"role": "user", "content": "secret plan"}]}
    said = api.http.post("/v1/chat/completions", json={**chat, "max_tokens": 3}, headers=alpha)
    assert said.status_code == 200, said.text
    logged = {"model": "a2", "dataset": {"request_log": {}}}
    refused = _error(api.http.post("/v1/evaluations", json=logged, headers=beta), 404)
    assert refused["code"] == "no_logged_requests"
    scored = api.http.post("/v1/evaluations", json=logged, headers=alpha)
    assert scored.status_code == 200 and scored.json()["rows"] >= 1, scored.text
    from rayft.serving.request_log import read_log
    from rayft.trainers.storage import StorageRoot

    lines = [
        line for line in read_log(StorageRoot.resolve(str(api.root)), "a2") if line["status"] == 200
    ]
    assert {(line["project"], line["key_id"]) for line in lines} == {
        ("alpha", api.keys["alpha"].id)
    }
    logs = "".join(p.read_text() for p in (api.root / "request_logs").rglob("*.jsonl"))
    assert all(k.key not in logs for k in api.keys.values() if hasattr(k, "key"))


def test_an_inference_key_only_calls_models(api):
    infer = api.keys["infer"].auth
    refused = [
        api.http.post(
            "/v1/files",
            files={"file": ("x.jsonl", ROWS)},
            data={"purpose": "fine-tune"},
            headers=infer,
        ),
        api.http.post(
            "/v1/fine_tuning/jobs",
            json={"model": "tiny-llama", "training_file": api.file_id},
            headers=infer,
        ),
        api.http.post(f"/v1/fine_tuning/jobs/{api.job_id}/cancel", headers=infer),
        api.http.delete(f"/v1/files/{api.file_id}", headers=infer),
        api.http.get("/v1/files", headers=infer),
        api.http.get("/v1/fine_tuning/jobs", headers=infer),
        api.http.post(
            "/v1/evaluations", json={"model": "a1", "rows": [{"text": "hi"}]}, headers=infer
        ),
    ]
    for response in refused:
        error = _error(response, 403)
        assert (error["code"], error["type"]) == ("permission_denied", "permission_error")
    assert api.http.get(f"/v1/files/{api.file_id}", headers=api.keys["alpha"].auth).is_success
    body = {"model": "a1", "prompt": "hi", "max_tokens": 2}  # its project's adapter
    assert api.http.post("/v1/completions", json=body, headers=infer).status_code == 200
    assert "a1" in {m["id"] for m in api.http.get("/v1/models", headers=infer).json()["data"]}


def test_revoked_and_expired_keys_are_401(api):
    for name in ("revoked", "expired"):
        error = _error(api.http.get("/v1/models", headers=api.keys[name].auth), 401)
        assert error["code"] == "invalid_api_key"
    record, key = api.store.create("beta", "member")
    headers = {"Authorization": f"Bearer {key}"}
    assert api.http.get("/v1/models", headers=headers).status_code == 200
    api.store.revoke(record.id)  # as `rayft keys revoke` does, while the server runs
    assert _error(api.http.get("/v1/models", headers=headers), 401)
    assert _error(api.http.get("/v1/models"), 401)


def test_the_environment_key_is_an_admin_of_every_project(api):
    env = api.keys["env"].auth
    files = api.http.get("/v1/files", headers=env).json()["data"]
    assert api.file_id in {f["id"] for f in files}
    assert api.http.get(f"/v1/fine_tuning/jobs/{api.job_id}", headers=env).status_code == 200
    assert "a1" in {m["id"] for m in api.http.get("/v1/models", headers=env).json()["data"]}


def test_health_says_only_up_without_an_admin_key(api):
    for headers in ({}, api.keys["beta"].auth, api.keys["infer"].auth, {"Authorization": "x"}):
        response = api.http.get("/health", headers=headers)
        assert response.status_code == 200 and response.json() == {"status": "ok"}
    for admin in (api.keys["env"].auth, api.keys["ops"].auth):
        detail = api.http.get("/health", headers=admin).json()
        assert detail["status"] == "ok" and detail["model"] == "tiny-llama"
        assert {"pid", "loaded_adapters", "queued_rows"} <= set(detail)
