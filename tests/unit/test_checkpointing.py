"""Activation checkpointing: same loss and gradients, less kept; ``optim.gradient_checkpointing``."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from rayft.trainers.checkpointing import enable_checkpointing
from rayft.trainers.config import ConfigError, LoraSpec, apply_overrides, validate_spec
from rayft.trainers.loss import IGNORE_INDEX, causal_lm_loss_sums
from rayft.trainers.methods import apply_lora
from rayft.trainers.packing import block_causal_mask


def packed_batch() -> dict[str, torch.Tensor]:
    """Two rows of two packed samples each, with rayft's block-diagonal mask."""
    ids = torch.randint(3, 200, (2, 24), generator=torch.Generator().manual_seed(1))
    segments = torch.tensor([[1] * 10 + [2] * 14, [1] * 15 + [2] * 6 + [0] * 3])
    positions = torch.cat(
        [
            torch.cat([torch.arange(10), torch.arange(14)])[None],
            torch.cat([torch.arange(15), torch.arange(6), torch.zeros(3, dtype=torch.long)])[None],
        ]
    )
    labels = ids.clone()
    labels[0, :3] = labels[0, 10] = labels[1, 15] = IGNORE_INDEX  # prompt and sample starts
    labels[1, 21:] = IGNORE_INDEX  # padding
    return {
        "input_ids": ids,
        "labels": labels,
        "attention_mask": block_causal_mask(segments, torch.float32),
        "position_ids": positions,
    }


def lora_model(model_dir, mode):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="sdpa"
    )
    enable_checkpointing(model, mode)
    torch.manual_seed(0)  # the same LoRA initialisation for every mode
    # Always, so the backward graph is the same with and without checkpointing.
    model.enable_input_require_grads()
    model = apply_lora(model, LoraSpec(r=4, alpha=8, dropout=0.1))
    for name, param in model.named_parameters():
        if "lora_B" in name:  # non-zero B, so every adapter weight gets a gradient
            torch.nn.init.normal_(param, std=0.2, generator=torch.Generator().manual_seed(3))
    return model.train()


class OpCounter(TorchDispatchMode):
    """Counts the aten operations run, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if name == "aten.mm":  # by contraction size: LoRA's rank (4 here) or a dense one
            name += ".rank" if args[0].shape[-1] == 4 else ".dense"
        self.counts[name] += 1
        return func(*args, **(kwargs or {}))


def step(model, batch):
    """Loss and LoRA gradients of one step, and the aten ops forward + backward ran."""
    torch.manual_seed(0)  # the same dropout masks for every mode
    with OpCounter() as ops:
        total, count = causal_lm_loss_sums(model, model.get_output_embeddings(), batch)
        (total / count).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return (total / count).detach(), grads, ops.counts


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    return step(lora_model(tiny_model_dir, False), packed_batch())


@pytest.mark.parametrize("mode", ["selective", True])
def test_checkpointing_keeps_loss_and_lora_gradients(tiny_model_dir, reference, mode):
    want_loss, want_grads, _ = reference
    loss, grads, _ = step(lora_model(tiny_model_dir, mode), packed_batch())
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-5)
    assert want_grads and grads.keys() == want_grads.keys()
    assert all("lora_" in name for name in grads)
    for name, want in want_grads.items():
        torch.testing.assert_close(grads[name], want, rtol=1e-5, atol=1e-5, msg=name)


def test_selective_recomputes_elementwise_ops_but_not_dense_products(tiny_model_dir, reference):
    _, _, plain = reference
    _, _, selective = step(lora_model(tiny_model_dir, "selective"), packed_batch())
    _, _, full = step(lora_model(tiny_model_dir, True), packed_batch())
    layers = 2
    # SiLU and the norms' rsqrt run again in backward for every layer, under both modes.
    assert plain["aten.silu"] == layers
    assert selective["aten.silu"] == full["aten.silu"] == 2 * layers
    assert selective["aten.rsqrt"] == full["aten.rsqrt"] > plain["aten.rsqrt"]
    # Attention is kept, not recomputed; full recompute runs it again.
    sdpa = "aten._scaled_dot_product_flash_attention_for_cpu"
    assert selective[sdpa] == plain[sdpa] == layers < full[sdpa]
    # Dense products are kept, not run again; full recompute repeats them (the frozen
    # projections and LoRA's down-projections). Only LoRA's cheap rank-4 up-projections
    # are recomputed.
    assert selective["aten.mm.dense"] == plain["aten.mm.dense"] < full["aten.mm.dense"]
    assert selective["aten.mm.rank"] > plain["aten.mm.rank"]


def spec_with(value) -> dict:
    return {
        "model": {"name": "tiny-llama"},
        "data": {"train": "train.jsonl"},
        "optim": {"gradient_checkpointing": value},
    }


@pytest.mark.parametrize("value", [False, True, "selective"])
def test_gradient_checkpointing_accepts_false_true_and_selective(value):
    spec = validate_spec(spec_with(value))
    assert spec.optim.gradient_checkpointing == value
    assert validate_spec(spec.to_dict()).optim.gradient_checkpointing == value


def test_gradient_checkpointing_override_from_the_command_line():
    data = apply_overrides(spec_with(False), ["optim.gradient_checkpointing=selective"])
    assert validate_spec(data).optim.gradient_checkpointing == "selective"
    data = apply_overrides(spec_with("selective"), ["optim.gradient_checkpointing=true"])
    assert validate_spec(data).optim.gradient_checkpointing is True


@pytest.mark.parametrize("value", ["partial", "yes", 1, None])
def test_gradient_checkpointing_rejects_other_values_naming_the_choices(value):
    with pytest.raises(ConfigError) as err:
        validate_spec(spec_with(value))
    assert [key for key, _ in err.value.problems] == ["optim.gradient_checkpointing"]
    message = str(err.value)
    assert "false" in message and "true" in message and "'selective'" in message


def test_selective_runs_as_full_recompute_under_zero3():
    from rayft.trainers.checkpointing import effective_mode

    assert effective_mode("selective", 3) is True
    assert [effective_mode("selective", s) for s in (0, 1, 2)] == ["selective"] * 3
    assert effective_mode(False, 3) is False and effective_mode(True, 2) is True
