"""Training defaults per method, chosen by evidence, and how the effective batch is split.

A spec that names only a model, data and an output trains with these values; any value
the user sets wins (``trainers.config.resolve_defaults`` applies them to the fields left
unset). Pure functions of a few names and numbers: ``trainers.config`` imports this
module, never the other way round.

The evidence is of two kinds. Published: the LoRA paper's (Hu et al. 2021) and the
QLoRA paper's (Dettmers et al. 2023) settings, rank-stabilised LoRA (Kalajdzievski 2023),
"LoRA Without Regret" (Schulman et al., Thinking Machines 2025: the best LoRA learning
rate is about ten times full fine-tuning's, rank hardly moves it, LoRA on every linear
layer is better than attention only, and LoRA pays for large batches), "LoRA Learns Less
and Forgets Less" (Biderman et al. 2024), DPO (Rafailov et al. 2023), Zephyr (Tunstall
et al. 2023), and the shipped recipes of TRL, Axolotl, Unsloth and LLaMA-Factory.
Measured: ``bench/defaults_quality.py`` trains SmolLM2-135M-Instruct on three tasks
rayft builds (extraction, short factual recall, format following) and scores held-out
loss; its ``--sweep`` trains the candidate values (see each constant for what they gave).
"""

from __future__ import annotations

import math

LORA_LR = 1e-3
"""Peak learning rate of LoRA and QLoRA (supervised and classification objectives).

Ten times the 1e-4 that small-model full fine-tuning tolerates, the ratio "LoRA Without
Regret" measured across model sizes (and tinker-cookbook's ``get_lr`` gives 1.3e-3 for a
576-wide Llama-architecture model like SmolLM2-135M, 2.9e-4 for an 8B). TRL, Unsloth and
Axolotl ship 2e-4 and LLaMA-Factory 1e-4: safe for 7B+ models, but slow on small ones.
``bench/defaults_quality.py --sweep`` (160 train rows per task, batch 8, 1 epoch; held-out
loss as a ratio to TRL's documented 2e-4, for extract / recall / format): 1e-3 gave
0.156 / 0.855 / 0.356, 2e-3 gave 0.062 / 0.988 / 0.338. 2e-3 fits the two format tasks a
little better but gives back nearly all of the recall task's gain (it overwrites what the
model knew), so 1e-3: the best worst case. For 7B+ models set ``optim.lr`` to 2e-4..3e-4."""

FULL_LR = 2e-5
"""Peak learning rate of ``method: full`` and ``freeze`` (supervised, classification).

The common full fine-tuning rate: Alpaca, Zephyr's SFT stage and LLaMA-Factory's full and
freeze recipes use 1e-5..2e-5; "LoRA Without Regret" puts LoRA's best rate about 10x
above full fine-tuning's. Full fine-tuning updates every weight, so too high a rate costs
more (forgetting, loss spikes) than too low a one."""

DPO_LORA_LR = 5e-6
"""Peak learning rate of DPO with LoRA: LLaMA-Factory's LoRA DPO recipes (5e-6), about
ten times the full-weight DPO rate below, as for supervised fine-tuning. A supervised
rate (1e-4+) drives the policy far from its reference within a few steps."""

DPO_FULL_LR = 5e-7
"""Peak learning rate of DPO on every weight: Zephyr's DPO stage (5e-7); TRL's
``DPOConfig`` ships 1e-6."""

DPO_BETA = 0.1
"""DPO's KL strength: the DPO paper's value for most tasks, TRL's and LLaMA-Factory's
default. Smaller (Zephyr used 0.01) lets the policy move further from the reference."""

GRPO_LORA_LR = 1e-5
"""Peak learning rate of GRPO with LoRA: TRL's LoRA GRPO examples (1e-5), ten times its
``GRPOConfig`` full-weight rate below, as for the other objectives. Sampled answers move
with every step, so a supervised rate makes the policy collapse onto one answer."""

GRPO_FULL_LR = 1e-6
"""Peak learning rate of GRPO on every weight: TRL's ``GRPOConfig`` default."""

LORA_RANK = 16
"""LoRA rank. With rank-stabilised scaling the rank no longer changes the update's size,
and on small data rank hardly matters ("LoRA Without Regret"); 16 is TRL's, Unsloth's
and the QLoRA paper's. Not swept here: the tasks are small, where the literature finds
rank does not matter once the learning rate is right. Raise it for large datasets (its
parameters should not be far fewer than the answer tokens)."""

RSLORA_ALPHA = 8.0
"""``lora.alpha`` under rank-stabilised scaling (``alpha / sqrt(r)``; Kalajdzievski 2023):
8 makes rank 16's scale 2, the same as the classic ``alpha 32 / r 16`` that TRL, PEFT's
examples and the learning rate above were measured with, and keeps it from shrinking as
the rank grows (rank 64: 1.0 against 0.5 with ``alpha / r``)."""

CLASSIC_ALPHA_PER_RANK = 2.0
"""``lora.alpha = 2 r`` when ``lora.use_rslora`` is set false: the usual convention."""

EFFECTIVE_BATCH = 8
"""Examples per optimizer step, over all workers, when neither ``optim.batch_size`` nor
``optim.grad_accum`` is set. TRL's documented LoRA batch and LLaMA-Factory's recipes
(1 x 8 accumulation) use 8. "LoRA Without Regret" finds LoRA loses more than full
fine-tuning as the batch grows, and small datasets need the steps. Measured
(``bench/defaults_quality.py --sweep``, lr 1e-3, held-out loss as a ratio to TRL's, for
extract / recall / format): batch 16, half the steps on the same tokens, gave
0.469 / 0.877 / 0.672 against batch 8's 0.156 / 0.855 / 0.356. It is also the batch the
existing explicit specs already ran: one worker at 8 per step, two at 4 each, never more
work per step than before."""

MICRO_BATCH = 8
"""The largest per-worker micro-batch chosen when the effective batch is split."""

WARMUP_RATIO = 0.03
"""Warm-up fraction (Alpaca's and the QLoRA paper's 0.03) before a cosine decay to 0."""


def default_lr(objective: str, method: str) -> float:
    """The peak learning rate for an objective trained by a method.

    Args:
        objective: ``sft``, ``dpo``, ``classification`` or ``grpo``.
        method: ``lora``, ``qlora``, ``full`` or ``freeze``.
    """
    adapter = method in ("lora", "qlora")
    if objective == "dpo":
        return DPO_LORA_LR if adapter else DPO_FULL_LR
    if objective == "grpo":
        return GRPO_LORA_LR if adapter else GRPO_FULL_LR
    return LORA_LR if adapter else FULL_LR


def lora_alpha(r: int, use_rslora: bool) -> float:
    """The default ``lora.alpha`` for rank ``r`` under the chosen scaling."""
    return RSLORA_ALPHA if use_rslora else CLASSIC_ALPHA_PER_RANK * r


def split_batch(
    effective: int,
    workers: int,
    batch_size: int | None = None,
    grad_accum: int | None = None,
) -> tuple[int, int]:
    """``(batch_size, grad_accum)`` per worker giving ``effective`` examples per step.

    Each worker takes ``ceil(effective / workers)`` examples a step, so 1, 2 or 4 workers
    take the same number of optimizer steps per epoch. A given ``batch_size`` or
    ``grad_accum`` is kept and the other derived; with neither, the micro-batch is at
    most :data:`MICRO_BATCH` and accumulation makes up the rest. When ``effective`` does
    not divide evenly the step rounds up (an effective batch of 16 on 3 workers is 18);
    with more workers than ``effective`` each takes one example.

    Args:
        effective: Examples per optimizer step over all workers.
        workers: Data-parallel workers.
        batch_size: The micro-batch, if given.
        grad_accum: Micro-batches per step, if given.
    """
    per_worker = max(1, math.ceil(effective / workers))
    if batch_size is not None and grad_accum is not None:
        return batch_size, grad_accum
    if batch_size is not None:
        return batch_size, max(1, math.ceil(per_worker / batch_size))
    if grad_accum is not None:
        return max(1, math.ceil(per_worker / grad_accum)), grad_accum
    accum = math.ceil(per_worker / MICRO_BATCH)
    return math.ceil(per_worker / accum), accum


VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The ranks vLLM takes for ``--max-lora-rank``: a vLLM engine rounds its own up to one
(``serving.vllm_engine.lora_rank_slot``), and a GRPO run sampling on vLLM trains at most
the last."""
