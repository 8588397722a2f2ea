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

import json
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from serving_http import http_server, wait_drained

pytestmark = pytest.mark.fault

KEY = "fuzz-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
EXAMPLES_PER_OPERATION = 150
MIN_REQUESTS = 1000
MAX_FILE_BYTES = 256 * 1024


@pytest.fixture(scope="module")
def api(rayft_home: Path, tiny_model_dir: Path) -> Iterator[SimpleNamespace]:
    """The API (inference, files and jobs routes) on 127.0.0.1, with no Ray in this process:
    a job that passes every check is recorded and fails to start (``runner_not_started``)."""
    import ray

    from rayft.cluster.fine_tuning_api import router as fine_tuning_router
    from rayft.serving.engine import ModelEngine
    from rayft.serving.openai_api import create_api
    from rayft.serving.service import Limits, ModelService
    from rayft.trainers.job_limits import JobLimits, ProjectQuotas

    assert not ray.is_initialized(), "a job accepted here would start on that cluster"
    engine = ModelEngine("tiny-llama", storage=str(rayft_home), dtype="float32")
    # Small limits keep each valid request quick; they are limits, so they are fuzzed too.
    limits = Limits(
        max_tokens_limit=8,
        max_prompt_tokens=64,
        max_eval_rows=8,
        max_n=4,
        max_file_bytes=MAX_FILE_BYTES,
        job_limits=JobLimits(
            max_workers=2, max_cpus_per_worker=2, max_gpus=0, max_steps=10, eval_max_rows=8
        ),
        # The fuzz is one project sending thousands of requests: no per-second bound.
        project_quotas=ProjectQuotas(requests_per_s=0),
    )
    service = ModelService(engine, limits, api_key=KEY)
    app = create_api(service, [fine_tuning_router])
    with http_server(app) as url:
        yield SimpleNamespace(url=url, app=app)
    service.close()


@pytest.fixture(scope="module")
def api_url(api: SimpleNamespace) -> str:
    return api.url


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


# ------------------------------------------------ every route, its body, query and path
#
# A seeded generator per route of the app (``GENERATORS``, keyed by method and path as
# FastAPI lists them): a route without one fails the test, so a new route joins the fuzz.
# Bodies are built from plausible requests, then broken: keys dropped or added, values
# swapped for paths, URIs, huge or non-finite numbers, wrong types and deep nesting.

SEED = 20261203
ROUNDS = 150
"""Requests per route (more for the bodies worth more: uploads and jobs)."""
CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
ROWS = "".join(json.dumps(CHAT) + "\n" for _ in range(4)).encode()


class Raw(str):
    """JSON text put into a body as it is (``NaN``, a 5,000-digit number, ``[[[...]]]``)."""


def dumps(value: Any) -> str:
    """``value`` as JSON text, ``Raw`` parts verbatim."""
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))}: {dumps(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(dumps(v) for v in value) + "]"
    return json.dumps(value)


STRINGS = [
    "",
    "/etc/passwd",
    "../../../../etc/shadow",
    "..%2f..%2fetc%2fpasswd",
    "~/.ssh/id_rsa",
    "file:///etc/passwd",
    "s3://bucket/key.jsonl",
    "gs://bucket/x",
    "http://169.254.169.254/latest/meta-data/",
    "builtin:general",
    "os",
    "tiny-llama",
    "file-" + "A" * 24,
    "file-" + "a" * 80,
    "ünïcødé ✓ 日本語 🚀",
    "\u202etxt.exe",
    "a\x00b",
    "\ud800",  # a lone surrogate: json.dumps escapes it, decoders must cope
    "x" * 5000,
    "$(rm -rf /)",
    "{{7*7}}",
    "NaN",
    "auto",
    "supervised",
    "lora",
]
NUMBERS = [
    Raw("NaN"),
    Raw("Infinity"),
    Raw("-Infinity"),
    Raw("1e999"),
    Raw("-1e999"),
    Raw("9" * 5000),
    Raw("-" + "9" * 400),
    Raw("1." + "0" * 3000 + "1"),
    Raw("4.9e-324"),
    2**63,
    2**64,
    -1,
    0,
    1,
    3,
    0.5,
    -0.0,
    1e308,
]


def junk(rng: random.Random, depth: int = 0) -> Any:
    """Any JSON value, mostly a hostile one."""
    kind = rng.random()
    if kind < 0.35:
        return rng.choice(STRINGS)
    if kind < 0.65:
        return rng.choice(NUMBERS)
    if kind < 0.72:
        return rng.choice([True, False, None])
    if kind < 0.80:
        n = rng.choice([1, 50, 3000])
        return Raw("[" * n + "]" * n) if rng.random() < 0.5 else Raw('{"a":' * n + "1" + "}" * n)
    if depth > 3:
        return rng.choice(STRINGS)
    if kind < 0.90:
        return [junk(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {rng.choice(STRINGS[:14]): junk(rng, depth + 1) for _ in range(rng.randint(0, 3))}


def mutate(rng: random.Random, body: dict[str, Any]) -> dict[str, Any]:
    """``body`` with a few keys dropped, replaced by junk or added."""
    body = dict(body)
    for _ in range(rng.randint(0, 3)):
        action = rng.random()
        if action < 0.2 and body:
            body.pop(rng.choice(list(body)))
        elif action < 0.8 and body:
            body[rng.choice(list(body))] = junk(rng)
        else:
            body[rng.choice(STRINGS[:14] + ["rayft", "stream", "n"])] = junk(rng)
    return body


def json_request(rng: random.Random, method: str, path: str, body: Any) -> dict[str, Any]:
    """A request with ``body`` as JSON, or now and then as garbage or another content type."""
    roll = rng.random()
    if roll < 0.06:
        content = rng.choice([b"", b"{", b"[]", b'"x"', b"null", rng.randbytes(64), b"\xff\xfe{}"])
    else:
        content = dumps(body).encode()
    content_type = "application/json"
    if roll > 0.95:
        content_type = rng.choice(["text/plain", "application/x-www-form-urlencoded", "", "a/b;;"])
    return {"method": method, "url": path, "content": content, "headers": ctype(content_type)}


def ctype(value: str) -> dict[str, str]:
    return {"Content-Type": value} if value else {}


def query(rng: random.Random) -> dict[str, str]:
    """Pagination and filter parameters, plausible and not."""
    choices = {
        "limit": ["1", "2", "20", "0", "-1", "abc", "", "1e3", "9" * 60, "²", "١", " 3", "10001"],
        "after": [*STRINGS[:16], "file-", "ftjob-x", "ftevent-0"],
        "since": ["0", "-1", "1700000000", "yesterday", "9" * 40, "NaN"],
        "until": ["0", "1e999", "2026-12-03T00:00:00Z", "inf"],
        "order": ["asc", "desc", "sideways"],
        "purpose": ["fine-tune", "assistants", "", "../x"],
    }
    return {k: rng.choice(v) for k, v in choices.items() if rng.random() < 0.4}


def an_id(rng: random.Random, known: list[str], prefix: str) -> str:
    """A path id: a known one, a made-up one, or one that looks like traversal or is huge."""
    roll = rng.random()
    if roll < 0.25 and known:
        return quote(rng.choice(known), safe="")
    if roll < 0.4:
        return prefix + "".join(rng.choices("abcdef0123456789", k=24))
    return rng.choice(
        [
            quote("../../etc/passwd", safe=""),
            "..%2F..%2Fetc%2Fpasswd",
            "%2e%2e",
            "%00",
            "a%00b",
            quote("ünïcødé-🚀", safe=""),
            "x" * 4000,
            prefix + "A" * 3000,
            quote(" ", safe=""),
            "%ff%fe",
            quote(prefix + "../" + "x", safe=""),
            "~root",
            "%252e%252e%252f",
        ]
    )


def _sampling(rng: random.Random) -> dict[str, Any]:
    fields = {
        "model": rng.choice(["tiny-llama", "tiny-llama", "nope", "../adapters/x"]),
        "max_tokens": rng.choice([1, 4, 8, 9, 0]),
        "temperature": rng.choice([0.0, 1.0, 2.5]),
        "n": rng.choice([1, 2, 5]),
        "stream": rng.random() < 0.2,
        "seed": rng.choice([1, 2**64, -(2**63)]),
        "stop": rng.choice([None, "\n", ["a", "b"]]),
    }
    return {k: v for k, v in fields.items() if rng.random() < 0.7 or k == "model"}


def completions(rng: random.Random, pool: SimpleNamespace) -> dict[str, Any]:
    prompt = rng.choice(["hello", ["a", "b"], [1, 2, 3], [[1, 2], [3]], "x" * 400, [99999999]])
    body = mutate(rng, {**_sampling(rng), "prompt": prompt})
    return json_request(rng, "POST", "/v1/completions", body)


def chat_completions(rng: random.Random, pool: SimpleNamespace) -> dict[str, Any]:
    message = {"role": rng.choice(["user", "system", "tool", "robot"]), "content": "hi"}
    body = mutate(rng, {**_sampling(rng), "messages": [mutate(rng, message)]})
    return json_request(rng, "POST", "/v1/chat/completions", body)


def evaluations(rng: random.Random, pool: SimpleNamespace) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "tiny-llama", "max_tokens": rng.choice([1, 4, 10**6])}
    if rng.random() < 0.5:
        body["rows"] = [mutate(rng, CHAT) for _ in range(rng.randint(0, 3))]
    else:
        body["dataset"] = rng.choice([*STRINGS[:12], {"request_log": junk(rng)}])
    body["metrics"] = rng.sample(["loss", "perplexity", "exact_match", "bleu", "rm -rf"], 2)
    body["format"] = rng.choice(["auto", "chat", "text", "yaml"])
    return json_request(rng, "POST", "/v1/evaluations", mutate(rng, body))


def classifications(rng: random.Random, pool: SimpleNamespace) -> dict[str, Any]:
    body = {"model": rng.choice(["tiny-llama", "nope"]), "input": rng.choice(["hi", ["a", "b"]])}
    return json_request(rng, "POST", "/v1/classifications", mutate(rng, body))


def rayft_extension(rng: random.Random) -> dict[str, Any]:
    """A ``rayft`` job-spec extension: allowed keys, keys set by the job, unknown keys."""
    from rayft.cluster.job_body import ALLOWED, SET_BY_JOB

    plausible = {
        "optim.max_steps": [1, 2],
        "optim.lr": [1e-4],
        "scaling.num_workers": [1],
        "lora.r": [4, 8],
        "lora.target_modules": ["all-linear", ["q_proj"]],
        "data.format": ["chat"],
        "data.max_seq_len": [64],
        "eval.general": ["builtin:general", "/etc/passwd", "file-0000"],
        "method": ["lora", "full", "qlora"],
    }
    keys = [*ALLOWED, *SET_BY_JOB, "plugins.module", "data.train", "a.b.c.d", "", "model.name"]
    extension: dict[str, Any] = {}
    for key in rng.sample(keys, rng.randint(0, 4)):
        value = rng.choice(plausible[key]) if key in plausible and rng.random() < 0.5 else junk(rng)
        node = extension
        *parents, leaf = key.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            node = child if isinstance(child, dict) else {}
        node[leaf] = value if value is not None or rng.random() < 0.5 else junk(rng)
    return extension if rng.random() < 0.9 else junk(rng)


def create_job(rng: random.Random, pool: SimpleNamespace) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": rng.choice(["tiny-llama"] * 3 + STRINGS[:12]),
        "training_file": rng.choice([pool.file_ids[0]] * 3 + STRINGS[:14]),
    }
    optional = {
        "validation_file": lambda: rng.choice([pool.file_ids[0], *STRINGS[:14]]),
        "suffix": lambda: rng.choice(["mine", "x" * 41, "../up", "ü"]),
        "seed": lambda: rng.choice([0, 7, -1, 2**31, Raw("9" * 200)]),
        "metadata": lambda: rng.choice([{"a": "b"}, {str(i): "v" for i in range(20)}, []]),
        "method": lambda: {
            "type": rng.choice(["supervised", "dpo", "reinforcement", "magic"]),
            "supervised": {"hyperparameters": {"n_epochs": rng.choice([1, "auto", 1000])}},
        },
        "hyperparameters": lambda: {"batch_size": rng.choice([1, "auto", 4096, Raw("NaN")])},
        "integrations": lambda: [{"type": "wandb"}],
        "rayft": lambda: rayft_extension(rng),
    }
    for key, make in optional.items():
        if rng.random() < (0.8 if key == "rayft" else 0.2):
            body[key] = make()
    return json_request(rng, "POST", "/v1/fine_tuning/jobs", mutate(rng, body))


def a_grader(rng: random.Random, depth: int = 0) -> Any:
    """A grader in OpenAI's JSON, plausible or broken; python sources end quickly."""
    template = rng.choice(["{{ sample.output_text }}", "{{ item.answer }}", "{{ 7*7 }}", "x"])
    graders: list[dict[str, Any]] = [
        {"type": "string_check", "operation": rng.choice(["eq", "ilike", "regex"])},
        {"type": "text_similarity", "evaluation_metric": rng.choice(["bleu", "rouge_5", "cosine"])},
        {
            "type": "python",
            "source": rng.choice(
                [
                    "def grade(sample, item):\n    return 1.0",
                    "def grade(sample, item):\n    raise ValueError(item)",
                    "def grade(s, i):\n    return float('nan')",
                    "import os\nos.fork()",
                    "def grade(",
                ]
            ),
        },
        {
            "type": rng.choice(["score_model", "label_model"]),
            "model": rng.choice(["tiny-llama", "nope", "../adapters/x"]),
            "input": [{"role": rng.choice(["user", "robot"]), "content": template}],
            "labels": ["a", "b"],
            "passing_labels": ["a"],
            "range": rng.choice([[0, 1], [1, 0], [Raw("NaN"), 1]]),
        },
    ]
    grader = {"name": rng.choice(["g", "", "x" * 300]), "input": template, "reference": "y"}
    grader |= rng.choice(graders)
    if grader["type"] != "label_model":
        grader.pop("labels", None), grader.pop("passing_labels", None)
    if depth == 0 and rng.random() < 0.2:
        grader = {
            "type": "multi",
            "name": "m",
            "graders": {"a": a_grader(rng, 1), "b": a_grader(rng, 1)},
            "calculate_output": rng.choice(["a + b", "max(a, b) / 2", "__import__('os')", "c"]),
        }
    return mutate(rng, grader) if rng.random() < 0.5 else grader


def grader_run(rng: random.Random, pool: SimpleNamespace) -> dict[str, Any]:
    body = {
        "grader": a_grader(rng),
        "model_sample": rng.choice(["Paris", '{"a": 1}', "", "x" * 5000]),
        "item": rng.choice([{"answer": "Paris"}, {}, [1], "s"]),
    }
    return json_request(rng, "POST", "/v1/fine_tuning/alpha/graders/run", mutate(rng, body))


def grader_validate(rng: random.Random, pool: SimpleNamespace) -> dict[str, Any]:
    body = mutate(rng, {"grader": a_grader(rng)})
    return json_request(rng, "POST", "/v1/fine_tuning/alpha/graders/validate", body)


# ----------------------------------------------------------------------- evals


def eval_create(rng: random.Random, pool: SimpleNamespace) -> dict[str, Any]:
    config = rng.choice(
        [
            {"type": "custom", "item_schema": {"type": "object"}, "include_sample_schema": True},
            {"type": "custom", "item_schema": junk(rng)},
            {"type": rng.choice(["logs", "stored_completions", "x"])},
        ]
    )
    body = {
        "name": rng.choice(["e", "", "x" * 300]),
        "data_source_config": mutate(rng, config) if rng.random() < 0.3 else config,
        "testing_criteria": [a_grader(rng) for _ in range(rng.choice([0, 1, 2, 40]))],
        "metadata": rng.choice([{"a": "b"}, {str(i): "v" for i in range(20)}, {"k": 1}]),
    }
    return json_request(rng, "POST", "/v1/evals", mutate(rng, body))


def eval_update(rng: random.Random, pool: SimpleNamespace) -> dict[str, Any]:
    body = mutate(rng, {"name": rng.choice(["n", "x" * 300]), "metadata": {"a": "b"}})
    path = f"/v1/evals/{an_id(rng, pool.eval_ids, 'eval_')}"
    return json_request(rng, "POST", path, body)


def a_run_source(rng: random.Random, pool: SimpleNamespace) -> dict[str, Any]:
    """A run's ``data_source``: jsonl or completions, inline rows or a file, often broken."""
    row = {"item": {"answer": "a", "messages": CHAT["messages"]}, "sample": {"output_text": "a"}}
    source = rng.choice(
        [
            {"type": "file_content", "content": [mutate(rng, row) for _ in range(3)]},
            {"type": "file_content", "content": [row] * rng.choice([1, 9])},
            {"type": "file_id", "id": rng.choice([*pool.file_ids, *STRINGS[:14]])},
            {"type": rng.choice(["stored_completions", "responses"])},
        ]
    )
    if rng.random() < 0.4:
        return {"type": "jsonl", "source": source}
    template = rng.choice(["{{ item.answer }}", "{{ sample.output_text }}", "{{ 7*7 }}", "hi"])
    inputs = rng.choice(
        [
            {"type": "template", "template": [{"role": "user", "content": template}]},
            {"type": "item_reference", "item_reference": rng.choice(["item.messages", "x"])},
        ]
    )
    data = {
        "type": rng.choice(["completions"] * 4 + ["responses"]),
        "model": rng.choice(["tiny-llama"] * 3 + STRINGS[:12]),
        "source": source,
        "input_messages": mutate(rng, inputs) if rng.random() < 0.3 else inputs,
        "sampling_params": mutate(rng, {"max_completion_tokens": rng.choice([1, 4, 10**6])}),
    }
    return mutate(rng, data) if rng.random() < 0.3 else data


def run_create(rng: random.Random, pool: SimpleNamespace) -> dict[str, Any]:
    body = mutate(rng, {"name": "r", "data_source": a_run_source(rng, pool)})
    path = f"/v1/evals/{an_id(rng, pool.eval_ids, 'eval_')}/runs"
    return json_request(rng, "POST", path, body)


def eval_getter(method: str, tail: str = "") -> Callable:
    """Requests to ``/v1/evals/{eval_id}<tail>``, ids from the pool or made up."""

    def make(rng: random.Random, pool: SimpleNamespace) -> dict[str, Any]:
        path = f"/v1/evals/{an_id(rng, pool.eval_ids, 'eval_')}{tail}"
        path = path.replace("{run_id}", an_id(rng, pool.run_ids, "evalrun_"))
        path = path.replace("{output_item_id}", an_id(rng, pool.item_ids, "outputitem_"))
        params = query(rng)
        if rng.random() < 0.3:
            params["status"] = rng.choice(["pass", "fail", "completed", "x"])
        return {"method": method, "url": path, "params": params}

    return make


# ------------------------------------------------------------------- uploads


def multipart(parts: list[tuple[str, str | None, str | None, bytes]], boundary: str) -> bytes:
    """A multipart/form-data body of ``(name, filename, content type, bytes)`` parts."""
    out = b""
    for name, filename, content_type, data in parts:
        disposition = f'form-data; name="{name}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        head = f"--{boundary}\r\nContent-Disposition: {disposition}\r\n"
        if content_type:
            head += f"Content-Type: {content_type}\r\n"
        out += head.encode("utf-8", "surrogatepass") + b"\r\n" + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def file_bytes(rng: random.Random) -> bytes:
    """The content of an uploaded file, valid or broken."""
    choices: list[Callable[[], bytes]] = [
        lambda: ROWS,
        lambda: b"",
        lambda: rng.randbytes(rng.choice([1, 100, 5000])),
        lambda: ROWS.replace(b"hi", b"h\xe9\xff"),  # not UTF-8
        lambda: b"\xef\xbb\xbf" + ROWS,
        lambda: b"[" * 100_000 + b"]" * 100_000,
        lambda: b'{"messages": ' * 5000 + b"1" + b"}" * 5000 + b"\n",
        lambda: b'{"messages": [{"role": "user", "content": "' + b"x" * 200_000 + b'"}]}\n',
        lambda: b"x" * (MAX_FILE_BYTES + 10),
        lambda: dumps({"messages": junk(rng)}).encode() + b"\n",
        lambda: b'{"text": NaN}\n{"text": 1e999}\n',
        lambda: ROWS + b"\x00\x00\x00",
        lambda: b"\n\n\n",
        lambda: dumps(CHAT).encode(),
        lambda: b'{"item": {"answer": "a"}, "sample": {"output_text": "a"}}\n',
        lambda: dumps({"item": junk(rng), "sample": junk(rng)}).encode() + b"\n",
    ]
    return rng.choice(choices)()


def upload(rng: random.Random, pool: SimpleNamespace) -> dict[str, Any]:
    name = rng.choice(
        [
            "chats.jsonl",
            "chats.json",
            "../../etc/cron.d/x.jsonl",
            "data.parquet",
            "data.csv",
            "noext",
            "ü🚀.jsonl",
            "x" * 3000 + ".jsonl",
            "a\\b.jsonl",
            ".jsonl",
            "",
        ]
    )
    purpose = rng.choice(["fine-tune"] * 4 + ["evals", "assistants", "", "FINE-TUNE", "x" * 5000])
    parts: list[tuple[str, str | None, str | None, bytes]] = [
        ("file", name, rng.choice([None, "application/octet-stream", "image/png", "x"]), b""),
        ("purpose", None, None, purpose.encode()),
    ]
    parts[0] = (*parts[0][:3], file_bytes(rng))
    for _ in range(rng.choice([0, 0, 0, 1, 2])):  # a part dropped, repeated or added
        roll = rng.random()
        if roll < 0.4 and parts:
            parts.pop(rng.randrange(len(parts)))
        elif roll < 0.7:
            parts.append(rng.choice(parts) if parts else ("x", None, None, b""))
        else:
            parts.append((rng.choice(["extra", "file2", "", "purpose"]), None, None, b"v"))
    boundary = rng.choice(["fuzzboundary", "a" * 70, "b-" + str(rng.random())])
    body = multipart(parts, boundary)
    content_type = f"multipart/form-data; boundary={boundary}"
    roll = rng.random()
    if roll < 0.05:
        body = body[: rng.randrange(len(body) + 1)]  # cut short
    elif roll < 0.10:
        content_type = rng.choice(["multipart/form-data", "multipart/form-data; boundary="])
    elif roll < 0.15:
        content_type = rng.choice(["application/json", "text/plain", "", "multipart/mixed"])
    elif roll < 0.18:
        content_type = "multipart/form-data; boundary=other"
    return {"method": "POST", "url": "/v1/files", "content": body, "headers": ctype(content_type)}


# --------------------------------------------------------- routes without a body


def getter(method: str, template: str, prefix: str = "", field: str = "") -> Callable:
    """Requests to ``template`` with an id (from ``pool.<field>``) and a query string."""

    def make(rng: random.Random, pool: SimpleNamespace) -> dict[str, Any]:
        path = template
        if "{" in template:
            name = template[template.index("{") : template.index("}") + 1]
            path = template.replace(name, an_id(rng, getattr(pool, field), prefix))
        request: dict[str, Any] = {"method": method, "url": path, "params": query(rng)}
        if method == "POST" and rng.random() < 0.3:
            request.update(content=dumps(junk(rng)).encode(), headers=ctype("application/json"))
        return request

    return make


EVAL_ROUTES: dict[tuple[str, str], tuple[Callable, int]] = {
    ("POST", "/v1/evals"): (eval_create, 1),
    ("GET", "/v1/evals"): (getter("GET", "/v1/evals"), 0),
    ("GET", "/v1/evals/{eval_id}"): (eval_getter("GET"), 0),
    ("POST", "/v1/evals/{eval_id}"): (eval_update, 0),
    ("DELETE", "/v1/evals/{eval_id}"): (eval_getter("DELETE"), 0),
    ("POST", "/v1/evals/{eval_id}/runs"): (run_create, 1),
    **{
        (method, f"/v1/evals/{{eval_id}}/runs{tail}"): (eval_getter(method, f"/runs{tail}"), 0)
        for method, tail in (
            ("GET", ""),
            ("GET", "/{run_id}"),
            ("POST", "/{run_id}/cancel"),
            ("DELETE", "/{run_id}"),
            ("GET", "/{run_id}/output_items"),
            ("GET", "/{run_id}/output_items/{output_item_id}"),
        )
    },
}
"""The evals routes' generators (``GENERATORS`` takes them in)."""


GENERATORS: dict[tuple[str, str], tuple[Callable, int]] = {
    ("GET", "/health"): (getter("GET", "/health"), 1),
    ("GET", "/v1/models"): (getter("GET", "/v1/models"), 1),
    ("GET", "/v1/models/{model:path}"): (getter("GET", "/v1/models/{model}", "", "models"), 1),
    ("POST", "/v1/completions"): (completions, 2),
    ("POST", "/v1/chat/completions"): (chat_completions, 2),
    ("POST", "/v1/evaluations"): (evaluations, 1),
    ("POST", "/v1/classifications"): (classifications, 1),
    ("POST", "/v1/files"): (upload, 3),
    ("GET", "/v1/files"): (getter("GET", "/v1/files"), 1),
    ("GET", "/v1/files/{file_id}"): (getter("GET", "/v1/files/{file_id}", "file-", "file_ids"), 1),
    ("GET", "/v1/files/{file_id}/content"): (
        getter("GET", "/v1/files/{file_id}/content", "file-", "file_ids"),
        1,
    ),
    ("DELETE", "/v1/files/{file_id}"): (
        getter("DELETE", "/v1/files/{file_id}", "file-", "file_ids"),
        1,
    ),
    ("POST", "/v1/fine_tuning/jobs"): (create_job, 4),
    ("GET", "/v1/fine_tuning/jobs"): (getter("GET", "/v1/fine_tuning/jobs"), 1),
    **{
        (method, f"/v1/fine_tuning/jobs/{{job_id}}{tail}"): (
            getter(method, f"/v1/fine_tuning/jobs/{{job_id}}{tail}", "ftjob-", "job_ids"),
            1,
        )
        for method, tail in (
            ("GET", ""),
            ("POST", "/cancel"),
            ("POST", "/pause"),
            ("POST", "/resume"),
            ("GET", "/events"),
            ("GET", "/checkpoints"),
        )
    },
    ("POST", "/v1/fine_tuning/alpha/graders/run"): (grader_run, 1),
    ("POST", "/v1/fine_tuning/alpha/graders/validate"): (grader_validate, 1),
    **EVAL_ROUTES,
    # FastAPI's own pages: no key needed is fine, a 5xx is not.
    ("GET", "/openapi.json"): (getter("GET", "/openapi.json"), 0),
    ("GET", "/docs"): (getter("GET", "/docs"), 0),
    ("GET", "/docs/oauth2-redirect"): (getter("GET", "/docs/oauth2-redirect"), 0),
    ("GET", "/redoc"): (getter("GET", "/redoc"), 0),
}
"""Each route's request generator and its weight (rounds of ``ROUNDS`` requests; 0: 20)."""


def app_routes(app: Any) -> set[tuple[str, str]]:
    """``(method, path)`` of every route of ``app`` (HEAD, which Starlette adds, left out)."""
    found = set()
    for route in app.routes:
        # FastAPI keeps an included router as one entry, which lists its routes itself
        # (and a router included in it as one of those).
        listed = getattr(route, "effective_candidates", None)
        for entry in listed() if listed else [route]:
            if getattr(entry, "effective_candidates", None):
                found |= app_routes(SimpleNamespace(routes=[entry]))
                continue
            found |= {(m, entry.path) for m in getattr(entry, "methods", None) or () if m != "HEAD"}
    return found


def generated(pool: SimpleNamespace) -> list[dict[str, Any]]:
    """The whole fuzz, in a seeded order: the same requests on every run."""
    rng = random.Random(SEED)
    requests = []
    for route, (make, weight) in GENERATORS.items():
        for _ in range(ROUNDS * weight or 20):
            request = make(rng, pool)
            request["route"] = route
            key = rng.random()
            request["key"] = "right" if key < 0.9 else ("none" if key < 0.95 else "wrong")
            requests.append(request)
    rng.shuffle(requests)
    return requests


def send(client: httpx.Client, request: dict[str, Any]) -> tuple[dict[str, Any], httpx.Response]:
    auth = {"right": AUTH, "none": {}, "wrong": {"Authorization": "Bearer nope"}}[request["key"]]
    fields = {k: v for k, v in request.items() if k in ("content", "params")}
    headers = {**request.get("headers", {}), **auth}
    try:
        return request, client.request(request["method"], request["url"], headers=headers, **fields)
    except httpx.TransportError as err:  # the server dropped the connection: a crash
        return request, httpx.Response(599, text=f"no answer: {err!r}")


def problem(request: dict[str, Any], response: httpx.Response) -> str | None:
    """What is wrong with ``response`` to ``request``, or ``None``."""
    status = response.status_code
    if status >= 500:
        return f"{status} {response.text[:300]}"
    on_api = request["route"][1].startswith("/v1/")
    # Refused unread (413 too large, 415 not JSON) before its key is looked at is fine too.
    if request["key"] != "right" and on_api and status not in (401, 413, 415):
        return f"{status} without a valid key"
    if 400 <= status < 500:
        try:
            error = response.json()["error"]
        except (ValueError, KeyError, TypeError):
            return f"{status} not in the error shape: {response.text[:300]}"
        if set(error) != {"message", "type", "code", "param"}:
            return f"{status} error keys {sorted(error)}"
        if not (isinstance(error["message"], str) and error["message"]):
            return f"{status} without a message"
        if not isinstance(error["type"], str):
            return f"{status} without a type"
    return None


def _an_eval(http: httpx.Client) -> tuple[str, str, str]:
    """An eval with one completed jsonl run: its id, the run's and an output item's."""
    criterion = {
        "type": "string_check",
        "name": "exact",
        "input": "{{ sample.output_text }}",
        "reference": "{{ item.answer }}",
        "operation": "eq",
    }
    config = {"type": "custom", "item_schema": {"type": "object"}}
    made = http.post(
        "/v1/evals", json={"data_source_config": config, "testing_criteria": [criterion]}
    )
    assert made.status_code == 200, made.text
    eval_id = made.json()["id"]
    row = {"item": {"answer": "a"}, "sample": {"output_text": "a"}}
    source = {"type": "jsonl", "source": {"type": "file_content", "content": [row]}}
    run = http.post(f"/v1/evals/{eval_id}/runs", json={"data_source": source})
    assert run.status_code == 200, run.text
    run_id = run.json()["id"]
    for _ in range(100):
        items = http.get(f"/v1/evals/{eval_id}/runs/{run_id}/output_items").json()["data"]
        if items:
            return eval_id, run_id, items[0]["id"]
        time.sleep(0.1)
    raise AssertionError(f"run {run_id} wrote no output item")


def test_every_route_body_query_and_id_gets_no_5xx(api):
    import ray

    assert app_routes(api.app) == set(GENERATORS), (
        "a route without a fuzz generator (add it to GENERATORS), or a generator of no route: "
        f"{sorted(app_routes(api.app) ^ set(GENERATORS))}"
    )
    with httpx.Client(base_url=api.url, timeout=60, headers=AUTH) as http:
        file_ids = []
        for _ in range(2):
            files = {"file": ("chats.jsonl", ROWS, "application/octet-stream")}
            answer = http.post("/v1/files", files=files, data={"purpose": "fine-tune"})
            assert answer.status_code == 200, answer.text
            file_ids.append(answer.json()["id"])
        job = http.post(
            "/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": file_ids[0]}
        )
        assert job.status_code == 200, job.text
        assert job.json()["error"]["code"] == "runner_not_started"  # no Ray here: never started
        evals = [_an_eval(http) for _ in range(2)]
    pool = SimpleNamespace(
        file_ids=file_ids,
        job_ids=[job.json()["id"]],
        models=["tiny-llama"],
        eval_ids=[e[0] for e in evals],
        run_ids=[e[1] for e in evals],
        item_ids=[e[2] for e in evals],
    )
    requests = generated(pool)
    assert len(requests) >= 2000
    limits = httpx.Limits(max_connections=4, max_keepalive_connections=4)
    failures: list[str] = []
    seen: Counter = Counter()
    by_route: Counter = Counter()
    with (
        httpx.Client(base_url=api.url, timeout=60, limits=limits) as http,
        ThreadPoolExecutor(4) as pool_of_threads,
    ):
        for request, response in pool_of_threads.map(lambda r: send(http, r), requests):
            seen[response.status_code // 100] += 1
            by_route[request["route"][1], response.status_code] += 1
            wrong = problem(request, response)
            if wrong:
                body = request.get("content", b"")[:200]
                failures.append(f"{request['method']} {request['url'][:200]} {body!r}: {wrong}")
    print(f"fuzzed {len(requests)} requests: {dict(seen)}; {sorted(by_route.items())}")
    assert not failures, f"{len(failures)} bad answers:\n" + "\n".join(failures[:30])
    assert seen[2] and seen[4]  # both accepted and refused requests were made
    assert not ray.is_initialized()  # no request started Ray in this process
    with httpx.Client(base_url=api.url, timeout=60, headers=AUTH) as http:
        jobs = http.get("/v1/fine_tuning/jobs", params={"limit": "10000"}).json()["data"]
        assert jobs and {j["status"] for j in jobs} == {"failed"}
        assert {j["error"]["code"] for j in jobs} == {"runner_not_started"}
        state = wait_drained(api.url, headers=AUTH)
        assert (state["open_routes"], state["queued_rows"], state["running_rows"]) == (0, 0, 0)
        ok = http.post(
            "/v1/completions", json={"model": "tiny-llama", "prompt": "hi", "max_tokens": 2}
        )
        assert ok.status_code == 200 and ok.json()["choices"][0]["text"] is not None, ok.text
