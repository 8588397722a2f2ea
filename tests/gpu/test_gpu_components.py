"""rayft's training and serving components on one CUDA GPU, without Ray or DeepSpeed.

Skipped without CUDA. Nothing CUDA-only (flash_attn, bitsandbytes) is imported at
collection: each test that needs one skips itself when it is missing, so the module runs on a
GPU machine that has only torch, transformers and peft.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from rayft.trainers.attention import resolve_attention
from rayft.trainers.loss import IGNORE_INDEX, causal_lm_loss_sums
from rayft.trainers.packing import collate, pack_examples
from rayft.trainers.precision import resolve_dtype

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

SAMPLES = {
    "a": [5, 6, 7, 8, 9, 10, 11],
    "b": [11, 12, 13, 14],
    "c": [20, 21, 22],
    "d": [30, 31, 32, 33, 34],
}


def as_batch(rows: list[dict[str, Any]], packed: bool) -> dict[str, np.ndarray]:
    """Rows as Ray Data hands them to collate_fn: object arrays of arrays per column."""
    names = ["input_ids", "labels", "sample_ids"]
    names += ["position_ids", "segment_ids"] if packed else []
    batch: dict[str, np.ndarray] = {}
    for name in names:
        column = np.empty(len(rows), dtype=object)
        for i, row in enumerate(rows):
            column[i] = np.asarray(row[name])
        batch[name] = column
    batch["num_truncated"] = np.zeros(len(rows), dtype=np.int64)
    batch["num_dropped"] = np.zeros(len(rows), dtype=np.int64)
    return batch


def on(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def unpacked_batch() -> dict[str, Any]:
    rows = [
        {"input_ids": ids, "labels": [IGNORE_INDEX, *ids[1:]], "sample_ids": [name]}
        for name, ids in SAMPLES.items()
    ]
    return collate(as_batch(rows, packed=False), pad_id=0, packed=False)


def packed_rows() -> list[dict[str, Any]]:
    examples = [
        {"input_ids": ids, "labels": list(ids), "sample_id": name} for name, ids in SAMPLES.items()
    ]
    return pack_examples(examples, max_seq_len=12)


def test_auto_picks_bf16_and_the_kernels_this_gpu_has() -> None:
    expected = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    assert resolve_dtype("auto", on_gpu=True) == expected
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        assert resolve_attention("auto") == "sdpa"
    else:
        assert resolve_attention("auto") == "flash_attention_2"


def test_flash_attention_packed_batch_equals_each_sample_alone(tiny_model_dir: Path) -> None:
    pytest.importorskip("flash_attn", reason="flash-attention 2 is not installed")
    from transformers import AutoModelForCausalLM

    device = torch.device("cuda")
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    flash = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, dtype=dtype, attn_implementation="flash_attention_2"
    ).to(device)
    reference = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa"
    ).to(device)
    flash.eval()
    reference.eval()
    flat = collate(as_batch(packed_rows(), packed=True), pad_id=0, packed=True, varlen=True)
    assert "attention_mask" not in flat and flat["input_ids"].shape[0] == 1
    starts = (flat["position_ids"][0] == 0).nonzero().flatten().tolist()
    order = [name for row in flat["sample_ids"] for name in row]
    with torch.no_grad():
        packed = flash(**on({k: flat[k] for k in ("input_ids", "position_ids")}, device)).logits
        # Without restarting positions every sample sees the ones before it.
        leaky = flash(input_ids=flat["input_ids"].to(device)).logits
        alone = [
            (start, reference(input_ids=torch.tensor([SAMPLES[name]], device=device)).logits[0])
            for start, name in zip(starts, order, strict=True)
        ]
        packed_err = max((packed[0, s : s + len(g)].float() - g).abs().max() for s, g in alone)
        leak = max((leaky[0, s : s + len(g)].float() - g).abs().max() for s, g in alone)
        # The samples' loss: the lean loss on the flattened batch equals the padded rows'.
        head = reference.get_output_embeddings()
        expected, count = causal_lm_loss_sums(reference, head, on(unpacked_batch(), device))
        total, got_count = causal_lm_loss_sums(
            flash, flash.get_output_embeddings(), on(flat, device)
        )
    # bf16 rounding is ~0.005 on these logits; a leak between samples moves them by ~0.5.
    assert packed_err < 0.05 < leak, (packed_err, leak)
    assert got_count == count
    assert float(total) == pytest.approx(float(expected), rel=1e-2)


@pytest.mark.parametrize("half", [False, True], ids=["float32", "half"])
def test_sdpa_block_mask_on_cuda_gives_the_unpacked_loss(tiny_model_dir: Path, half: bool) -> None:
    """In float32 and in the GPU's half dtype (where a float32 block mask cast naively
    becomes ``-inf`` and CUDA's fused kernels answer NaN)."""
    from transformers import AutoModelForCausalLM

    device = torch.device("cuda")
    dtype = getattr(torch, resolve_dtype("auto", on_gpu=True)) if half else torch.float32
    model = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, dtype=dtype, attn_implementation="sdpa"
    ).to(device)
    model.eval()
    head = model.get_output_embeddings()
    masked = collate(as_batch(packed_rows(), packed=True), pad_id=0, packed=True)
    with torch.no_grad():
        expected, count = causal_lm_loss_sums(model, head, on(unpacked_batch(), device))
        got, got_count = causal_lm_loss_sums(model, head, on(masked, device))
    assert got_count == count
    assert torch.isfinite(got) and torch.isfinite(expected)
    tolerance = {"atol": 0.05, "rtol": 0.02} if half else {"atol": 1e-4, "rtol": 1e-5}
    torch.testing.assert_close(got, expected, **tolerance)


def test_qlora_steps_lower_the_loss_and_save_a_plain_adapter(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    pytest.importorskip("bitsandbytes", reason="method qlora needs the gpu extra")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from rayft.trainers.config import validate_spec
    from rayft.trainers.methods import prepare_model
    from rayft.trainers.objective import CausalLMObjective

    spec = validate_spec(
        {
            "model": {"name": "tiny-llama"},
            "method": "qlora",
            "lora": {"r": 8},
            "data": {"train": "unused.jsonl"},
            "scaling": {"use_gpu": True},
            "optim": {"gradient_checkpointing": False},
        }
    )
    dtype = resolve_dtype("auto", on_gpu=True)
    objective = CausalLMObjective(spec)
    inputs = SimpleNamespace(model_dir=str(tiny_model_dir), dtype=dtype)
    model = prepare_model(objective.load_model(spec, inputs), spec, None, objective)
    assert any("4bit" in type(m).__name__ for m in model.modules())  # bitsandbytes Linear4bit
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW(trainable, lr=3e-3)
    batch = on(unpacked_batch(), torch.device("cuda"))
    head = model.get_output_embeddings()
    losses = []
    model.train()
    for _ in range(8):
        total, count = causal_lm_loss_sums(model, head, batch)
        (total / count).backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(total) / count)
    assert losses[-1] < losses[0]
    model.save_pretrained(tmp_path / "adapter")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    plain = PeftModel.from_pretrained(base, tmp_path / "adapter")
    assert plain.peft_config["default"].r == 8
    assert torch.isfinite(plain(input_ids=torch.tensor([[1, 2, 3]])).logits).all()


def make_adapter(base_dir: Path, root: Path, name: str, seed: int) -> None:
    """Publish a LoRA adapter with random B matrices (so it changes greedy output) into the
    registry at ``root``, as the registry lays adapters out."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from rayft.trainers.manifest import ArtifactManifest

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_dir),
        LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    generator = torch.Generator().manual_seed(seed)
    for param_name, param in model.named_parameters():
        if "lora_B" in param_name:
            param.data = torch.randn(param.shape, generator=generator) * 0.5
    out = root / "adapters" / name
    model.save_pretrained(out)
    ArtifactManifest(kind="adapter", base_model="tiny-llama").write(out)


def test_serving_two_adapters_in_one_batch_on_cuda(
    tiny_model_dir: Path, rayft_home: Path, tmp_path: Path
) -> None:
    from rayft.serving.engine import BASE_ADAPTER, GenerationRequest, ModelEngine, SamplingParams

    for name, seed in (("g1", 1), ("g2", 2)):
        make_adapter(tiny_model_dir, rayft_home, name, seed)
    auto = ModelEngine("tiny-llama", storage=str(rayft_home), max_loaded_adapters=2)
    assert auto.device.type == "cuda"
    assert auto.dtype == (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    del auto
    # float32 so that a row's greedy tokens do not depend on what it is batched with.
    engine = ModelEngine(
        "tiny-llama", storage=str(rayft_home), max_loaded_adapters=2, dtype="float32"
    )
    params = SamplingParams(max_tokens=10, temperature=0.0)
    prompts = ["hello world", "the quick brown fox", "one two three"]
    requests = [
        GenerationRequest(tuple(engine.tokenizer(p)["input_ids"]), adapter, params)
        for p in prompts
        for adapter in (BASE_ADAPTER, "g1", "g2")
    ]
    alone = [engine.generate([r])[0].token_ids for r in requests]
    together = [out.token_ids for out in engine.generate(requests)]
    assert together == alone
    assert sorted(engine.loaded_adapters()) == ["g1", "g2"]
    by_adapter = {tuple(alone[i]) for i in range(3)}  # one prompt, three models
    assert len(by_adapter) == 3
    assert next(engine.base.parameters()).device.type == "cuda"
