"""``POST /v1/fine_tuning/jobs`` under abuse: server paths, unknown keys, huge jobs and numbers.

A real ``ModelService`` (tiny-llama) with the fine-tuning routes behind the real API over
HTTP on 127.0.0.1, no Ray: every request here is refused before a job is recorded or a
runner started, and the refusal names the body field at fault.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from serving_http import http_server

pytestmark = pytest.mark.fault

CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}


@pytest.fixture(scope="module")
def server(rayft_home: Path, tiny_model_dir: Path) -> Iterator[str]:
    from rayft.cluster.fine_tuning_api import router
    from rayft.serving.engine import ModelEngine
    from rayft.serving.openai_api import create_api
    from rayft.serving.service import Limits, ModelService
    from rayft.trainers.job_limits import JobLimits

    engine = ModelEngine("tiny-llama", storage=str(rayft_home), dtype="float32")
    limits = Limits(job_limits=JobLimits(max_workers=2, max_cpus_per_worker=2, max_gpus=0))
    service = ModelService(engine, limits, api_key="")
    with http_server(create_api(service, [router])) as url:
        yield url
    service.close()


@pytest.fixture(scope="module")
def training_file(server: str) -> str:
    rows = "".join(json.dumps(CHAT) + "\n" for _ in range(4))
    files = {"file": ("chats.jsonl", rows.encode(), "application/octet-stream")}
    answer = httpx.post(f"{server}/v1/files", files=files, data={"purpose": "fine-tune"})
    assert answer.status_code == 200, answer.text
    return answer.json()["id"]


def job_ids(server: str) -> set[str]:
    return {job["id"] for job in httpx.get(f"{server}/v1/fine_tuning/jobs").json()["data"]}


def post(server: str, body: dict[str, Any] | bytes) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    # A short timeout: a server that opened a named pipe to read it would hang here.
    return httpx.post(f"{server}/v1/fine_tuning/jobs", content=content, headers=headers, timeout=20)


def error_of(answer: httpx.Response) -> dict[str, Any]:
    assert answer.status_code == 400, answer.text
    return answer.json()["error"]


def test_job_bodies_naming_server_files_are_refused_unread(server, training_file, tmp_path):
    before = job_ids(server)
    pipe = tmp_path / "pipe.jsonl"
    os.mkfifo(pipe)  # opening it to read blocks until a writer comes: none will
    messages = set()
    for value in ("/etc/passwd", str(pipe), "/no/such.jsonl", "s3://other/x.jsonl"):
        body = {"model": "tiny-llama", "training_file": training_file}
        error = error_of(post(server, {**body, "rayft": {"eval": {"general": value}}}))
        assert error["param"] == "rayft.eval.general"
        assert "builtin:general" in error["message"] and "file-" in error["message"]
        messages.add(error["message"])
    assert len(messages) == 1  # existing or not, a path gets the same answer
    for extension, param in [
        ({"eval": {"general_v2": "/etc/passwd"}}, "rayft.eval.general_v2"),
        ({"plugins": {"module": "os"}}, "rayft.plugins"),
        ({"data": {"eval": "s3://other/x.jsonl"}}, "rayft.data.eval"),
        ({"eval": {"general": "file-0000aaaa"}}, "rayft.eval.general"),  # no such upload
    ]:
        body = {"model": "tiny-llama", "training_file": training_file, "rayft": extension}
        error = error_of(post(server, body))
        assert error["param"] == param, error
    assert job_ids(server) == before


def test_jobs_past_the_limits_are_400_naming_the_field(server, training_file):
    before = job_ids(server)
    body = {"model": "tiny-llama", "training_file": training_file}
    hyper = "method.supervised.hyperparameters"
    cases = [
        ({"rayft": {"scaling": {"num_workers": 100000}}}, "rayft.scaling.num_workers", "at most 2"),
        (
            {"rayft": {"scaling": {"cpus_per_worker": 64}}},
            "rayft.scaling.cpus_per_worker",
            "at most 2",
        ),
        ({"rayft": {"optim": {"max_steps": 10**12}}}, "rayft.optim.max_steps", "at most 100000"),
        ({"rayft": {"checkpoint": {"keep": 1000000}}}, "rayft.checkpoint.keep", "at most 20"),
        (
            {"rayft": {"optim": {"max_steps": 50000}, "checkpoint": {"every_steps": 1}}},
            "rayft.checkpoint.every_steps",
            "at most 1000 per job",
        ),
        (
            {
                "method": {
                    "type": "supervised",
                    "supervised": {"hyperparameters": {"n_epochs": 1000}},
                }
            },
            f"{hyper}.n_epochs",
            "at most 50",
        ),
        ({"hyperparameters": {"batch_size": 4096}}, "hyperparameters.batch_size", "at most 1024"),
    ]
    for extra, param, bound in cases:
        error = error_of(post(server, {**body, **extra}))
        assert error["param"] == param and bound in error["message"], error
        assert error["code"] == "job_limit_exceeded"
    assert job_ids(server) == before


def test_huge_and_non_finite_numbers_are_400_not_500(server, training_file):
    head = f'{{"model": "tiny-llama", "training_file": "{training_file}", '.encode()
    cases = [
        (
            head + b'"hyperparameters": {"learning_rate_multiplier": Infinity}}',
            "hyperparameters.learning_rate_multiplier",
        ),
        (
            head + b'"hyperparameters": {"learning_rate_multiplier": NaN}}',
            "hyperparameters.learning_rate_multiplier",
        ),
        (head + b'"rayft": {"optim": {"lr": 1e999}}}', "rayft.optim.lr"),
        (head + b'"rayft": {"optim": {"lr": ' + b"1" * 4000 + b"}}}", "rayft.optim.lr"),
        (head + b'"seed": ' + b"7" * 5000 + b"}", "seed"),
    ]
    for raw, param in cases:
        error = error_of(post(server, raw))
        assert error["param"] == param, error
