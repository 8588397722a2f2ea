"""Mixed-adapter batches with stacked LoRA weights (serving.batched_lora) against PEFT's own
mixed-adapter path, on tiny-llama without Ray."""

from __future__ import annotations

import pytest
import torch

from rayft.serving.batched_lora import BatchedLora

BASE = "__base__"


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    """tiny-llama with three LoRA adapters of different ranks, scalings and targets."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    configs = {
        "a": LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
        "b": LoraConfig(r=8, lora_alpha=8, use_rslora=True, target_modules="all-linear"),
        "c": LoraConfig(r=2, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    }
    peft_model = None
    for name, config in configs.items():
        if peft_model is None:
            peft_model = get_peft_model(base, config, adapter_name=name)
        else:
            peft_model.add_adapter(name, config)
    randomize(peft_model, seed=1)
    return peft_model.eval()


def randomize(model, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)


def peft_logits(model, adapters, ids):
    with torch.no_grad():
        return model(input_ids=ids, adapter_names=list(adapters)).logits


def stacked_logits(batched, model, adapters, ids):
    with torch.no_grad():
        out = batched.forward(model, adapters, BASE, {"input_ids": ids})
    assert out is not None
    return out.logits


@pytest.mark.parametrize("length", [1, 7])
def test_stacked_adapters_give_peft_mixed_batch_logits(model, length):
    adapters = ["a", BASE, "b", "c", "a", "b"]
    ids = torch.randint(3, 200, (len(adapters), length), generator=torch.Generator().manual_seed(2))
    want = peft_logits(model, adapters, ids)
    got = stacked_logits(BatchedLora(), model, adapters, ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # Each adapter changes its rows: the comparison is not of the base against itself.
    base = peft_logits(model, [BASE] * len(adapters), ids)
    assert not torch.allclose(got[0], base[0], atol=1e-3)
    torch.testing.assert_close(got[1], base[1], rtol=1e-5, atol=1e-5)
    # The model's own adapters are back on after the pass, with no hook left behind.
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert layers and not any(m.disable_adapters or m._forward_hooks for m in layers)


def test_overwritten_weights_are_restacked_after_invalidate(model):
    adapters = ["a", "b", BASE]
    ids = torch.randint(3, 200, (3, 5), generator=torch.Generator().manual_seed(3))
    batched = BatchedLora()
    before = stacked_logits(batched, model, adapters, ids)
    saved = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    try:
        randomize(model, seed=9)
        batched.invalidate()
        after = stacked_logits(batched, model, adapters, ids)
        torch.testing.assert_close(after, peft_logits(model, adapters, ids), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(after[0], before[0], atol=1e-3)
    finally:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name in saved:
                    param.copy_(saved[name])


def test_a_dora_adapter_is_left_to_peft(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear"), adapter_name="p")
    model.add_adapter("d", LoraConfig(r=4, use_dora=True, target_modules="all-linear"))
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    assert BatchedLora().forward(model.eval(), ["p", "d"], BASE, {"input_ids": ids}) is None
