# ruff: noqa: F811 - fixtures are imported from conftest_serving and used as parameters
"""The serving application over real HTTP on a local Ray Serve cluster (CPU, tiny-llama).

Two adapters (t1, t2) are trained with the real driver; PEFT-made adapters (p1, p2)
cover the LRU test, where each adapter must surely change the output.
"""

from __future__ import annotations

import asyncio
import math
import shutil
from pathlib import Path

import httpx
import pytest
import torch
from conftest_serving import make_peft_adapter, serve_url, serving_home  # noqa: F401

pytestmark = pytest.mark.slow

PROMPTS = ["name a red thing", "name a blue thing", "hello world", "the quick brown fox"]


def openai_client(url: str):
    import openai

    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def health(url: str) -> dict:
    return httpx.get(f"{url}/health").json()


def test_openai_client_lists_base_and_every_adapter(serve_url):
    ids = [m.id for m in openai_client(serve_url).models.list().data]
    assert ids[0] == "tiny-llama"
    assert {"t1", "t2", "p1", "p2"} <= set(ids)
    assert "for-smollm" not in ids  # trained on another base: not servable here


@pytest.mark.parametrize("model", ["tiny-llama", "t1", "t2"])
def test_openai_client_completes_chats_and_streams(serve_url, model, serving_home):
    from transformers import AutoTokenizer

    client = openai_client(serve_url)
    tokenizer = AutoTokenizer.from_pretrained(serving_home / "models" / "tiny-llama")

    done = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=8, temperature=0)
    assert done.object == "text_completion" and done.model == model
    assert done.usage.prompt_tokens == len(tokenizer(PROMPTS[0])["input_ids"])
    assert 1 <= done.usage.completion_tokens <= 8
    assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens
    streamed = client.completions.create(
        model=model, prompt=PROMPTS[0], max_tokens=8, temperature=0, stream=True
    )
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks) == done.choices[0].text
    assert chunks[-1].choices[0].finish_reason == done.choices[0].finish_reason

    messages = [{"role": "user", "content": PROMPTS[1]}]
    chat = client.chat.completions.create(
        model=model, messages=messages, max_tokens=8, temperature=0
    )
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert chat.usage.prompt_tokens == len(
        tokenizer(rendered, add_special_tokens=False)["input_ids"]
    )
    stream = client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces = list(stream)
    assert all(p.object == "chat.completion.chunk" for p in pieces)
    assert pieces[0].choices[0].delta.role == "assistant"
    text = "".join(p.choices[0].delta.content or "" for p in pieces if p.choices)
    assert text == chat.choices[0].message.content
    assert pieces[-1].usage.completion_tokens == chat.usage.completion_tokens


def test_sse_wire_format_is_openais(serve_url):
    body = {"model": "t1", "prompt": "hello", "max_tokens": 3, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{serve_url}/v1/completions", json=body, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = "".join(response.iter_text())
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(e.startswith("data: {") for e in events[:-2])


def test_n_choices_and_seeded_sampling(serve_url):
    client = openai_client(serve_url)
    kwargs = {"model": "p1", "prompt": "hello", "max_tokens": 8, "temperature": 1.0, "seed": 5}
    first = client.completions.create(n=3, **kwargs)
    again = client.completions.create(n=3, **kwargs)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert len({c.text for c in first.choices}) > 1
    assert 3 <= first.usage.completion_tokens <= 24
    greedy = client.completions.create(model="p1", prompt="hello", max_tokens=8, temperature=0, n=2)
    assert greedy.choices[0].text == greedy.choices[1].text


def test_greedy_through_the_endpoint_equals_plain_peft_generate(serve_url, serving_home):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = serving_home / "models" / "tiny-llama"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    for adapter in ("t1", "p2"):
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        model = PeftModel.from_pretrained(base, str(serving_home / "adapters" / adapter)).eval()
        ids = torch.tensor([tokenizer(PROMPTS[2])["input_ids"]])
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False
        )
        expected = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        got = openai_client(serve_url).completions.create(
            model=adapter, prompt=PROMPTS[2], max_tokens=12, temperature=0
        )
        # generate stops after the end-of-turn token as the endpoint does.
        assert got.choices[0].text == expected


def test_concurrent_mixed_adapters_equal_sequential(serve_url):
    import openai

    jobs = [(m, p) for m in ("t1", "t2", "tiny-llama") for p in PROMPTS][:8]
    client = openai_client(serve_url)
    sequential = [
        client.completions.create(model=m, prompt=p, max_tokens=16, temperature=0).choices[0].text
        for m, p in jobs
    ]
    before = health(serve_url)

    async def concurrently() -> list[str]:
        aclient = openai.AsyncOpenAI(
            base_url=f"{serve_url}/v1", api_key="unused", max_retries=0, timeout=120
        )
        results = await asyncio.gather(
            *(
                aclient.completions.create(model=m, prompt=p, max_tokens=16, temperature=0)
                for m, p in jobs
            )
        )
        return [r.choices[0].text for r in results]

    assert asyncio.run(concurrently()) == sequential
    after = health(serve_url)
    steps = after["decode_steps"] - before["decode_steps"]
    rows = after["decoded_rows"] - before["decoded_rows"]
    # Sequential decoding would be one row per step; shared forward passes carry several.
    assert rows / steps > 2.0


def test_lru_bound_holds_and_new_adapters_serve_without_restart(serve_url, serving_home):
    make_peft_adapter(serving_home, "late", 21)  # published after the app started
    assert "late" in [m["id"] for m in httpx.get(f"{serve_url}/v1/models").json()["data"]]
    for model in ("p1", "p2", "late", "p1", "t1"):
        response = httpx.post(
            f"{serve_url}/v1/completions",
            json={"model": model, "prompt": "hello", "max_tokens": 4, "temperature": 0},
            timeout=60,
        )
        assert response.status_code == 200, response.text
        state = health(serve_url)
        assert len(state["loaded_adapters"]) <= 2
        assert state["loaded_adapters"][-1] == model
    assert health(serve_url)["peak_loaded_adapters"] == 2
    shutil.rmtree(serving_home / "adapters" / "late")


LONG = "hello " * 60


@pytest.mark.parametrize(
    ("path", "body", "status", "code"),
    [
        ("/v1/completions", {"model": "no-such-adapter", "prompt": "a"}, 404, "model_not_found"),
        ("/v1/completions", b'{"model": "t1", "prompt": ', 400, "invalid_json"),
        (
            "/v1/completions",
            {"model": "t1", "prompt": "a", "temperature": "hot"},
            422,
            "invalid_parameters",
        ),
        ("/v1/completions", {"model": "t1", "prompt": ["a", 3]}, 422, "invalid_parameters"),
        (
            "/v1/completions",
            {"model": "t1", "prompt": "a", "max_tokens": 65},
            400,
            "max_tokens_exceeded",
        ),
        ("/v1/completions", {"model": "t1", "prompt": LONG}, 400, "context_length_exceeded"),
        ("/v1/chat/completions", {"model": "t1", "messages": []}, 400, "empty_messages"),
        ("/v1/chat/completions", {"model": "t1"}, 422, "invalid_parameters"),
        ("/v1/completions", {"model": "../adapters/t1", "prompt": "a"}, 400, "invalid_model"),
        ("/v1/completions", {"model": "/etc/passwd", "prompt": "a"}, 400, "invalid_model"),
        ("/v1/completions", {"model": "..", "prompt": "a"}, 400, "invalid_model"),
        ("/v1/completions", {"model": "for-smollm", "prompt": "a"}, 409, "base_model_mismatch"),
        ("/v1/evaluations", {"model": "t1", "dataset": "../../etc/passwd"}, 400, None),
        (
            "/v1/evaluations",
            {"model": "t1", "rows": [{"text": "a"}], "metrics": ["x"]},
            400,
            "invalid_metric",
        ),
    ],
)
def test_bad_input_is_answered_in_openais_error_shape(serve_url, path, body, status, code):
    kwargs = (
        {"content": body, "headers": {"content-type": "application/json"}}
        if isinstance(body, bytes)
        else {"json": body}
    )
    response = httpx.post(f"{serve_url}{path}", timeout=60, **kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "code"} and error["message"]
    if code is not None:
        assert error["code"] == code
    assert health(serve_url)["status"] == "ok"  # and the replica is still serving


def test_unknown_model_through_the_openai_client_is_not_found(serve_url):
    import openai

    with pytest.raises(openai.NotFoundError):
        openai_client(serve_url).chat.completions.create(
            model="nope", messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )


def test_evaluation_loss_matches_plain_transformers(serve_url, serving_home):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = [
        {
            "messages": [
                {"role": "user", "content": "name a red thing"},
                {"role": "assistant", "content": "the apple is red"},
            ]
        },
        {
            "messages": [
                {"role": "user", "content": "name a blue thing"},
                {"role": "assistant", "content": "the sky is blue"},
            ]
        },
        {"prompt": "name a green thing", "completion": "the grass is green"},
    ]
    metrics = ["loss", "perplexity", "exact_match", "token_f1", "rouge_l", "bleu"]
    response = httpx.post(
        f"{serve_url}/v1/evaluations",
        json={"model": "t1", "rows": rows, "metrics": metrics, "max_tokens": 8},
        timeout=120,
    )
    assert response.status_code == 200, response.text
    data = response.json()
    assert data["rows"] == 3 and set(data["metrics"]) == set(metrics)

    # Independent teacher-forced loss: the chat template by hand, assistant tokens only.
    model_dir = serving_home / "models" / "tiny-llama"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(serving_home / "adapters" / "t1")).eval()
    total, count = 0.0, 0
    for user, answer in [
        (r["messages"][0]["content"], r["messages"][1]["content"]) for r in rows[:2]
    ] + [(rows[2]["prompt"], rows[2]["completion"])]:
        prompt = f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        target_ids = tokenizer(f"{answer}<|im_end|>", add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt_ids + target_ids])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1]
        targets = ids[0, 1:]
        nll = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
        total += float(nll[len(prompt_ids) - 1 :].sum())
        count += len(target_ids)
    assert data["tokens"] == count
    assert data["metrics"]["loss"] == pytest.approx(total / count, rel=5e-3)
    assert data["metrics"]["perplexity"] == pytest.approx(math.exp(total / count), rel=5e-3)
    for name in ("exact_match", "token_f1", "rouge_l", "bleu"):
        assert 0.0 <= data["metrics"][name] <= 1.0


def test_rayft_eval_cli_against_the_endpoint(serve_url, tmp_path: Path, capsys):
    import json

    from rayft.cluster.cli import main

    data = tmp_path / "rows.jsonl"
    data.write_text(
        json.dumps({"prompt": "name a red thing", "completion": "the apple is red"}) + "\n"
    )
    assert (
        main(
            [
                "eval",
                "--model",
                "t2",
                "--data",
                str(data),
                "--url",
                serve_url,
                "--metrics",
                "loss",
                "bleu",
            ]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert result["rows"] == 1 and set(result["metrics"]) == {"loss", "bleu"}
    assert main(["eval", "--model", "nope", "--data", str(data), "--url", serve_url]) == 2
    assert (
        main(
            ["eval", "--model", "t2", "--data", str(tmp_path / "missing.jsonl"), "--url", serve_url]
        )
        == 2
    )


def test_corrupt_manifest_hides_that_adapter_while_the_rest_keep_serving(serve_url, serving_home):
    for name, damage in (("torn", b'{"kind": "adapter", "base_mo'), ("binary", b"\x00\xff")):
        make_peft_adapter(serving_home, name, 31)
        (serving_home / "adapters" / name / "rayft.json").write_bytes(damage)
    try:
        listing = httpx.get(f"{serve_url}/v1/models", timeout=60)
        assert listing.status_code == 200, listing.text
        ids = [m["id"] for m in listing.json()["data"]]
        assert "torn" not in ids and "binary" not in ids and {"t1", "t2"} <= set(ids)
        for name in ("torn", "binary"):
            response = httpx.post(
                f"{serve_url}/v1/completions",
                json={"model": name, "prompt": "hello", "max_tokens": 2},
                timeout=60,
            )
            assert response.status_code in (404, 422), response.text
            assert "rayft.json" in response.json()["error"]["message"]
        ok = httpx.post(
            f"{serve_url}/v1/completions",
            json={"model": "t1", "prompt": "hello", "max_tokens": 2},
            timeout=60,
        )
        assert ok.status_code == 200, ok.text
    finally:
        for name in ("torn", "binary"):
            shutil.rmtree(serving_home / "adapters" / name)


def test_edge_of_range_input_is_served_or_refused_with_a_4xx(serve_url):
    def post(body: dict) -> httpx.Response:
        return httpx.post(f"{serve_url}/v1/completions", json=body, timeout=60)

    base = {"model": "t1", "prompt": "hello", "max_tokens": 2}
    assert post({**base, "n": 2, "seed": 2**64 - 1}).status_code == 200
    assert post({**base, "seed": 2**64}).status_code == 422
    assert post({**base, "stop": "s" * 1000}).status_code == 400
    assert post({**base, "model": "t1\x07"}).status_code == 400
    assert health(serve_url)["status"] == "ok"
