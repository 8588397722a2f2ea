"""``model.attn_implementation``, flash-attention's packed batches, and the GPU dtype (no Ray).

Flash-attention and CUDA cannot exist on the CPU test machine, so their availability is
monkeypatched; the flattened batch flash-attention would get is checked for its shape and,
through SDPA with the equivalent block mask, for the loss it gives.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from rayft.trainers import attention
from rayft.trainers.attention import resolve_attention, uses_varlen_packing
from rayft.trainers.config import ConfigError, validate_spec
from rayft.trainers.loss import causal_lm_loss_sums
from rayft.trainers.packing import IGNORE_INDEX, block_causal_mask, collate, pack_examples
from rayft.trainers.precision import gpu_has_bf16, resolve_dtype


def example(sample_id: str, ids: list[int]) -> dict[str, Any]:
    return {"input_ids": ids, "labels": list(ids), "sample_id": sample_id}


def as_batch(rows: list[dict[str, Any]], packed: bool) -> dict[str, np.ndarray]:
    """Rows as Ray Data hands them to collate_fn: object arrays of arrays per column."""
    names = ["input_ids", "labels", "sample_ids"] + (["position_ids"] if packed else [])
    names += ["segment_ids"] if packed else []
    batch: dict[str, np.ndarray] = {}
    for name in names:
        column = np.empty(len(rows), dtype=object)
        for i, row in enumerate(rows):
            column[i] = np.asarray(row[name])
        batch[name] = column
    batch["num_truncated"] = np.array([r["num_truncated"] for r in rows])
    batch["num_dropped"] = np.array([r.get("num_dropped", 0) for r in rows])
    return batch


def machine(monkeypatch: pytest.MonkeyPatch, flash: bool, cuda: bool) -> None:
    monkeypatch.setattr(attention, "flash_attn_available", lambda: flash)
    monkeypatch.setattr(attention, "cuda_available", lambda: cuda)


@pytest.mark.parametrize(
    ("flash", "cuda", "expected"),
    [
        (True, True, "flash_attention_2"),
        (True, False, "sdpa"),
        (False, True, "sdpa"),
        (False, False, "sdpa"),
    ],
)
def test_auto_is_flash_attention_only_with_the_package_and_cuda(
    monkeypatch: pytest.MonkeyPatch, flash: bool, cuda: bool, expected: str
) -> None:
    machine(monkeypatch, flash, cuda)
    assert resolve_attention("auto") == expected
    assert resolve_attention("eager") == "eager" and resolve_attention("sdpa") == "sdpa"


@pytest.mark.parametrize(
    ("flash", "cuda", "missing"),
    [(False, True, "flash_attn"), (True, False, "CUDA"), (False, False, "flash-attn) and a CUDA")],
)
def test_flash_attention_asked_for_where_it_cannot_run_names_the_key(
    monkeypatch: pytest.MonkeyPatch, flash: bool, cuda: bool, missing: str
) -> None:
    machine(monkeypatch, flash, cuda)
    with pytest.raises(ValueError, match="model.attn_implementation") as err:
        resolve_attention("flash_attention_2")
    assert missing in str(err.value)
    machine(monkeypatch, True, True)
    assert resolve_attention("flash_attention_2") == "flash_attention_2"


def test_the_spec_key_defaults_to_auto_and_refuses_flash_attention_off_gpu() -> None:
    base = {"model": {"name": "tiny-llama"}, "data": {"train": "t.jsonl"}}
    assert validate_spec(base).model.attn_implementation == "auto"
    with pytest.raises(ConfigError) as err:
        validate_spec({**base, "model": {"name": "tiny-llama", "attn_implementation": "flash"}})
    assert [key for key, _ in err.value.problems] == ["model.attn_implementation"]
    off_gpu = {
        **base,
        "model": {"name": "tiny-llama", "attn_implementation": "flash_attention_2"},
        "scaling": {"use_gpu": False},
    }
    with pytest.raises(ConfigError) as err:
        validate_spec(off_gpu)
    assert err.value.problems[0][0] == "model.attn_implementation"
    assert "scaling.use_gpu" in err.value.problems[0][1]
    on_gpu = {**off_gpu, "scaling": {"use_gpu": True}}
    assert validate_spec(on_gpu).model.attn_implementation == "flash_attention_2"


def test_only_packed_rows_under_flash_attention_are_flattened() -> None:
    assert uses_varlen_packing("flash_attention_2", packed=True)
    assert not uses_varlen_packing("flash_attention_2", packed=False)
    assert not uses_varlen_packing("sdpa", packed=True)
    assert not uses_varlen_packing("eager", packed=True)


def packed_rows() -> list[dict[str, Any]]:
    rows = pack_examples(
        [example("a", [5, 6, 7, 8, 9]), example("b", [11, 12, 13, 14]), example("c", [20, 21])],
        12,
    )
    return rows + pack_examples([example("d", [30, 31, 32])], 12)  # a shorter second row


def test_flash_attention_batch_is_one_row_with_restarting_positions_and_no_mask() -> None:
    rows = packed_rows()
    masked = collate(as_batch(rows, packed=True), pad_id=0, packed=True)
    flat = collate(as_batch(rows, packed=True), pad_id=0, packed=True, varlen=True)
    assert "attention_mask" not in flat
    assert flat["input_ids"].tolist() == [[5, 6, 7, 8, 9, 11, 12, 13, 14, 20, 21, 30, 31, 32]]
    assert flat["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 0, 1, 2]]
    labels = flat["labels"][0].tolist()
    assert [labels[i] for i in (0, 5, 9, 11)] == [IGNORE_INDEX] * 4  # every sample's first
    assert flat["labels"].shape == flat["input_ids"].shape == flat["position_ids"].shape
    # No padding: the same tokens and labelled tokens as the masked batch, nothing more.
    assert flat["num_tokens"] == masked["num_tokens"] == flat["input_ids"].numel() == 14
    assert flat["num_label_tokens"] == masked["num_label_tokens"] == 10
    assert flat["sample_ids"] == masked["sample_ids"] == [["a", "b", "c"], ["d"]]


def test_flash_attention_batch_with_every_sample_dropped_is_one_unlabelled_token() -> None:
    empty = as_batch([{**pack_examples([], 8)[0], "num_dropped": 3}], packed=True)
    flat = collate(empty, pad_id=7, packed=True, varlen=True)
    assert flat["input_ids"].tolist() == [[7]] and flat["position_ids"].tolist() == [[0]]
    assert flat["labels"].tolist() == [[IGNORE_INDEX]]
    assert flat["num_label_tokens"] == 0 and flat["num_dropped"] == 3


def test_collate_of_a_packing_run_follows_the_resolved_kernel(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from rayft.trainers.objective import CausalLMObjective

    spec = validate_spec(
        {"model": {"name": "tiny-llama"}, "data": {"train": "t.jsonl", "packing": True}}
    )
    objective = CausalLMObjective(spec)
    machine(monkeypatch, flash=True, cuda=True)
    assert objective.collate(0, spec).varlen is True
    assert objective.collate(0, spec).width is None  # flattened: no padding at all
    machine(monkeypatch, flash=False, cuda=True)
    masked = objective.collate(0, spec)
    assert masked.varlen is False and masked.width == spec.data.max_seq_len
    machine(monkeypatch, flash=False, cuda=False)
    assert objective.collate(0, spec).width is None  # CPU: each batch's longest row


def test_packed_rows_padded_to_a_width_keep_their_loss_and_share_one_shape(
    tiny_model_dir: Path,
) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa")
    model.eval()
    head = model.get_output_embeddings()
    longest = collate(as_batch(packed_rows(), packed=True), pad_id=0, packed=True)
    wide = collate(as_batch(packed_rows(), packed=True), pad_id=0, packed=True, width=16)
    assert longest["input_ids"].shape[1] < 16 and wide["input_ids"].shape[1] == 16
    assert wide["attention_mask"].shape[-2:] == (16, 16)
    assert wide["num_tokens"] == longest["num_tokens"]
    assert wide["num_label_tokens"] == longest["num_label_tokens"]
    with torch.no_grad():
        expected, count = causal_lm_loss_sums(model, head, longest)
        got, got_count = causal_lm_loss_sums(model, head, wide)
    assert got_count == count
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-6)


def test_packed_losses_equal_unpacked_rows_with_the_block_mask_and_flattened(
    tiny_model_dir: Path,
) -> None:
    """SDPA with the block mask, and the flattened batch (flash-attention's layout, run here
    through SDPA with the mask its restarting positions describe), give the loss of the
    samples run as ordinary padded rows."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa")
    model.eval()
    head = model.get_output_embeddings()
    rows = packed_rows()
    unpacked_rows = [
        {
            "input_ids": ids,
            "labels": [IGNORE_INDEX, *ids[1:]],
            "sample_ids": [name],
            "num_truncated": 0,
        }
        for name, ids in (
            ("a", [5, 6, 7, 8, 9]),
            ("b", [11, 12, 13, 14]),
            ("c", [20, 21]),
            ("d", [30, 31, 32]),
        )
    ]
    with torch.no_grad():
        plain = collate(as_batch(unpacked_rows, packed=False), pad_id=0, packed=False)
        expected, count = causal_lm_loss_sums(model, head, plain)
        masked = collate(as_batch(rows, packed=True), pad_id=0, packed=True)
        got, got_count = causal_lm_loss_sums(model, head, masked)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-6)
        flat = collate(as_batch(rows, packed=True), pad_id=0, packed=True, varlen=True)
        segments = (flat["position_ids"] == 0).long().cumsum(dim=-1)
        flat["attention_mask"] = block_causal_mask(segments, torch.float32)
        flat_loss, flat_count = causal_lm_loss_sums(model, head, flat)
        torch.testing.assert_close(flat_loss, expected, atol=1e-5, rtol=1e-6)
    assert count == got_count == flat_count == 10


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_model_gets_the_block_mask_at_its_own_finite_minimum(
    tiny_model_dir: Path, dtype: torch.dtype
) -> None:
    """Collate builds the block mask in float32; float32's minimum is ``-inf`` in bf16 and
    fp16, which fused kernels turn into NaN. The loss casts the mask to the weights' dtype
    with that dtype's finite minimum, and the packed loss matches the padded rows'."""
    from transformers import AutoModelForCausalLM

    from rayft.trainers.loss import mask_in_dtype

    mask = collate(as_batch(packed_rows(), packed=True), pad_id=0, packed=True)["attention_mask"]
    assert mask.dtype == torch.float32 and torch.isinf(mask.to(dtype)).any()  # the naive cast
    cast = mask_in_dtype(mask, dtype)
    assert cast is not None and cast.dtype == dtype and not torch.isinf(cast).any()
    assert torch.equal(cast < 0, mask < 0)
    assert cast.min() == torch.finfo(dtype).min
    plain_mask = torch.ones(2, 3, dtype=torch.long)
    assert mask_in_dtype(plain_mask, dtype) is plain_mask and mask_in_dtype(None, dtype) is None

    model = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, attn_implementation="sdpa", dtype=dtype
    ).eval()
    head = model.get_output_embeddings()
    samples = {"a": [5, 6, 7, 8, 9], "b": [11, 12, 13, 14], "c": [20, 21], "d": [30, 31, 32]}
    plain_rows = [
        {
            "input_ids": ids,
            "labels": [IGNORE_INDEX, *ids[1:]],
            "sample_ids": [name],
            "num_truncated": 0,
        }
        for name, ids in samples.items()
    ]
    with torch.no_grad():
        expected, _ = causal_lm_loss_sums(
            model, head, collate(as_batch(plain_rows, packed=False), pad_id=0, packed=False)
        )
        got, _ = causal_lm_loss_sums(
            model, head, collate(as_batch(packed_rows(), packed=True), pad_id=0, packed=True)
        )
    assert torch.isfinite(got)
    torch.testing.assert_close(got, expected, atol=0.05, rtol=0.02)


def test_auto_dtype_is_bf16_on_gpus_that_have_it(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_dtype("auto", on_gpu=True, gpu_bf16=True) == "bfloat16"
    assert resolve_dtype("auto", on_gpu=True, gpu_bf16=False) == "float16"
    assert resolve_dtype("auto", on_gpu=False, gpu_bf16=True) == "float32"
    assert resolve_dtype("float32", on_gpu=True, gpu_bf16=True) == "float32"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype("auto", on_gpu=True) == "bfloat16"  # this process's GPU answers
    assert gpu_has_bf16({"GPU": 1.0, "accelerator_type:T4": 1.0}) is True
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_dtype("auto", on_gpu=True) == "float16"


def test_a_driver_without_a_gpu_reads_the_cluster_gpu_types(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    h100 = {"CPU": 8.0, "GPU": 8.0, "accelerator_type:H100": 1.0}
    assert gpu_has_bf16(h100) is True
    assert gpu_has_bf16({**h100, "accelerator_type:V100": 1.0}) is False  # mixed: fp16
    assert gpu_has_bf16({"GPU": 1.0, "accelerator_type:T4": 1.0}) is False
    assert gpu_has_bf16({"GPU": 1.0, "accelerator_type:XYZ-9": 1.0}) is False  # unknown
    assert gpu_has_bf16({"CPU": 2.0, "GPU": 1.0}) is None
    assert resolve_dtype("auto", on_gpu=True, gpu_bf16=gpu_has_bf16({"GPU": 1.0})) == "float16"
