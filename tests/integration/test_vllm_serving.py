"""``engine=vllm``: rayft's Serve app decoding on vLLM's CPU build, driven by the openai client.

The app serves SmolLM2-135M-Instruct (vLLM's CPU attention has no kernel for tiny-llama's
head size of 16) with LoRA adapters made by PEFT. Every answer is checked against rayft's
native engine on the same weights in this process: greedy text and token counts, sampled
choices per seed, stop strings, streamed deltas, an adapter published and republished
while serving, DoRA routed to the native engine, the base-fingerprint 409, and the loss
``/v1/evaluations`` and echoed log-probs report.

``scripts/install.sh`` makes vLLM's environment (``scripts/install_vllm.sh``); the module
is skipped only where ``RAYFT_VLLM=0`` said to install none.
"""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest
import torch
from harness import SMOLLM2, smollm_adapter

from rayft.serving.vllm_engine import find_vllm_python

if os.environ.get("RAYFT_VLLM") == "0":
    pytest.skip("RAYFT_VLLM=0: no vLLM environment was installed", allow_module_level=True)

pytestmark = pytest.mark.slow

BASE = SMOLLM2
PROMPTS = ["Name a colour of the sky.", "What is 2 + 3?"]


@pytest.fixture(scope="module")
def vllm_home(rayft_home: Path) -> Path:
    from rayft.trainers.models import resolve_model
    from rayft.trainers.storage import StorageRoot

    assert find_vllm_python() is not None, (
        "no vLLM environment: run `bash scripts/install_vllm.sh` (or set RAYFT_VLLM=0 to skip)"
    )
    resolve_model(BASE, rayft_home / "models", StorageRoot.resolve(str(rayft_home)))
    smollm_adapter(rayft_home, "v-one", 1)
    smollm_adapter(rayft_home, "v-two", 2)
    smollm_adapter(rayft_home, "v-dora", 3, dora=True)
    smollm_adapter(rayft_home, "v-tiny", 4, base="tiny-llama")
    return rayft_home


@pytest.fixture(scope="module")
def vllm_url(ray_cluster, vllm_home: Path):
    from ray import serve

    from rayft.serving.client import run_app

    args = {
        "model": BASE,
        "storage": str(vllm_home),
        "engine": "vllm",
        "max_loaded_adapters": 2,
        "dtype": "float32",
        "max_tokens_limit": 64,
        "num_cpus": 1,
    }
    try:
        yield run_app(args)
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def native(vllm_home: Path):
    """rayft's native engine on the same base and registry: the reference."""
    from rayft.serving.engine import ModelEngine

    return ModelEngine(BASE, storage=str(vllm_home), max_loaded_adapters=4, dtype="float32")


@pytest.fixture(scope="module")
def client(vllm_url: str):
    from openai import OpenAI

    return OpenAI(base_url=f"{vllm_url}/v1", api_key="unused", max_retries=0, timeout=300)


def native_greedy(native, model: str, prompt: str, max_tokens: int = 12):
    from rayft.serving.engine import BASE_ADAPTER, GenerationRequest, SamplingParams

    ids = tuple(native.tokenizer(prompt)["input_ids"])
    adapter = BASE_ADAPTER if model == BASE else model
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    return native.generate([GenerationRequest(ids, adapter, params)])[0]


@pytest.mark.parametrize("model", [BASE, "v-one", "v-two", "v-dora"])
def test_greedy_answers_equal_the_native_engines(client, native, model):
    for prompt in PROMPTS:
        got = client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0)
        want = native_greedy(native, model, prompt)
        assert got.choices[0].text == want.text, (model, prompt)
        assert got.usage.completion_tokens == want.completion_tokens
        assert got.usage.prompt_tokens == len(native.tokenizer(prompt)["input_ids"])
    base = client.completions.create(model=BASE, prompt=PROMPTS[0], max_tokens=12, temperature=0)
    if model != BASE:  # the adapters surely change the answer
        assert got.choices[0].text != base.choices[0].text or model == "v-dora"


def test_streamed_deltas_join_to_the_answer_and_end_with_usage(client):
    whole = client.completions.create(
        model="v-one", prompt=PROMPTS[0], max_tokens=16, temperature=0
    )
    stream = client.completions.create(
        model="v-one",
        prompt=PROMPTS[0],
        max_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert whole.choices[0].text and len(chunks) > 2
    assert text == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_n_choices_follow_the_seed_and_stop_ends_before_the_stop_string(client):
    def sampled():
        answer = client.chat.completions.create(
            model="v-two",
            messages=[{"role": "user", "content": PROMPTS[0]}],
            max_tokens=12,
            temperature=1.0,
            n=3,
            seed=7,
        )
        return [c.message.content for c in sorted(answer.choices, key=lambda c: c.index)]

    first, again = sampled(), sampled()
    assert first == again and len(first) == 3
    assert len(set(first)) > 1  # each choice draws from its own seed

    whole = client.completions.create(model=BASE, prompt=PROMPTS[0], max_tokens=16, temperature=0)
    text = whole.choices[0].text
    stop = text.strip().split()[1]
    cut = client.completions.create(
        model=BASE, prompt=PROMPTS[0], max_tokens=16, temperature=0, stop=[stop]
    )
    assert cut.choices[0].text == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_an_adapter_published_while_serving_is_loaded_and_reloaded_when_republished(
    client, native, vllm_home, vllm_url
):
    from openai import NotFoundError

    with pytest.raises(NotFoundError):
        client.completions.create(model="v-late", prompt=PROMPTS[0], max_tokens=4)
    smollm_adapter(vllm_home, "v-late", 21, scale=0.3)
    first = client.completions.create(
        model="v-late", prompt=PROMPTS[0], max_tokens=12, temperature=0
    )
    assert first.choices[0].text == native_greedy(native, "v-late", PROMPTS[0]).text

    smollm_adapter(
        vllm_home, "v-late", 22, scale=0.3
    )  # republished: new weights under the same name
    again = client.completions.create(
        model="v-late", prompt=PROMPTS[0], max_tokens=12, temperature=0
    )
    assert again.choices[0].text == native_greedy(native, "v-late", PROMPTS[0]).text
    assert again.choices[0].text != first.choices[0].text
    # The old version was unloaded, and vLLM never held more than its 2 slots.
    held = httpx.get(f"{vllm_url}/health", timeout=30).json()
    assert held["loaded_adapters"].count("v-late") == 1, held
    assert held["peak_loaded_adapters"] <= 2, held


def test_an_adapter_of_another_base_is_a_409_and_an_unknown_one_a_404(vllm_url):
    answer = httpx.post(
        f"{vllm_url}/v1/completions",
        json={"model": "v-tiny", "prompt": "hi", "max_tokens": 2},
        timeout=60,
    )
    assert answer.status_code == 409, answer.text
    assert answer.json()["error"]["code"] == "base_model_mismatch"
    answer = httpx.post(
        f"{vllm_url}/v1/completions",
        json={"model": "v-none", "prompt": "hi", "max_tokens": 2},
        timeout=60,
    )
    assert answer.status_code == 404 and answer.json()["error"]["param"] == "model"


def test_evaluation_loss_from_prompt_logprobs_equals_the_native_engines(vllm_url, native):
    rows = [
        {"prompt": "Name a colour of the sky.", "completion": " The sky is blue."},
        {"prompt": "What is 2 + 3?", "completion": " 2 + 3 = 5."},
        {
            "messages": [
                {"role": "user", "content": "Say hello."},
                {"role": "assistant", "content": "Hello!"},
            ]
        },
    ]
    for model in ("v-one", BASE):
        answer = httpx.post(
            f"{vllm_url}/v1/evaluations",
            json={"model": model, "rows": rows, "metrics": ["loss"]},
            timeout=300,
        )
        assert answer.status_code == 200, answer.text
        served = answer.json()["metrics"]["loss"]

        from rayft.serving.evaluation import prepare_rows

        prepared = prepare_rows(rows, native.tokenizer, "auto", 2048, True, False)
        adapter = "__base__" if model == BASE else model
        total, count = native.score(prepared.scored, adapter)
        # On a CPU the replica scores on its native engine (VllmEngine.scores_natively:
        # vLLM's CPU LoRA path fails batched prompt log-probs); with CUDA vLLM scores.
        assert served == pytest.approx(total / count, rel=1e-4, abs=1e-4), model


def test_echoed_prompt_logprobs_equal_the_native_engines(vllm_url, native):
    # What lm-evaluation-harness's local-completions asks: echo, logprobs, max_tokens 0.
    prompt = "The sky is blue and the grass is green."
    answer = httpx.post(
        f"{vllm_url}/v1/completions",
        json={"model": BASE, "prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 2},
        timeout=120,
    )
    assert answer.status_code == 200, answer.text
    got = answer.json()["choices"][0]["logprobs"]
    ids = list(native.tokenizer(prompt)["input_ids"])
    want = native.token_scores([ids], top_k=2)[0]
    assert got["token_logprobs"][0] is None and len(got["token_logprobs"]) == len(ids)
    assert got["token_logprobs"][1:] == pytest.approx(want.logprobs, abs=1e-3)
    top = [sorted(d.values(), reverse=True)[:2] for d in got["top_logprobs"][1:]]
    assert top == [pytest.approx([v for _, v in row], abs=1e-3) for row in want.top]


def test_a_rollout_engine_on_vllm_samples_with_each_policy_it_is_sent(vllm_home, native):
    # GRPO's rollout engine on vLLM (grpo.rollout_engine: vllm): the policy's LoRA tensors
    # after each step become a new LoRA in vLLM; greedy answers equal the native engine's
    # with the same tensors, and change with every new policy.
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    from rayft.trainers.rollout import RolloutEngine

    model_dir = str(native.model_dir)
    prompt = list(native.tokenizer(PROMPTS[0])["input_ids"])
    config = LoraConfig(r=8, target_modules=["q_proj", "v_proj"])
    policy = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), config)
    engines = {
        kind: RolloutEngine(model_dir, str(vllm_home), "float32", 4, engine=kind)
        for kind in ("vllm", "native")
    }
    try:
        answers = []
        for seed in (31, 32):
            generator = torch.Generator().manual_seed(seed)
            for param_name, param in policy.named_parameters():
                if "lora_B" in param_name:
                    param.data = torch.randn(param.shape, generator=generator) * 0.3
            weights = get_peft_model_state_dict(policy)
            sampled = {}
            for kind, engine in engines.items():
                engine.set_adapter(config.to_dict(), weights)
                sampled[kind] = engine.generate([prompt], 1, 12, 0.0, 1.0, seed)[0].token_ids
            assert sampled["vllm"] == sampled["native"], seed
            answers.append(sampled["vllm"])
        assert answers[0] != answers[1]
        vllm = engines["vllm"].engine
        assert len(vllm._memory) == 1 and vllm._memory["policy"].endswith("@sync2")
    finally:
        engines["vllm"].engine.close()


@pytest.fixture(scope="module")
def lora_off(vllm_home: Path):
    """A full-weight GRPO run's rollout engine on vLLM: no LoRA layers, weight reloads."""
    from rayft.trainers.rollout import RolloutEngine

    rollout = RolloutEngine(BASE, str(vllm_home), "float32", 4, engine="vllm", full=True)
    yield rollout
    rollout.engine.close()


def test_without_lora_vllm_decodes_the_base_and_adapters_decode_natively(lora_off, native):
    # vllm_lora=false (and full-weight rollouts): vLLM runs without LoRA layers, faster for
    # the base model; every adapter's rows decode on the native engine in the same replica,
    # with the same answers.
    from rayft.serving.engine import BASE_ADAPTER, GenerationRequest, SamplingParams

    engine = lora_off.engine
    assert "--enable-lora" not in engine.server.command()
    greedy = SamplingParams(max_tokens=12, temperature=0.0)
    for adapter in (BASE_ADAPTER, "v-one"):
        ids = tuple(native.tokenizer(PROMPTS[1])["input_ids"])
        got = engine.generate([GenerationRequest(ids, adapter, greedy)])[0]
        model = BASE if adapter == BASE_ADAPTER else adapter
        assert got.text == native_greedy(native, model, PROMPTS[1]).text, adapter
        # The native engine's weights load with its first row, not with the replica.
        assert engine.base_loaded == (adapter != BASE_ADAPTER)
    assert engine.loaded_adapters() == ["v-one"]  # held by the native engine
    assert engine.runs_natively("v-one") and not engine.runs_natively(BASE_ADAPTER)
    # Without LoRA layers vLLM scores the base's prompts itself, batched, on a CPU too.
    assert not engine.scores_natively(BASE_ADAPTER) and engine.scores_natively("v-one")
    rows = [list(native.tokenizer(p)["input_ids"]) for p in PROMPTS * 2]
    examples = [(ids, ids) for ids in rows]
    got, want = engine.score(examples), native.score(examples)
    assert got[1] == want[1] and got[0] == pytest.approx(want[0], rel=1e-4)
    top = engine.token_scores(rows, BASE_ADAPTER, top_k=2)
    ref = native.token_scores(rows, BASE_ADAPTER, top_k=2)
    for mine, theirs in zip(top, ref, strict=True):
        assert mine.logprobs == pytest.approx(theirs.logprobs, abs=1e-3)
        assert [t for t, _ in mine.top[0]] == [t for t, _ in theirs.top[0]]


def test_a_rollout_engine_on_vllm_reloads_full_policy_weights_in_place(lora_off, vllm_home, native):
    # Full-weight GRPO on vLLM: after each step the policy's state dict is reloaded into
    # vLLM's workers (reload_weights) and its prefix cache emptied; greedy answers equal the
    # native engine's with the same weights, and change with them.
    from transformers import AutoModelForCausalLM

    from rayft.trainers.rollout import RolloutEngine

    model_dir = str(native.model_dir)
    prompt = list(native.tokenizer(PROMPTS[1])["input_ids"])
    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    engines = {
        "vllm": lora_off,
        "native": RolloutEngine(model_dir, str(vllm_home), "float32", 4, full=True),
    }
    answers = [engines["vllm"].generate([prompt], 1, 12, 0.0, 1.0, 0)[0].token_ids]
    for seed in (41, 42):
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in policy.named_parameters():
                if "mlp" in name:
                    param.add_(torch.randn(param.shape, generator=generator) * 0.02)
        weights = {k: v.detach().clone() for k, v in policy.state_dict().items()}
        sampled = {}
        for kind, engine in engines.items():
            engine.set_base(weights)
            sampled[kind] = engine.generate([prompt], 1, 12, 0.0, 1.0, seed)[0].token_ids
        assert sampled["vllm"] == sampled["native"], seed
        answers.append(sampled["vllm"])
    assert len({tuple(a) for a in answers}) == 3, answers
    synced = list((Path(engines["vllm"].engine._sync_dir.name)).glob("base@sync*"))
    assert [p.name for p in synced] == ["base@sync2"]  # the older checkpoint is gone


def test_a_replica_whose_vllm_server_died_is_replaced_and_answers_again(vllm_url):
    # Runs last in the module: it takes the replica's vLLM server down.
    import signal
    import time

    import psutil

    health = httpx.get(f"{vllm_url}/health", timeout=30).json()
    replica = psutil.Process(health["pid"])
    servers = [
        p for p in replica.children() if any("vllm_launch.py" in part for part in p.cmdline())
    ]
    assert len(servers) == 1, [p.cmdline() for p in replica.children()]
    os.killpg(servers[0].pid, signal.SIGKILL)  # the server and its engine processes

    # Serve's health check (ModelServer.check_health) fails and a new replica starts its own.
    deadline = time.monotonic() + 400
    answer = None
    while time.monotonic() < deadline:
        try:
            answer = httpx.post(
                f"{vllm_url}/v1/completions",
                json={"model": BASE, "prompt": PROMPTS[0], "max_tokens": 4, "temperature": 0},
                timeout=60,
            )
            if answer.status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(2)
    assert answer is not None and answer.status_code == 200, answer and answer.text
    assert httpx.get(f"{vllm_url}/health", timeout=30).json()["pid"] != health["pid"]
