"""Peak memory and time of one LoRA step under each activation-checkpointing policy.

    RAYFT_HOME=/tmp/rfhome .venv/bin/python bench/checkpointing_step.py [--batch-size 4]
        [--max-seq-len 512] [--steps 2] [--variants none,full,selective,...]

Trains ``smollm2-135m-instruct`` with LoRA (r=16, alpha=32, all linear layers, dropout
``--dropout``, default 0 as in ``bench/train_throughput.py``) on one packed batch of
``--batch-size`` rows of ``--max-seq-len`` tokens (rows of ``bench/data/chat_varlen.jsonl``,
rayft's chat tokenization, packing and block-diagonal mask, float32, the lean loss),
AdamW, ``--steps`` optimizer steps. Each variant runs in a fresh process, so its peak
resident set (``VmHWM``) is its own; ``load`` is the peak before the first step (model
and data), ``step`` the time of the last step (the first one warms allocators up).

Variants:
  none       no checkpointing;
  full       ``optim.gradient_checkpointing: true`` (each layer recomputed in backward);
  selective  ``optim.gradient_checkpointing: selective`` (rayft's policy, see
             ``trainers/checkpointing.py``);
  save-all   keep every mm/addmm/bmm and attention output (LoRA's low-rank products too);
  no-resid   rayft's policy, but the outputs of ``o_proj`` and ``down_proj`` (they only
             feed a residual add) are recomputed as well.

Measured on a 2-core CPU machine (2026-12-02, one batch of 1844 real tokens in [4, 508],
peak RSS / last step): none 6893 MiB / 19.1 s, full 3750 / 15.8 s, selective 4797 /
14.8 s, save-all 5667 / 17.7 s, no-resid 4684 / 13.6 s (step times vary by +-20 % between
runs on a shared machine; all five reach the same loss). Keeping LoRA's low-rank products
(save-all) costs 870 MiB for nothing; no-resid saves a further 110 MiB but needs the
weights' identities, so rayft keeps the simpler policy. Much of each figure is memory the
C allocator keeps after tensors are freed: ``malloc_trim(0)`` after the forward pass
lowered the resident set from 2419 to 1123 MiB (full) and from 4130 to 2493 MiB (selective),
but not the peak, which falls in backward: with ``--trim`` the peaks were 4635 (selective) and
2992 MiB (full); without ``aten.bmm`` in the kept set 4877 (selective); with 256-position loss
chunks 4601 (selective) and 3248 (full) - all within this machine's noise of the figures above.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

MODEL = "smollm2-135m-instruct"
DATA = Path(__file__).resolve().parent / "data" / "chat_varlen.jsonl"
VARIANTS = ("none", "full", "selective", "save-all", "no-resid")


def peak_rss_mb() -> float:
    """Peak resident set size of this process (``VmHWM``), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("/proc/self/status has no VmHWM line")


def packed_batch(model_dir: Path, batch_size: int, max_seq_len: int) -> dict[str, Any]:
    """The first ``batch_size`` packed rows of the data file, collated as rayft trains on them."""
    import numpy as np

    from rayft.trainers.data import load_tokenizer
    from rayft.trainers.formats import tokenize_example
    from rayft.trainers.packing import collate, pack_examples

    tokenizer = load_tokenizer(str(model_dir))
    examples = []
    for i, line in enumerate(DATA.read_text(encoding="utf-8").splitlines()):
        example = tokenize_example(json.loads(line), "chat", tokenizer, max_seq_len)
        if example is not None:
            examples.append({**example, "sample_id": str(i)})
        if sum(len(e["input_ids"]) for e in examples) > 2 * batch_size * max_seq_len:
            break
    rows = pack_examples(examples, max_seq_len)[:batch_size]
    columns = {
        key: np.array([r[key] for r in rows], dtype=object)
        for key in ("input_ids", "labels", "position_ids", "segment_ids", "sample_ids")
    }
    columns["num_truncated"] = np.array([r["num_truncated"] for r in rows])
    return collate(columns, tokenizer.pad_token_id or 0, packed=True)


def _no_resid_policy(model: Any) -> Any:
    """rayft's selective policy, except o_proj/down_proj outputs are recomputed too."""
    from torch.utils.checkpoint import CheckpointPolicy

    from rayft.trainers.checkpointing import selective_policy

    base = selective_policy()
    residual = {
        m.weight.data_ptr()
        for name, m in model.named_modules()
        if name.endswith(("o_proj", "down_proj")) and hasattr(m, "weight")
    }

    def policy(ctx, op, *args, **kwargs):
        weight = args[-1] if len(args) >= 2 else None
        if (
            weight is not None
            and getattr(weight, "data_ptr", None)
            and weight.data_ptr() in residual
        ):
            return CheckpointPolicy.PREFER_RECOMPUTE
        return base(ctx, op, *args, **kwargs)

    return policy


def _save_all_policy() -> Any:
    import torch
    from torch.utils.checkpoint import CheckpointPolicy

    from rayft.trainers.checkpointing import _attention_ops

    saved = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}
    saved |= _attention_ops()

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in saved else CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def prepare(model: Any, variant: str, dropout: float) -> Any:
    """Checkpointing per ``variant``, then LoRA, the way ``trainers.methods`` does."""
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    from rayft.trainers.checkpointing import enable_checkpointing
    from rayft.trainers.config import LoraSpec
    from rayft.trainers.methods import apply_lora

    if variant in ("none", "full", "selective"):
        enable_checkpointing(model, {"none": False, "full": True}.get(variant, variant))
    else:
        policy = _save_all_policy() if variant == "save-all" else _no_resid_policy(model)
        context = functools.partial(create_selective_checkpoint_contexts, policy)
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False, "context_fn": context}
        )
    if variant != "none":
        model.enable_input_require_grads()
    lora = LoraSpec(r=16, alpha=32, dropout=dropout, target_modules="all-linear")
    return apply_lora(model, lora).train()


def release_free_memory() -> None:
    """Hand the C allocator's free pages back to the OS (glibc ``malloc_trim(0)``)."""
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)


def run_variant(variant: str, args: argparse.Namespace) -> dict[str, Any]:
    """One variant in this process: load, ``args.steps`` steps, figures."""
    import torch
    from transformers import AutoModelForCausalLM

    from rayft.trainers.loss import causal_lm_loss_sums
    from rayft.trainers.models import resolve_model
    from rayft.trainers.storage import StorageRoot

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    model_dir = resolve_model(MODEL, StorageRoot.resolve().models)
    batch = packed_batch(model_dir, args.batch_size, args.max_seq_len)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="sdpa"
    )
    model = prepare(model, variant, args.dropout)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    tensors = {k: batch[k] for k in ("input_ids", "labels", "attention_mask", "position_ids")}
    load_mb = peak_rss_mb()
    times, losses = [], []
    for _ in range(args.steps):
        start = time.perf_counter()
        total, count = causal_lm_loss_sums(model, model.get_output_embeddings(), tensors)
        if args.trim:
            release_free_memory()
        (total / count).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        losses.append(float(total.detach()) / count)
    return {
        "variant": variant,
        "tokens": batch["num_tokens"],
        "shape": list(batch["input_ids"].shape),
        "load_mb": load_mb,
        "peak_mb": peak_rss_mb(),
        "step_s": times,
        "loss": losses,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-seq-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--trim", action="store_true", help="malloc_trim(0) after forward")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_variant(args.one, args)))
        return
    rows = []
    for variant in args.variants.split(","):
        if variant not in VARIANTS:
            raise SystemExit(f"--variants: unknown variant {variant!r}; choose from {VARIANTS}")
        cmd = (
            [sys.executable, __file__, "--one", variant]
            + [
                f"--batch-size={args.batch_size}",
                f"--max-seq-len={args.max_seq_len}",
                f"--steps={args.steps}",
                f"--dropout={args.dropout}",
            ]
            + (["--trim"] if args.trim else [])
        )
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        r = rows[-1]
        print(
            f"{variant:<10} shape {r['shape']} ({r['tokens']} tokens)  peak {r['peak_mb']:7.0f} MiB "
            f"(after load {r['load_mb']:.0f})  last step {r['step_s'][-1]:6.2f} s  "
            f"steps {[round(s, 2) for s in r['step_s']]}  loss {[round(x, 5) for x in r['loss']]}",
            flush=True,
        )
    if rows[0]["variant"] == "none":
        ref = rows[0]
        for r in rows[1:]:
            print(
                f"{r['variant']:<10} peak x{r['peak_mb'] / ref['peak_mb']:.2f}, "
                f"step time x{r['step_s'][-1] / ref['step_s'][-1]:.2f} of no checkpointing"
            )


if __name__ == "__main__":
    main()
