"""rayft's training components on one device: packing, the lean loss, a LoRA step's MFU.

    python bench/gpu_components.py [--shape {1b,tiny}] [--attn {auto,sdpa,eager,flash_attention_2}]
        [--rows 8] [--seq-len 1024] [--steps 10] [--peak-tflops T] [--device cuda|cpu]
        [--pad-to-longest] [--compile] [--profile] [--json OUT]

    python bench/gpu_components.py --shape tiny      # a CPU smoke run, seconds

Needs only torch, transformers and peft: no Ray, DeepSpeed, vLLM, network or hub. The
model is built from a config with random weights (``--shape 1b``, the default: a Llama 3.2
1B shape, 1.24B parameters; ``tiny``: a 2-layer Llama of 0.1M). rayft is imported from
this source tree when it is not installed. On CUDA it computes in bfloat16 where the GPU
has it (float16 elsewhere) with ``--attn auto``'s kernels (flash-attention 2 where
``flash_attn`` is installed, else SDPA); on CPU in float32 with SDPA.

Three checks, each on the same random token samples (lengths ``seq_len/8 .. seq_len/2``),
then a measurement:

1. packing: the samples packed into rows by ``trainers.packing.pack_examples`` and collated
   as training collates them (flattened with restarting ``position_ids`` and no mask under
   flash-attention 2, the 4-D block-diagonal mask elsewhere) give the loss of the same
   samples as ordinary padded rows, and each sample's final hidden states match its
   unpacked ones far more closely than when the packing information is dropped (the
   "leak" figure: what attending across samples would change);
2. the lean loss: ``trainers.loss.causal_lm_loss_sums`` (the head on labelled positions
   only, a chunk at a time, recomputed in backward) against the full-logits reference
   ``token_loss_sums``: the loss, the gradient of the final norm, and the peak memory of
   a forward + backward of each (CUDA);
3. (measurement) LoRA (rayft's defaults: rank 16, rank-stabilised alpha 8, all linear
   layers; its weights in the compute dtype, as DeepSpeed's bf16 engine holds them) AdamW
   steps on packed rows padded to ``--seq-len`` as a CUDA worker pads them (each batch's
   longest row with ``--pad-to-longest``): real tokens/s over steps 3..N, and MFU: model FLOPs
   ``6 * N * tokens/s`` (N: the base model's parameters, the input embedding left out
   unless it is tied to the head) over the GPU's dense bf16 peak (``PEAK_TFLOPS`` by
   device name, or ``--peak-tflops``). 6N is the full fine-tuning convention; a LoRA step
   computes no weight gradients of the frozen base (~4N), so its MFU by this count reads as
   if the work were full training, which keeps figures comparable across methods. ``n/a``
   on CPU.

Prints one JSON summary (also to ``--json``); exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]

PEAK_TFLOPS = (
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("H800", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("RTX 4090", 165.0),
)
"""Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) by a substring of the device name;
the first match wins, so the longer names come first."""

SHAPES: dict[str, dict[str, Any]] = {
    "1b": {
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "tie_word_embeddings": True,
        "max_position_embeddings": 8192,
        "rope_theta": 500000.0,
    },
    "tiny": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 512,
        "tie_word_embeddings": False,
        "max_position_embeddings": 1024,
    },
}


def import_rayft() -> None:
    """Make ``rayft`` importable: the installed package, else this source tree (whose root is
    the package), without running anything but its light ``__init__``."""
    if importlib.util.find_spec("rayft") is not None:
        return
    spec = importlib.util.spec_from_file_location(
        "rayft", ROOT / "__init__.py", submodule_search_locations=[str(ROOT)]
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["rayft"] = module
    spec.loader.exec_module(module)


import_rayft()

from rayft.trainers import defaults  # noqa: E402
from rayft.trainers.attention import resolve_attention, uses_varlen_packing  # noqa: E402
from rayft.trainers.loss import (  # noqa: E402
    IGNORE_INDEX,
    causal_lm_loss_sums,
    token_loss_sums,
)
from rayft.trainers.packing import collate, pack_examples  # noqa: E402

HEAVY_AFTER_RAYFT = sorted(m for m in ("ray", "deepspeed", "vllm") if m in sys.modules)
"""What rayft's training components pulled in at import (must be nothing)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    parser.add_argument(
        "--attn", choices=["auto", "sdpa", "eager", "flash_attention_2"], default="auto"
    )
    parser.add_argument("--rows", type=int, default=None, help="packed rows per step")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per packed row")
    parser.add_argument("--steps", type=int, default=10, help="LoRA steps (2 are warm-up)")
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the summary here")
    parser.add_argument(
        "--pad-to-longest",
        action="store_true",
        help="pad packed rows to each batch's longest row rather than to --seq-len as training "
        "does (a new batch shape at most steps: cuDNN's attention plans each shape anew)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the LoRA model for the measured steps (model.compile: true); the "
        "first steps, not timed, compile it",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="profile one more LoRA step after the timed ones: the kernels that took the "
        "most device time, and the step's device time against its wall time",
    )
    args = parser.parse_args(argv)
    tiny = args.shape == "tiny"
    args.rows = args.rows or (4 if tiny else 8)
    args.seq_len = args.seq_len or (128 if tiny else 1024)
    args.steps = max(args.steps, 3)
    return args


def compute_dtype(device: torch.device) -> torch.dtype:
    """``model.dtype: auto`` as rayft resolves it (``trainers.precision.resolve_dtype``, which
    needs the spec's pydantic models): bf16 on GPUs that have it, fp16 on other GPUs, fp32
    on CPUs."""
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def build_model(shape: str, device: torch.device, dtype: torch.dtype, attn: str) -> Any:
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**SHAPES[shape])
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
    return model


def model_params(model: Any) -> int:
    """N of 6N: every parameter but an untied input embedding (a lookup, no FLOPs)."""
    total = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    return total if embedding is head else total - embedding.numel()


def samples(seq_len: int, seed: int, vocab: int, count: int) -> list[dict[str, Any]]:
    """``count`` random token samples of ``seq_len/8 .. seq_len/2`` tokens, every token
    labelled."""
    rng = np.random.default_rng(seed)
    low, high = max(seq_len // 8, 4), max(seq_len // 2, 8)
    out = []
    for i in range(count):
        ids = rng.integers(3, vocab, size=int(rng.integers(low, high + 1))).tolist()
        out.append({"input_ids": ids, "labels": list(ids), "sample_id": f"s{i}"})
    return out


def as_batch(rows: list[dict[str, Any]], packed: bool) -> dict[str, np.ndarray]:
    """Rows as Ray Data hands them to the collate function: object arrays per column."""
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


def unpacked_rows(examples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each sample as its own row, its first label ignored as packing ignores it."""
    return [
        {
            "input_ids": e["input_ids"],
            "labels": [IGNORE_INDEX, *e["labels"][1:]],
            "sample_ids": [e["sample_id"]],
        }
        for e in examples
    ]


def on(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def final_hidden(model: Any, batch: dict[str, Any]) -> torch.Tensor:
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch.get("attention_mask"),
        position_ids=batch.get("position_ids"),
        use_cache=False,
        output_hidden_states=True,
        logits_to_keep=1,
    )
    return out.hidden_states[-1]


def check_packing(model: Any, examples: list[dict[str, Any]], args: Any, varlen: bool) -> dict:
    """Check 1: packed rows give the unpacked samples' loss and hidden states."""
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    head = model.get_output_embeddings()
    plain = on(collate(as_batch(unpacked_rows(examples), False), 0, packed=False), device)
    rows = pack_examples(examples, args.seq_len)
    packed = on(collate(as_batch(rows, True), 0, packed=True, varlen=varlen), device)
    lengths = {e["sample_id"]: len(e["input_ids"]) for e in examples}
    with torch.no_grad():
        expected, count = causal_lm_loss_sums(model, head, plain)
        got, got_count = causal_lm_loss_sums(model, head, packed)
        hidden_plain = final_hidden(model, plain)
        hidden_packed = final_hidden(model, packed)
        # The same packed tokens with the packing information dropped: one causal sequence
        # per row, positions counting on, so every sample sees the ones before it.
        # (Padding is on the right, so a causal mask keeps it from the real tokens.)
        hidden_leak = final_hidden(model, {"input_ids": packed["input_ids"]})
    packed_err, leak_err = 0.0, 0.0
    names = [e["sample_id"] for e in examples]
    offsets = packed_offsets(packed, lengths)
    for i, name in enumerate(names):
        n = lengths[name]
        row, start = offsets[name]
        ref = hidden_plain[i, :n].float()
        packed_err = max(
            packed_err, float((hidden_packed[row, start : start + n].float() - ref).abs().max())
        )
        leak_err = max(
            leak_err, float((hidden_leak[row, start : start + n].float() - ref).abs().max())
        )
    half = dtype != torch.float32
    loss_rel = abs(float(got) - float(expected)) / abs(float(expected))
    tolerance = 5e-3 if half else 1e-5
    return {
        "path": "flattened, position_ids restart, no mask" if varlen else "4-D block mask",
        "samples": len(examples),
        "rows": len(rows),
        "label_tokens": count,
        "loss_unpacked": float(expected) / count,
        "loss_packed": float(got) / max(got_count, 1),
        "loss_rel_diff": loss_rel,
        "loss_tolerance": tolerance,
        "hidden_max_abs_diff": packed_err,
        "hidden_leak_max_abs_diff": leak_err,
        "ok": got_count == count and loss_rel <= tolerance and packed_err < 0.25 * leak_err,
    }


def packed_offsets(batch: dict[str, Any], lengths: dict[str, int]) -> dict[str, tuple[int, int]]:
    """Each sample's (row, first position) in a collated packed batch: samples follow each
    other in ``sample_ids`` order; a flattened batch's rows follow each other in row 0."""
    flattened = batch["input_ids"].shape[0] == 1 and len(batch["sample_ids"]) > 1
    offsets, flat_at = {}, 0
    for r, names in enumerate(batch["sample_ids"]):
        at = flat_at if flattened else 0
        for name in names:
            offsets[name] = (0 if flattened else r, at)
            at += lengths[name]
        flat_at = at if flattened else 0
    return offsets


def peak_memory(device: torch.device) -> int | None:
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def check_lean_loss(model: Any, examples: list[dict[str, Any]]) -> dict:
    """Check 2: the lean loss and its gradient equal the full-logits reference."""
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    batch = on(collate(as_batch(unpacked_rows(examples), False), 0, packed=False), device)
    norm = model.model.norm.weight
    model.zero_grad(set_to_none=True)

    reset_peak(device)
    lean, count = causal_lm_loss_sums(model, model.get_output_embeddings(), batch)
    (lean / count).backward()
    lean_peak = peak_memory(device)
    lean_grad = norm.grad.detach().float().clone()
    model.zero_grad(set_to_none=True)

    reset_peak(device)
    logits = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        use_cache=False,
    ).logits
    full, full_count = token_loss_sums(logits, batch["labels"])
    (full / full_count).backward()
    full_peak = peak_memory(device)
    full_grad = norm.grad.detach().float().clone()
    model.zero_grad(set_to_none=True)
    del logits

    half = dtype != torch.float32
    lean_value, full_value = float(lean.detach()), float(full.detach())
    loss_rel = abs(lean_value - full_value) / abs(full_value)
    grad_rel = float((lean_grad - full_grad).norm() / full_grad.norm().clamp_min(1e-12))
    loss_tol, grad_tol = (2e-3, 3e-2) if half else (1e-5, 1e-4)
    return {
        "label_tokens": count,
        "loss_lean": lean_value / count,
        "loss_full_logits": full_value / full_count,
        "loss_rel_diff": loss_rel,
        "final_norm_grad_rel_diff": grad_rel,
        "tolerances": {"loss": loss_tol, "grad": grad_tol},
        "peak_bytes_lean": lean_peak,
        "peak_bytes_full_logits": full_peak,
        "ok": count == full_count and loss_rel <= loss_tol and grad_rel <= grad_tol,
    }


def peak_tflops(device: torch.device, override: float | None) -> tuple[float | None, str]:
    if override is not None:
        return override, "--peak-tflops"
    if device.type != "cuda":
        return None, "cpu"
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_TFLOPS:
        if key in name:
            return tflops, name
    return None, f"{name} (not in PEAK_TFLOPS; give --peak-tflops)"


def lora_throughput(model: Any, args: argparse.Namespace, varlen: bool) -> dict:
    """Measurement: LoRA AdamW steps on packed rows, tokens/s and MFU."""
    from peft import LoraConfig, get_peft_model

    device = next(model.parameters()).device
    n_params = model_params(model)
    config = LoraConfig(
        r=defaults.LORA_RANK,
        lora_alpha=defaults.RSLORA_ALPHA,
        use_rslora=True,
        lora_dropout=0.0,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    # In the compute dtype, as DeepSpeed's bf16/fp16 engine holds them in training (PEFT's
    # default would keep adapter weights in float32 and cast every LoRA input up).
    peft_model = get_peft_model(model, config, autocast_adapter_dtype=False)
    peft_model.train()
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    head = peft_model.get_output_embeddings()
    forward = torch.compile(peft_model, dynamic=False) if args.compile else peft_model
    batches = []
    for step in range(args.steps):
        examples = samples(args.seq_len, 1000 + step, model.config.vocab_size, 4 * args.rows)
        rows = pack_examples(examples, args.seq_len)[: args.rows]
        width = None if args.pad_to_longest else args.seq_len
        batch = collate(as_batch(rows, True), 0, packed=True, varlen=varlen, width=width)
        batches.append(on(batch, device))
    losses, timed_tokens, started = [], 0, 0.0
    reset_peak(device)
    for step, batch in enumerate(batches):
        if step == 2:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            started = time.perf_counter()
        total, count = causal_lm_loss_sums(forward, head, batch)
        (total / count).backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(total.detach()) / count)  # waits for the step to finish
        if step >= 2:
            timed_tokens += batch["num_tokens"]
    elapsed = time.perf_counter() - started
    tokens_per_s = timed_tokens / elapsed
    peak, source = peak_tflops(device, args.peak_tflops)
    mfu = 6 * n_params * tokens_per_s / (peak * 1e12) if peak else None
    return {
        "params_N": n_params,
        "trainable_params": sum(p.numel() for p in trainable),
        "rows_per_step": args.rows,
        "compiled": args.compile,
        "shapes": sorted({tuple(b["input_ids"].shape) for b in batches}),
        "tokens_per_step": round(timed_tokens / (args.steps - 2)),
        "timed_steps": args.steps - 2,
        "seconds": round(elapsed, 3),
        "tokens_per_s": round(tokens_per_s, 1),
        "peak_tflops": peak,
        "peak_from": source,
        "mfu": round(mfu, 4) if mfu is not None else "n/a",
        "peak_bytes": peak_memory(device),
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "ok": all(math.isfinite(x) for x in losses),
        **(
            {"profile": profile_step(forward, head, trainable, batches[-1])} if args.profile else {}
        ),
    }


def profile_step(model: Any, head: Any, trainable: list[Any], batch: dict[str, Any]) -> dict:
    """One more LoRA step under ``torch.profiler``: the 12 kernels (or CPU ops, without
    CUDA) with the most self time, and the step's busy device time against its wall time
    (a ratio far below 1 means the step waits on the host: launches, Python, copies)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available() and batch["input_ids"].is_cuda
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        started = time.perf_counter()
        total, count = causal_lm_loss_sums(model, head, batch)
        (total / count).backward()
        for param in trainable:
            param.grad = None
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - started
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    # Device time counted once: the kernels themselves, not also the aten ops that launched
    # them (an op's self device time is its kernels' time).
    kind = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    events = [e for e in prof.key_averages() if not cuda or e.device_type == kind]
    top = sorted(events, key=lambda e: getattr(e, key, 0.0), reverse=True)[:12]
    busy = sum(getattr(e, key, 0.0) for e in events) / 1e6
    return {
        "wall_s": round(wall, 4),
        "busy_s": round(busy, 4),
        "busy_over_wall": round(busy / wall, 3) if wall else None,
        "top": [
            {"name": e.key[:90], "calls": e.count, "self_s": round(getattr(e, key, 0.0) / 1e6, 4)}
            for e in top
        ],
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    dtype = compute_dtype(device)
    # rayft's resolution looks at this process: flash-attention needs CUDA and flash_attn.
    try:
        attn = (
            resolve_attention(args.attn) if device.type == "cuda" or args.attn != "auto" else "sdpa"
        )
    except ValueError as err:
        print(f"gpu_components: --attn {args.attn}: {err}", file=sys.stderr)
        return 2
    varlen = uses_varlen_packing(attn, packed=True)
    model = build_model(args.shape, device, dtype, attn)
    examples = samples(args.seq_len, args.seed, model.config.vocab_size, 2 * args.rows)
    summary: dict[str, Any] = {
        "shape": args.shape,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "attn_implementation": attn,
        "versions": {"torch": torch.__version__, **versions()},
        "rayft_imported": sorted(m for m in sys.modules if m.startswith("rayft.trainers.")),
        "heavy_modules_pulled_by_rayft": HEAVY_AFTER_RAYFT,
    }
    model.eval()
    summary["packing"] = check_packing(model, examples, args, varlen)
    model.train()
    summary["lean_loss"] = check_lean_loss(model, examples[: args.rows])
    summary["lora_step"] = lora_throughput(model, args, varlen)
    summary["seconds_total"] = round(time.perf_counter() - started, 1)
    checks = ("packing", "lean_loss", "lora_step")
    summary["ok"] = not HEAVY_AFTER_RAYFT and all(summary[c]["ok"] for c in checks)
    text = json.dumps(summary, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")
    return 0 if summary["ok"] else 1


def versions() -> dict[str, str]:
    import peft
    import transformers

    return {"transformers": transformers.__version__, "peft": peft.__version__}


if __name__ == "__main__":
    sys.exit(main())
