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


def make_adapter(home: Path, name: str, seed: int, base: str = "tiny-llama") -> Path:
    """Publish a LoRA adapter for tiny-llama whose B matrices are random (so it matters)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from rayft.trainers.models import resolve_model

    model = AutoModelForCausalLM.from_pretrained(resolve_model("tiny-llama", home / "models"))
    peft_model = get_peft_model(
        model, LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM")
    )
    generator = torch.Generator().manual_seed(seed)
    for param_name, param in peft_model.named_parameters():
        if "lora_B" in param_name:
            param.data = torch.randn(param.shape, generator=generator) * 0.5
    out = home / "adapters" / name
    peft_model.save_pretrained(out)
    (out / "rayft.json").write_text(json.dumps({"kind": "adapter", "base_model": base}))
    return out


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("rayft-serving")
    for name, seed in (("a1", 1), ("a2", 2), ("a3", 3)):
        make_adapter(root, name, seed)
    make_adapter(root, "other-base", 4, base="smollm2-135m-instruct")
    return root


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


def request(
    engine: ModelEngine, prompt: str, adapter: str, params: SamplingParams
) -> GenerationRequest:
    return GenerationRequest(tuple(engine.tokenizer(prompt)["input_ids"]), adapter, params)


def test_greedy_matches_plain_transformers_and_peft(engine, home):
    for adapter in (BASE_ADAPTER, "a1", "a2"):
        req = request(engine, PROMPTS[1], adapter, greedy(12))
        got = engine.generate([req])[0]
        expected = reference_greedy(engine, home, req.prompt_ids, adapter, 12)
        assert got.token_ids == expected[: len(got.token_ids)]
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
    make_adapter(home, "fresh", 11)
    before = engine.generate([request(engine, "hello", "fresh", greedy(8))])[0].token_ids
    shutil.rmtree(home / "adapters" / "fresh")
    make_adapter(home, "fresh", 12)
    after = engine.generate([request(engine, "hello", "fresh", greedy(8))])[0].token_ids
    expected = reference_greedy(
        engine, home, tuple(engine.tokenizer("hello")["input_ids"]), "fresh", 8
    )
    assert after == expected[: len(after)]
    assert after != before


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
