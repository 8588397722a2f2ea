"""``echo`` / ``logprobs`` / ``max_tokens: 0`` on ``POST /v1/completions``, over real HTTP.

What lm-evaluation-harness sends (token-id prompts, batched, ``echo`` with ``logprobs``)
is answered with OpenAI's legacy ``logprobs`` object whose numbers equal transformers'
own; every misuse (too many alternatives, streaming, out-of-vocabulary ids, oversized
requests, prompts past the context window) is a 4xx in OpenAI's error shape, and the
server stays healthy and drained.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from serving_http import http_server, wait_drained

pytestmark = pytest.mark.fault

MAX_SCORED = 300
PROMPT = "the quick brown fox jumps over the lazy dog"


@pytest.fixture(scope="module")
def api(rayft_home: Path, tiny_model_dir: Path) -> Iterator[dict[str, Any]]:
    from rayft.serving.engine import ModelEngine
    from rayft.serving.openai_api import create_api
    from rayft.serving.service import Limits, ModelService

    engine = ModelEngine("tiny-llama", storage=str(rayft_home), dtype="float32")
    limits = Limits(max_tokens_limit=16, max_logprob_tokens=MAX_SCORED)
    service = ModelService(engine, limits, api_key="")
    with http_server(create_api(service)) as url:
        yield {"url": url, "engine": engine}
    service.close()


def post(api: dict[str, Any], **body: Any) -> httpx.Response:
    payload = {"model": "tiny-llama", "prompt": PROMPT, **body}
    return httpx.post(f"{api['url']}/v1/completions", json=payload, timeout=120)


def direct_table(engine: Any, ids: list[int]) -> torch.Tensor:
    """transformers' own next-token log-probabilities at every position of ``ids``."""
    with torch.no_grad():
        logits = engine.base(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def test_echo_of_token_id_prompts_scores_every_token_as_transformers(api):
    engine = api["engine"]
    ids = engine.tokenizer(PROMPT)["input_ids"]
    prompts = [ids, ids[:4]]
    response = post(api, prompt=prompts, echo=True, logprobs=3, max_tokens=0)
    assert response.status_code == 200, response.text
    choices = response.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1]
    for prompt, choice in zip(prompts, choices, strict=True):
        lp = choice["logprobs"]
        table = direct_table(engine, prompt)
        assert lp["tokens"] == [engine.tokenizer.decode([t]) for t in prompt]
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        expected = [float(table[t - 1, prompt[t]]) for t in range(1, len(prompt))]
        assert lp["token_logprobs"][1:] == pytest.approx(expected, abs=1e-5)
        for t in range(1, len(prompt)):
            values, best = table[t - 1].topk(3)
            top = lp["top_logprobs"][t]
            assert len(top) <= 4  # the 3 likeliest, plus the actual token
            for token, value in zip(best.tolist(), values.tolist(), strict=True):
                assert top[engine.tokenizer.decode([token])] == pytest.approx(value, abs=1e-5)
        texts = lp["tokens"]
        assert lp["text_offset"] == [sum(len(x) for x in texts[:i]) for i in range(len(texts))]
        assert choice["text"] == engine.tokenizer.decode(prompt)
        assert choice["finish_reason"] == "length"
    usage = response.json()["usage"]
    assert usage == {
        "prompt_tokens": len(ids) + 4,
        "completion_tokens": 0,
        "total_tokens": len(ids) + 4,
    }


def test_echo_with_a_generated_token_reports_it_last(api):
    # What lm-eval's loglikelihood requests send: it drops the last token as the generated one.
    engine = api["engine"]
    ids = engine.tokenizer(PROMPT)["input_ids"]
    body = {"prompt": [ids], "echo": True, "logprobs": 1, "max_tokens": 1, "temperature": 0}
    response = post(api, seed=1234, **body)
    assert response.status_code == 200, response.text
    lp = response.json()["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(ids) + 1
    table = direct_table(engine, ids)
    greedy = int(table[-1].argmax())
    assert lp["tokens"][-1] == engine.tokenizer.decode([greedy])
    assert lp["token_logprobs"][-1] == pytest.approx(float(table[-1, greedy]), abs=1e-5)
    # The greedy token is the likeliest: it is the maximum of its position.
    assert lp["token_logprobs"][-1] == pytest.approx(max(lp["top_logprobs"][-1].values()))


def test_logprobs_without_echo_cover_the_completion_only(api):
    engine = api["engine"]
    response = post(api, logprobs=2, max_tokens=4, temperature=0)
    assert response.status_code == 200, response.text
    lp = response.json()["choices"][0]["logprobs"]
    # transformers' greedy tokens and their log-probabilities, step by step.
    ids = engine.tokenizer(PROMPT)["input_ids"]
    tokens, logprobs = [], []
    for _ in range(4):
        table = direct_table(engine, ids)
        token = int(table[-1].argmax())
        tokens.append(engine.tokenizer.decode([token]))
        logprobs.append(float(table[-1, token]))
        ids = [*ids, token]
        if token in engine.stop_ids:
            break
    assert lp["tokens"] == tokens
    assert lp["token_logprobs"] == pytest.approx(logprobs, abs=1e-5)
    assert lp["text_offset"][0] == len(PROMPT)


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"logprobs": 6, "echo": True, "max_tokens": 0}, 400, "logprobs"),
        ({"logprobs": -1}, 422, "logprobs"),
        ({"logprobs": True}, 422, "logprobs"),
        ({"logprobs": "5"}, 422, "logprobs"),
        ({"echo": True, "stream": True}, 400, "stream"),
        ({"logprobs": 1, "stream": True}, 400, "stream"),
        ({"max_tokens": 0}, 400, "max_tokens"),
        ({"max_tokens": -1, "echo": True}, 422, "max_tokens"),
        ({"echo": "yes"}, 422, "echo"),
        ({"prompt": [[1, 2], [489]], "echo": True, "logprobs": 1, "max_tokens": 0}, 400, "prompt"),
        ({"prompt": [-1, 5], "echo": True, "max_tokens": 0}, 400, "prompt"),
        ({"prompt": [[1, 2], []], "echo": True, "max_tokens": 0}, 400, "prompt"),
        ({"prompt": [[True, 2]], "echo": True, "max_tokens": 0}, 422, "prompt"),
        ({"prompt": [1] * 1025, "echo": True, "max_tokens": 0}, 400, "prompt"),
        ({"prompt": [[5] * 100] * 4, "echo": True, "logprobs": 0, "max_tokens": 0}, 400, "prompt"),
        ({"prompt": [[5] * 10] * 65, "echo": True, "max_tokens": 0}, 400, "prompt"),
        ({"prompt": [[5] * 10] * 30, "logprobs": 0, "max_tokens": 16}, 400, "prompt"),
    ],
)
def test_misuse_is_refused_in_openai_error_shape(api, body, status, param):
    response = post(api, **body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["message"]
    assert error["type"] in ("invalid_request_error", "invalid_parameters")


def test_chat_logprobs_stay_refused_and_the_server_is_drained(api):
    body = {
        "model": "tiny-llama",
        "messages": [{"role": "user", "content": "hi"}],
        "logprobs": True,
    }
    response = httpx.post(f"{api['url']}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "logprobs"
    state = wait_drained(api["url"])
    assert state["queued_rows"] == state["running_rows"] == 0
