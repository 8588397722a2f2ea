"""The DeepSpeed config builder is a pure function of the spec."""

import pytest

from rayft.trainers.config import apply_overrides, validate_spec
from rayft.trainers.deepspeed_config import zero_config


def spec_with(*overrides: str):
    data = {"model": {"name": "tiny-llama"}, "data": {"train": "t.jsonl"}}
    return validate_spec(apply_overrides(data, list(overrides)))


def test_batch_sizes_multiply_out():
    cfg = zero_config(spec_with("optim.batch_size=4", "optim.grad_accum=3"), 2, "float32", False)
    assert cfg["train_micro_batch_size_per_gpu"] == 4
    assert cfg["gradient_accumulation_steps"] == 3
    assert cfg["train_batch_size"] == 24


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_stage_is_passed_through(stage):
    cfg = zero_config(
        spec_with("method=full", f"deepspeed.zero_stage={stage}"), 1, "float32", False
    )
    assert cfg["zero_optimization"]["stage"] == stage
    assert ("stage3_prefetch_bucket_size" in cfg["zero_optimization"]) == (stage == 3)


def test_offload_blocks_and_precision():
    spec = spec_with(
        "method=full",
        "deepspeed.zero_stage=3",
        "deepspeed.offload_optimizer=true",
        "deepspeed.offload_params=true",
    )
    cfg = zero_config(spec, 2, "bfloat16", True)
    zero = cfg["zero_optimization"]
    assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert zero["offload_param"] == {"device": "cpu", "pin_memory": True}
    assert cfg["bf16"]["enabled"] and not cfg["fp16"]["enabled"]


def test_no_offload_by_default_and_clipping_from_spec():
    cfg = zero_config(spec_with("optim.max_grad_norm=0.5"), 2, "float32", False)
    assert "offload_optimizer" not in cfg["zero_optimization"]
    assert cfg["gradient_clipping"] == 0.5
    assert not cfg["bf16"]["enabled"] and not cfg["fp16"]["enabled"]
