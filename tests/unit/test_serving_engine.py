"""The serving engine and HTTP layer on tiny-llama, without Ray.

Adapters are made directly with PEFT (random LoRA B weights, fixed seeds) so each one
changes the model's output; every comparison is against plain transformers/PEFT.
"""

from __future__ import annotations

import asyncio
import json
import math
import shutil
from pathlib import Path

import httpx
import pytest
import torch
from harness import copy_registry, make_peft_adapter

from rayft.serving.engine import (
    BASE_ADAPTER,
    GenerationRequest,
    ModelEngine,
    SamplingParams,
    _find_stop,
    _held_back,
)
from rayft.serving.errors import BadRequest, Conflict, NotFound

PROMPTS = [
    "hello world",
    "the quick brown fox jumps",
    "paris is the capital of",
    "one two three four",
]


@pytest.fixture(scope="module")
def home(published_adapters, tmp_path_factory) -> Path:
    # A copy: tests here republish and corrupt adapters.
    return copy_registry(published_adapters, tmp_path_factory.mktemp("rayft-serving") / "root")


@pytest.fixture(scope="module")
def engine(home) -> ModelEngine:
    return ModelEngine("tiny-llama", storage=str(home), max_loaded_adapters=2, dtype="float32")


def greedy(max_tokens: int = 10, stop: tuple[str, ...] = ()) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, stop=stop)


def reference_greedy(
    engine: ModelEngine, home: Path, prompt_ids, adapter: str, n: int
) -> list[int]:
    """Greedy tokens from plain transformers generate (+ PEFT for adapters)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(engine.model_dir, dtype=torch.float32).eval()
    if adapter != BASE_ADAPTER:
        model = PeftModel.from_pretrained(model, str(home / "adapters" / adapter)).eval()
    ids = torch.tensor([list(prompt_ids)])
    out = model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False
    )
    generated = out[0, ids.shape[1] :].tolist()
    # generate keeps the end-of-turn token; the engine stops on it too.
    return generated


def assert_full_greedy(engine: ModelEngine, got: list[int], expected: list[int], n: int) -> None:
    """The engine's greedy tokens are the reference's in full: ``n`` of them, fewer only when
    the last is an end-of-turn token (both keep it)."""
    assert got == expected
    assert len(got) == n or (0 < len(got) < n and got[-1] in engine.stop_ids), got


def request(
    engine: ModelEngine, prompt: str, adapter: str, params: SamplingParams
) -> GenerationRequest:
    return GenerationRequest(tuple(engine.tokenizer(prompt)["input_ids"]), adapter, params)


def test_greedy_matches_plain_transformers_and_peft(engine, home):
    for adapter in (BASE_ADAPTER, "a1", "a2"):
        req = request(engine, PROMPTS[1], adapter, greedy(12))
        got = engine.generate([req])[0]
        expected = reference_greedy(engine, home, req.prompt_ids, adapter, 12)
        assert_full_greedy(engine, got.token_ids, expected, 12)
        assert got.completion_tokens == len(got.token_ids)


def test_adapters_change_the_output(engine):
    outs = engine.generate(
        [request(engine, PROMPTS[0], a, greedy(10)) for a in (BASE_ADAPTER, "a1", "a2")]
    )
    assert len({tuple(o.token_ids) for o in outs}) == 3


def test_mixed_adapter_batch_equals_rows_alone(engine):
    requests = [
        request(engine, p, a, greedy(10)) for p in PROMPTS for a in (BASE_ADAPTER, "a1", "a2")
    ]
    alone = [engine.generate([r])[0].token_ids for r in requests]
    together = [c.token_ids for c in engine.generate(requests)]
    assert together == alone


def test_rows_joining_a_running_batch_decode_as_alone(engine):
    requests = [
        request(engine, p, a, greedy(8))
        for p, a in zip(PROMPTS, ["a1", BASE_ADAPTER, "a2", "a1"], strict=True)
    ]
    alone = [engine.generate([r])[0].token_ids for r in requests]
    tokens: dict[int, list[int]] = {}

    def step() -> None:
        for out in engine.step():
            tokens.setdefault(out.request_id, []).append(out.token)

    ids = [engine.submit(requests[0])]
    step()
    ids.append(engine.submit(requests[1]))
    step()
    step()
    ids += [engine.submit(requests[2]), engine.submit(requests[3])]
    while engine.has_work():
        step()
    assert [tokens[i] for i in ids] == alone


def test_lru_bound_never_exceeded_and_least_recent_goes_first(home):
    eng = ModelEngine("tiny-llama", storage=str(home), max_loaded_adapters=2, dtype="float32")
    for adapter in ("a1", "a2", "a3", "a1"):
        assert eng.generate([request(eng, "hello", adapter, greedy(3))])[0].completion_tokens >= 1
        assert len(eng.loaded_adapters()) <= 2
    assert eng.loaded_adapters() == ["a3", "a1"]  # a2 was least recently used
    assert eng.peak_loaded == 2
    # Three adapters in one batch with room for two: the third waits, all finish.
    outs = eng.generate([request(eng, "hello", a, greedy(3)) for a in ("a1", "a2", "a3")])
    assert all(o.completion_tokens >= 1 for o in outs)
    assert eng.peak_loaded == 2


def test_seeded_sampling_is_reproducible_and_batch_independent(engine):
    params = SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9, seed=7)
    row = request(engine, "hello", "a1", params)
    alone = engine.generate([row])[0].token_ids
    batched = engine.generate([row, request(engine, "paris", "a2", greedy(5))])[0].token_ids
    other_seed = engine.generate([request(engine, "hello", "a1", SamplingParams(10, 0.9, 0.9, 8))])[
        0
    ]
    assert alone == batched
    assert other_seed.token_ids != alone


def test_rows_with_one_prompt_share_its_prefill_and_sample_apart(engine):
    # A group of samples of one prompt (GRPO's, or n > 1): one prompt pass per distinct
    # (prompt, adapter); every row still draws from its own seed, as it would alone.
    rows = [
        request(engine, p, "a1", SamplingParams(max_tokens=8, temperature=0.9, seed=seed))
        for p in PROMPTS[:2]
        for seed in (1, 2, 3)
    ]
    alone = [engine.generate([r])[0].token_ids for r in rows]
    widths: list[tuple[int, int]] = []
    embed = engine.base.get_input_embeddings()
    hook = embed.register_forward_hook(lambda _m, args, _out: widths.append(tuple(args[0].shape)))
    try:
        together = [c.token_ids for c in engine.generate(rows)]
    finally:
        hook.remove()
    assert together == alone
    assert len({tuple(t) for t in together}) > 2  # the seeds drew different answers
    prefill, *decode = widths
    assert prefill[0] == 2 and prefill[1] > 1  # two distinct prompts computed once each
    assert decode and all(w == (6, 1) for w in decode[:1])


def test_stop_string_truncates_and_reports_stop(engine):
    full = engine.generate([request(engine, PROMPTS[2], "a1", greedy(16))])[0]
    stop = full.text[4:6]
    cut = engine.generate([request(engine, PROMPTS[2], "a1", greedy(16, stop=(stop,)))])[0]
    assert cut.text == full.text[: full.text.index(stop)]
    assert cut.finish_reason == "stop"


def test_stop_helpers():
    assert _find_stop("abcSTOPdef", ("STOP",), 0) == 3
    assert _find_stop("abcSTOPdef", ("STOP",), 5) is None  # already sent
    assert _held_back("hello ST", ("STOP",)) == 2
    assert _held_back("hello", ("STOP",)) == 0
    assert _held_back("ab\ufffd", ()) == 1


def test_adapter_errors(engine):
    with pytest.raises(BadRequest):
        engine.check_adapter("../a1")
    with pytest.raises(BadRequest):
        engine.check_adapter("/etc/passwd")
    with pytest.raises(NotFound):
        engine.check_adapter("missing")
    with pytest.raises(Conflict):
        engine.check_adapter("other-base")
    [failed] = [o for o in _run_one(engine, "other-base")]
    assert failed.finish_reason == "error" and isinstance(failed.error, Conflict)


def _run_one(engine: ModelEngine, adapter: str):
    rid = engine.submit(request(engine, "hello", adapter, greedy(2)))
    outs = []
    while engine.has_work():
        outs += [o for o in engine.step() if o.request_id == rid]
    return outs


def test_republished_adapter_is_reloaded_without_restart(engine, home):
    make_peft_adapter(home, "fresh", 11)
    before = engine.generate([request(engine, "hello", "fresh", greedy(8))])[0].token_ids
    shutil.rmtree(home / "adapters" / "fresh")
    make_peft_adapter(home, "fresh", 12)
    after = engine.generate([request(engine, "hello", "fresh", greedy(8))])[0].token_ids
    expected = reference_greedy(
        engine, home, tuple(engine.tokenizer("hello")["input_ids"]), "fresh", 8
    )
    assert_full_greedy(engine, after, expected, 8)
    assert after != before


def test_a_one_slot_engine_reloads_its_only_adapter_when_republished(home):
    # With one adapter held, the new weights load under a staging name before the old go.
    one = ModelEngine("tiny-llama", storage=str(home), max_loaded_adapters=1, dtype="float32")
    make_peft_adapter(home, "solo", 13)
    before = one.generate([request(one, "hello", "solo", greedy(8))])[0].token_ids
    shutil.rmtree(home / "adapters" / "solo")
    make_peft_adapter(home, "solo", 14)
    after = one.generate([request(one, "hello", "solo", greedy(8))])[0].token_ids
    expected = reference_greedy(one, home, tuple(one.tokenizer("hello")["input_ids"]), "solo", 8)
    assert_full_greedy(one, after, expected, 8)
    assert after != before and one.loaded_adapters() == ["solo"]


def test_score_matches_plain_teacher_forced_loss(engine, home):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from rayft.trainers.formats import tokenize_example

    rows = [
        {
            "messages": [
                {"role": "user", "content": "capital of france"},
                {"role": "assistant", "content": "paris"},
            ]
        },
        {"prompt": "one two", "completion": " three four five"},
    ]
    examples = [
        tokenize_example(r, f, engine.tokenizer, 128)
        for r, f in zip(rows, ["chat", "prompt_completion"], strict=True)
    ]
    total, count = engine.score([(e["input_ids"], e["labels"]) for e in examples], "a2")
    model = AutoModelForCausalLM.from_pretrained(engine.model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, str(home / "adapters" / "a2")).eval()
    ref_sum, ref_count = 0.0, 0
    with torch.no_grad():
        for e in examples:
            ids, labels = torch.tensor([e["input_ids"]]), torch.tensor([e["labels"]])
            n = int((labels[:, 1:] != -100).sum())
            ref_sum += float(model(input_ids=ids, labels=labels).loss) * n
            ref_count += n
    assert count == ref_count
    assert total / count == pytest.approx(ref_sum / ref_count, rel=1e-4)


@pytest.mark.parametrize(
    ("row", "fmt"),
    [
        ({"instruction": "add", "input": "2 and 3", "output": "5"}, "alpaca"),
        ({"instruction": "say hi", "output": "hi"}, "alpaca"),
        ({"prompt": "one two", "completion": " three"}, "prompt_completion"),
    ],
)
def test_evaluation_prompt_is_the_prompt_training_labels_after(engine, row, fmt):
    import copy

    from rayft.serving.evaluation import prompt_and_reference
    from rayft.trainers.formats import IGNORE_INDEX, tokenize_example

    plain = copy.deepcopy(engine.tokenizer)
    plain.chat_template = None  # the template-free path, where the prompt is rayft's own
    prompt, reference = prompt_and_reference(row, fmt, plain)
    example = tokenize_example(row, fmt, plain, 512)
    masked = [
        t
        for t, label in zip(example["input_ids"], example["labels"], strict=True)
        if label == IGNORE_INDEX
    ]
    assert prompt == masked == example["input_ids"][: len(prompt)]
    assert reference == row.get("output", row.get("completion"))
    if fmt == "alpaca":
        text = plain.decode(prompt)
        assert "### Instruction:\nadd" in text or "### Instruction:\nsay hi" in text
        assert ("### Input:\n2 and 3" in text) == bool(row.get("input"))


# ------------------------------------------------------------------ HTTP, in process


@pytest.fixture(scope="module")
def api(engine):
    from rayft.serving.openai_api import create_api
    from rayft.serving.service import Limits, ModelService

    service = ModelService(
        engine, Limits(max_tokens_limit=64, max_prompt_tokens=32), api_key="sekret"
    )
    yield create_api(service)
    service.close()


def call(api, method: str, path: str, **kwargs) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=api)
        async with httpx.AsyncClient(transport=transport, base_url="http://rayft") as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(go())


AUTH = {"Authorization": "Bearer sekret"}


def test_api_key_guards_every_route_but_health(api):
    assert call(api, "GET", "/health").status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"}):
        response = call(api, "GET", "/v1/models", headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["type"] == "authentication_error"
    assert call(api, "GET", "/v1/models", headers=AUTH).status_code == 200


def test_completion_usage_counts_tokens(api, engine):
    body = {"model": "a1", "prompt": "hello world", "max_tokens": 5, "temperature": 0, "n": 2}
    response = call(api, "POST", "/v1/completions", json=body, headers=AUTH)
    assert response.status_code == 200
    data = response.json()
    prompt_tokens = len(engine.tokenizer("hello world")["input_ids"])
    assert data["usage"]["prompt_tokens"] == prompt_tokens
    assert data["usage"]["completion_tokens"] == 10
    assert [c["index"] for c in data["choices"]] == [0, 1]
    assert data["choices"][0]["text"] == data["choices"][1]["text"]  # greedy


@pytest.mark.parametrize(
    ("path", "body", "status", "code"),
    [
        ("/v1/completions", b"{not json", 400, "invalid_json"),
        ("/v1/completions", {"model": "tiny-llama", "prompt": 5}, 422, "invalid_parameters"),
        (
            "/v1/completions",
            {"model": "tiny-llama", "prompt": "a", "max_tokens": "5"},
            422,
            "invalid_parameters",
        ),
        ("/v1/completions", {"model": "nope", "prompt": "a"}, 404, "model_not_found"),
        (
            "/v1/completions",
            {"model": "tiny-llama", "prompt": "a", "max_tokens": 65},
            400,
            "max_tokens_exceeded",
        ),
        (
            "/v1/completions",
            {"model": "tiny-llama", "prompt": "hello " * 40},
            400,
            "context_length_exceeded",
        ),
        ("/v1/completions", {"model": "../a1", "prompt": "a"}, 400, "invalid_model"),
        ("/v1/completions", {"model": "other-base", "prompt": "a"}, 409, "base_model_mismatch"),
        ("/v1/chat/completions", {"model": "a1", "messages": []}, 400, "empty_messages"),
        ("/v1/evaluations", {"model": "a1", "rows": [{"x": 1}]}, 400, "invalid_row"),
        (
            "/v1/evaluations",
            {"model": "a1", "rows": [{"text": "a b"}], "metrics": ["meteor"]},
            400,
            "invalid_metric",
        ),
    ],
)
def test_bad_input_gets_openai_error(api, path, body, status, code):
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    response = call(api, "POST", path, headers=AUTH, **kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"] and error["type"]


def test_evaluation_perplexity_is_exp_loss(api):
    rows = [{"prompt": "one two", "completion": " three four"}] * 2
    body = {
        "model": "a1",
        "rows": rows,
        "metrics": ["loss", "perplexity", "exact_match", "bleu"],
        "max_tokens": 4,
    }
    data = call(api, "POST", "/v1/evaluations", json=body, headers=AUTH).json()
    assert data["rows"] == 2 and data["tokens"] > 0
    assert data["metrics"]["perplexity"] == pytest.approx(math.exp(data["metrics"]["loss"]))
    assert 0.0 <= data["metrics"]["bleu"] <= 1.0


def test_full_queue_is_429(engine):
    from rayft.serving.openai_api import create_api
    from rayft.serving.service import ModelService

    service = ModelService(engine)
    service.loop.max_queued_rows = 2
    app = create_api(service)
    body = {"model": "a1", "prompt": "hi", "max_tokens": 2, "n": 3}
    for stream in (False, True):
        response = call(app, "POST", "/v1/completions", json={**body, "stream": stream})
        assert response.status_code == 429
        assert response.json()["error"]["type"] == "rate_limit_error"
    assert call(app, "POST", "/v1/completions", json={**body, "n": 2}).status_code == 200
    service.close()


# ------------------------------------------------------- bad input is a 4xx


@pytest.fixture(scope="module")
def open_api(engine):
    """The API with default limits and no key (prompts may fill the context window)."""
    from rayft.serving.openai_api import create_api
    from rayft.serving.service import ModelService

    service = ModelService(engine, api_key="")
    yield create_api(service)
    service.close()


def test_any_64_bit_seed_is_served_and_beyond_is_422(open_api):
    body = {"model": "tiny-llama", "prompt": "hi", "max_tokens": 3, "n": 2}
    for seed in (2**64 - 1, -(2**63), 0):
        response = call(open_api, "POST", "/v1/completions", json={**body, "seed": seed})
        assert response.status_code == 200, response.text
    again = call(open_api, "POST", "/v1/completions", json={**body, "seed": 2**64 - 1})
    first = call(open_api, "POST", "/v1/completions", json={**body, "seed": 2**64 - 1})
    assert [c["text"] for c in again.json()["choices"]] == [
        c["text"] for c in first.json()["choices"]
    ]
    for seed in (2**64, -(2**63) - 1, 10**30):
        response = call(open_api, "POST", "/v1/completions", json={**body, "seed": seed})
        assert response.status_code == 422, response.text
        assert response.json()["error"]["param"] == "seed"


def test_chunked_body_over_the_limit_is_413(engine):
    from rayft.serving.openai_api import create_api
    from rayft.serving.service import Limits, ModelService

    service = ModelService(engine, Limits(max_request_bytes=1000), api_key="")
    app = create_api(service)
    padding = "x" * 400

    async def chunks(count: int):
        yield b'{"model": "tiny-llama", "prompt": "hi", "max_tokens": 2, "user": "'
        for _ in range(count):
            yield padding.encode()
        yield b'"}'

    headers = {"content-type": "application/json"}
    big = call(app, "POST", "/v1/completions", content=chunks(4), headers=headers)
    assert big.status_code == 413, big.text
    assert big.json()["error"]["type"] == "invalid_request_error"
    small = call(app, "POST", "/v1/completions", content=chunks(1), headers=headers)
    assert small.status_code == 200, small.text
    declared = call(app, "POST", "/v1/completions", content=b"{" + b" " * 2000 + b"}")
    assert declared.status_code == 413
    service.close()


@pytest.mark.parametrize(
    "value",
    [
        "Bearer s\u00e9kret".encode(),
        "Bearer \u00e9".encode("latin-1"),
        b"Bearer \xff\xfe",
        b"Bearer",
        b"Bearer ",
        b"sekret",
        b"Basic c2Vrcg==",
        b"Bearer sekret sekret",
    ],
)
def test_malformed_or_non_ascii_bearer_tokens_are_401(api, value):
    response = call(api, "GET", "/v1/models", headers={"Authorization": value})
    assert response.status_code == 401, response.text
    assert response.json()["error"]["code"] == "invalid_api_key"


def test_a_prompt_that_fills_the_context_is_400_naming_the_window(open_api, engine):
    window = engine.context_window
    body = {"model": "tiny-llama", "prompt": [5] * window}
    response = call(open_api, "POST", "/v1/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded" and str(window) in error["message"]
    fits = call(open_api, "POST", "/v1/completions", json={**body, "prompt": [5] * (window - 2)})
    assert fits.status_code == 200, fits.text
    assert fits.json()["usage"]["completion_tokens"] <= 2


def test_evaluation_max_seq_len_beyond_the_window_is_400(open_api, engine):
    rows = [{"prompt": "one two", "completion": " three"}]
    body = {"model": "tiny-llama", "rows": rows, "max_seq_len": engine.context_window + 1}
    response = call(open_api, "POST", "/v1/evaluations", json=body)
    assert response.status_code == 400, response.text
    assert str(engine.context_window) in response.json()["error"]["message"]
    body["max_seq_len"] = engine.context_window
    assert call(open_api, "POST", "/v1/evaluations", json=body).status_code == 200


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", {"model": "tiny-llama", "prompt": "a", "stop": "x" * 257}, "stop"),
        (
            "/v1/chat/completions",
            {
                "model": "tiny-llama",
                "messages": [{"role": "user", "content": "a"}],
                "stop": ["y" * 300],
            },
            "stop",
        ),
        ("/v1/completions", {"model": "tiny-llama", "prompt": "a", "stop": ["a"] * 5}, "stop"),
        ("/v1/completions", {"model": "a1\x00", "prompt": "a"}, "model"),
        ("/v1/completions", {"model": "a\n1", "prompt": "a"}, "model"),
        ("/v1/completions", {"model": "\x1b[31m", "prompt": "a"}, "model"),
        ("/v1/completions", {"model": "a" * 5000, "prompt": "a"}, "model"),
        ("/v1/evaluations", {"model": "a1", "dataset": "rows\x00.jsonl"}, "dataset"),
    ],
)
def test_stops_over_the_bound_and_names_with_control_characters_are_400(
    open_api, path, body, param
):
    response = call(open_api, "POST", path, json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_model_route_refuses_control_characters(open_api):
    response = call(open_api, "GET", "/v1/models/a%001")
    assert response.status_code == 400, response.text


def test_corrupt_manifest_hides_that_adapter_only(home, engine):
    from rayft.serving.openai_api import create_api
    from rayft.serving.service import ModelService

    service = ModelService(engine, api_key="")
    app = create_api(service)
    for name, damage in (("torn", b'{"kind": "adap'), ("garbage", b"\xff\x00not json")):
        make_peft_adapter(home, name, 7)
        (home / "adapters" / name / "rayft.json").write_bytes(damage)
    try:
        listed = [m["id"] for m in call(app, "GET", "/v1/models").json()["data"]]
        assert "torn" not in listed and "garbage" not in listed and "a1" in listed
        for name in ("torn", "garbage"):
            body = {"model": name, "prompt": "hi", "max_tokens": 2}
            response = call(app, "POST", "/v1/completions", json=body)
            assert response.status_code in (404, 422), response.text
            assert "rayft.json" in response.json()["error"]["message"]
            assert call(app, "GET", f"/v1/models/{name}").status_code in (404, 422)
        ok = call(
            app, "POST", "/v1/completions", json={"model": "a1", "prompt": "hi", "max_tokens": 2}
        )
        assert ok.status_code == 200, ok.text
    finally:
        for name in ("torn", "garbage"):
            shutil.rmtree(home / "adapters" / name)
        service.close()


def test_overload_answers_carry_retry_after(engine):
    from rayft.serving.openai_api import create_api
    from rayft.serving.service import ModelService

    service = ModelService(engine, api_key="")
    service.loop.max_queued_rows = 1
    response = call(
        create_api(service), "POST", "/v1/completions", json={"model": "a1", "prompt": "hi", "n": 2}
    )
    assert response.status_code == 429 and int(response.headers["retry-after"]) >= 1
    service.close()


# ------------------------------------------------------------ exposure and the key


def test_serving_beyond_loopback_needs_a_key_or_insecure(monkeypatch):
    from rayft.serving.client import InsecureServing, check_exposure, is_loopback

    monkeypatch.delenv("RAYFT_API_KEY", raising=False)
    for host in ("127.0.0.1", "127.3.4.5", "localhost", "::1", "[::1]"):
        assert is_loopback(host)
        check_exposure(host)
    for host in ("0.0.0.0", "::", "10.1.2.3", "example.org"):
        assert not is_loopback(host)
        with pytest.raises(InsecureServing, match="RAYFT_API_KEY"):
            check_exposure(host)
        check_exposure(host, insecure=True)
    monkeypatch.setenv("RAYFT_API_KEY", "k")
    check_exposure("0.0.0.0")


def test_cli_refuses_an_open_interface_without_a_key(monkeypatch, capsys):
    from rayft.cluster.cli import main

    monkeypatch.delenv("RAYFT_API_KEY", raising=False)
    assert main(["serve", "--host", "0.0.0.0", "model=tiny-llama"]) == 2
    assert "--insecure" in capsys.readouterr().err


def test_the_key_reaches_replicas_as_a_digest_only(monkeypatch, engine):
    import hashlib

    from rayft.serving.app import build_app
    from rayft.serving.service import ModelService

    monkeypatch.setenv("RAYFT_API_KEY", "plain-secret")
    deployment = build_app({"model": "tiny-llama"})._bound_deployment
    options = json.dumps(deployment.ray_actor_options)
    assert "plain-secret" not in options and "RAYFT_API_KEY" not in options
    assert "plain-secret" not in json.dumps(deployment.init_args)
    digest = deployment.init_args[1]
    assert digest == hashlib.sha256(b"plain-secret").hexdigest()
    assert deployment.max_queued_requests == 256 and deployment.max_ongoing_requests == 64
    assert deployment.backpressure_config.status_code == 429

    service = ModelService(engine, api_key_sha256=digest)
    assert service.authorized(b"plain-secret") and not service.authorized(b"plain-secreT")
    service.close()


def test_a_project_key_store_counts_as_keys_required(monkeypatch, tmp_path):
    from rayft.serving.auth import KeyStore
    from rayft.serving.client import InsecureServing, check_exposure

    monkeypatch.delenv("RAYFT_API_KEY", raising=False)
    monkeypatch.setenv("RAYFT_HOME", str(tmp_path / "home"))
    root = tmp_path / "root"
    with pytest.raises(InsecureServing, match="RAYFT_API_KEY"):
        check_exposure("0.0.0.0", storage=str(root))  # no store yet
    KeyStore(str(root)).create("alpha", "member")
    check_exposure("0.0.0.0", storage=str(root))
    with pytest.raises(InsecureServing):
        check_exposure("0.0.0.0")  # $RAYFT_HOME's store is empty
    KeyStore(str(tmp_path / "home")).create("beta", "member")
    check_exposure("10.1.2.3")
