"""Packing, the block-causal mask and collate (no Ray)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from rayft.trainers.packing import IGNORE_INDEX, block_causal_mask, collate, pack_examples


def example(sample_id: str, ids: list[int], truncated: bool = False) -> dict[str, Any]:
    return {"input_ids": ids, "labels": list(ids), "sample_id": sample_id, "truncated": truncated}


def object_column(rows: list[Any]) -> np.ndarray:
    """A column as Ray Data hands it to collate_fn: an object array of arrays."""
    column = np.empty(len(rows), dtype=object)
    for i, row in enumerate(rows):
        column[i] = np.asarray(row)
    return column


def as_batch(rows: list[dict[str, Any]], packed: bool) -> dict[str, np.ndarray]:
    names = ["input_ids", "labels", "sample_ids"]
    names += ["position_ids", "segment_ids"] if packed else []
    batch = {name: object_column([r[name] for r in rows]) for name in names}
    batch["num_truncated"] = np.array([r["num_truncated"] for r in rows])
    batch["num_dropped"] = np.array([r.get("num_dropped", 0) for r in rows])
    return batch


def test_pack_examples_first_fit_decreasing() -> None:
    examples = [
        example("a", [10, 11, 12]),
        example("b", [20, 21, 22, 23, 24, 25], truncated=True),
        example("c", [30, 31]),
        example("d", [40, 41, 42, 43]),
    ]
    rows = pack_examples(examples, max_seq_len=8)
    # Longest first: b(6) opens row 1, d(4) opens row 2, a(3) joins d, c(2) joins b.
    assert [r["sample_ids"] for r in rows] == [["a", "d"], ["b", "c"]]
    assert all(len(r["input_ids"]) <= 8 for r in rows)
    first = rows[0]
    assert first["input_ids"] == [10, 11, 12, 40, 41, 42, 43]
    assert first["position_ids"] == [0, 1, 2, 0, 1, 2, 3]
    assert first["segment_ids"] == [1, 1, 1, 2, 2, 2, 2]
    # The first label of every sample is masked, so no label is predicted across a boundary.
    assert first["labels"] == [IGNORE_INDEX, 11, 12, IGNORE_INDEX, 41, 42, 43]
    assert rows[1]["num_truncated"] == 1 and first["num_truncated"] == 0
    # Deterministic: same input, same output.
    assert pack_examples(examples, max_seq_len=8) == rows
    total = sorted(t for r in rows for t in r["input_ids"])
    assert total == sorted(t for e in examples for t in e["input_ids"])


def test_pack_examples_carries_dropped_counts_and_rejects_long_examples() -> None:
    carrier = {"input_ids": [], "labels": [], "sample_id": "", "num_dropped": 3}
    rows = pack_examples([example("a", [1, 2]), carrier], 8)
    assert len(rows) == 1 and rows[0]["num_dropped"] == 3 and rows[0]["sample_ids"] == ["a"]
    only = pack_examples([carrier], 8)
    assert only[0]["input_ids"] == [] and only[0]["num_dropped"] == 3
    with pytest.raises(ValueError, match="more than max_seq_len=4"):
        pack_examples([example("long", [1, 2, 3, 4, 5])], 4)


def test_block_causal_mask() -> None:
    segments = torch.tensor([[1, 1, 2, 2, 2, 0]])
    mask = block_causal_mask(segments, torch.float32)
    assert mask.shape == (1, 1, 6, 6) and mask.dtype == torch.float32
    allowed = (mask[0, 0] == 0).int().tolist()
    assert allowed == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0],
        [0, 0, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],  # padding attends only to itself
    ]
    assert mask[0, 0, 2, 1].item() == torch.finfo(torch.float32).min
    assert block_causal_mask(segments, torch.bfloat16).dtype == torch.bfloat16


def test_collate_unpacked_pads_right() -> None:
    rows = [
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "sample_ids": ["a"], "num_truncated": 1},
        {"input_ids": [8, 9], "labels": [8, 9], "sample_ids": ["b"], "num_truncated": 0},
        {"input_ids": [], "labels": [], "sample_ids": [], "num_truncated": 0, "num_dropped": 2},
    ]
    out = collate(as_batch(rows, packed=False), pad_id=0, packed=False)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert out["labels"].tolist() == [[-100, 6, 7], [8, 9, -100]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert out["position_ids"].tolist() == [[0, 1, 2], [0, 1, 2]]
    assert out["input_ids"].dtype == torch.long
    assert out["sample_ids"] == [["a"], ["b"]]
    assert out["num_tokens"] == 5
    assert out["num_label_tokens"] == 3  # labels[:, 1:] != -100: 6, 7 and 9
    assert out["num_truncated"] == 1 and out["num_dropped"] == 2


def test_collate_packed_no_label_or_attention_crosses_a_boundary() -> None:
    rows = pack_examples(
        [example("a", [5, 6, 7]), example("b", [8, 9]), example("c", [3, 4, 5, 6])], 6
    )
    out = collate(as_batch(rows, packed=True), pad_id=0, packed=True)
    ids, labels, mask = out["input_ids"], out["labels"], out["attention_mask"]
    assert mask.shape == (ids.shape[0], 1, ids.shape[1], ids.shape[1])
    assert mask.dtype == torch.float32
    segments = [r["segment_ids"] + [0] * (ids.shape[1] - len(r["segment_ids"])) for r in rows]
    for b, seg in enumerate(segments):
        for q in range(len(seg)):
            if q > 0 and seg[q] != seg[q - 1]:
                assert labels[b, q] == IGNORE_INDEX  # a segment's first label
            for k in range(len(seg)):
                visible = mask[b, 0, q, k].item() == 0
                if seg[q] == 0:
                    assert visible == (q == k)
                else:
                    assert visible == (seg[q] == seg[k] and k <= q)
    assert out["sample_ids"] == [r["sample_ids"] for r in rows]
    assert out["num_tokens"] == 9


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_logits_equal_running_each_sample_alone(tiny_model_dir: Path, attn: str) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attn).eval()
    samples = [
        example("a", [5, 6, 7, 8, 9]),
        example("b", [11, 12, 13, 14]),
        example("c", [20, 21, 22]),
    ]
    rows = pack_examples(samples, 12)
    assert [r["sample_ids"] for r in rows] == [["a", "b", "c"]]
    # A second, shorter row makes the batch carry padding too.
    rows += pack_examples([example("d", [30, 31])], 12)
    out = collate(as_batch(rows, packed=True), pad_id=3, packed=True)
    with torch.no_grad():
        packed = model(
            input_ids=out["input_ids"],
            attention_mask=out["attention_mask"],
            position_ids=out["position_ids"],
        ).logits
        assert not torch.isnan(packed).any()
        start = 0
        for sample in samples:
            alone = model(input_ids=torch.tensor([sample["input_ids"]])).logits[0]
            n = len(sample["input_ids"])
            torch.testing.assert_close(packed[0, start : start + n], alone, atol=1e-5, rtol=0)
            start += n
        alone_d = model(input_ids=torch.tensor([[30, 31]])).logits[0]
        torch.testing.assert_close(packed[1, :2], alone_d, atol=1e-5, rtol=0)
