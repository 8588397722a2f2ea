"""The causal-LM loss, computed the same way for training, evaluation and serving.

Position ``t`` predicts ``labels[t + 1]``, as in Hugging Face causal LMs, and positions
labelled :data:`IGNORE_INDEX` carry no loss. :func:`causal_lm_loss_sums` is the one
loss of rayft: the training loop, its evaluation and ``POST /v1/evaluations``
(``serving.engine.ModelEngine.score``) all call it, so a served adapter scores the rows it
was trained on exactly as training did.

It is lean: the language-model head and the cross-entropy run only on the positions
that carry a label, a chunk of positions at a time, and (with autograd on) each chunk's
logits are recomputed in the backward pass instead of being kept. No
``[batch, seq, vocab]`` float32 logits tensor is ever built; for a 49k-token vocabulary
that tensor is ~85 times the size of the hidden states it comes from.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from rayft.trainers.formats import IGNORE_INDEX

CHUNK_POSITIONS = 256
"""Labelled positions per head + cross-entropy chunk: ``256 x vocab`` float32 logits at most
(50 MB for a 49k vocabulary). Smaller chunks than 1024 measured both leaner (the chunk's
logits, their softmax and gradient are the largest transient tensors of a step: ~0.45 GB
less at the peak) and faster on CPU (~12 % a step on glibc, the same on jemalloc)."""

PERPLEXITY_LOSS_CAP = 50.0
"""Losses above this report ``exp(50)`` (~5e21) as perplexity: a diverged model gets a large,
finite number that JSON, TensorBoard and Tune schedulers all accept (``inf`` is not JSON)."""


def perplexity(loss: float) -> float:
    """``exp(loss)``, capped at ``exp(PERPLEXITY_LOSS_CAP)`` so it stays finite.

    NaN stays NaN (a diverged run must not look like a good one).
    """
    return math.exp(min(loss, PERPLEXITY_LOSS_CAP))


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """The label each position predicts: ``labels[:, t + 1]``, ``IGNORE_INDEX`` at the end.

    The labels are shifted rather than the logits or hidden states, so nothing of size
    ``[batch, seq, hidden]`` or larger is copied.
    """
    return torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]


def token_loss_sums(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy of full ``[batch, seq, vocab]`` logits, and its count.

    The reference form of the loss (it needs every position's logits); training and
    serving use :func:`causal_lm_loss_sums`, which equals it without building them.
    """
    targets = shifted_targets(labels)
    total = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return total, int((targets != IGNORE_INDEX).sum())


def _chunk_loss(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()
    return torch.nn.functional.cross_entropy(logits, targets, reduction="sum")


def head_loss_sums(
    head: nn.Module,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    chunk_positions: int = CHUNK_POSITIONS,
) -> tuple[torch.Tensor, int]:
    """Cross-entropy of ``head`` applied to the labelled positions of ``hidden`` only.

    Args:
        head: The output projection (``model.get_output_embeddings()``; may be wrapped,
            e.g. by PEFT or DeepSpeed ZeRO-3 hooks: it is only ever called).
        hidden: Final hidden states ``[batch, seq, hidden]`` (after the last norm).
        labels: ``[batch, seq]`` labels, unshifted, ``IGNORE_INDEX`` where no loss is taken.
        chunk_positions: Labelled positions per head call.

    Returns:
        The summed loss in nats (float32, differentiable) and the number of labelled positions.
    """
    targets = shifted_targets(labels.to(hidden.device))
    keep = targets != IGNORE_INDEX
    picked, wanted = hidden[keep], targets[keep]
    count = int(wanted.numel())
    # Keeps every parameter of the head in the graph even with nothing to predict, so
    # data-parallel workers reduce the same gradients in the same order (ZeRO's hooks).
    total = hidden[:, :1, :1].float().sum() * 0.0
    remember = torch.is_grad_enabled() and hidden.requires_grad
    for start in range(0, count, chunk_positions):
        h, t = picked[start : start + chunk_positions], wanted[start : start + chunk_positions]
        if remember:
            # The chunk's logits are recomputed in backward rather than kept.
            total = total + checkpoint(_chunk_loss, head, h, t, use_reentrant=False)
        else:
            total = total + _chunk_loss(head, h, t)
    return total, count


def mask_in_dtype(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A 4-D additive attention mask (the packing block mask) in the model's compute dtype.

    Collate builds the block mask in float32 on the CPU, before the dtype is known. Cast as
    is, float32's minimum overflows to ``-inf`` in bfloat16 and float16, and a fused
    attention kernel that meets a block of keys all at ``-inf`` computes ``-inf - -inf``
    (NaN) in its running softmax. So the blocked entries are set to the compute dtype's own
    finite minimum, as Hugging Face's masks are. 2-D 0/1 masks pass through unchanged.
    """
    if mask is None or mask.dim() != 4 or not mask.is_floating_point() or mask.dtype == dtype:
        return mask
    out = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    return out.masked_fill_(mask < 0, torch.finfo(dtype).min)


def hidden_states_forward(
    forward: Callable[..., Any], head: nn.Module, batch: dict[str, torch.Tensor]
) -> Any:
    """The model's output with every layer's hidden states; its own head runs on the last
    position only (a ``[batch, 1, vocab]`` tensor), the lean head does the rest. A packing
    mask reaches the model in the dtype of its weights (:func:`mask_in_dtype`)."""
    return forward(
        input_ids=batch["input_ids"],
        attention_mask=mask_in_dtype(batch.get("attention_mask"), next(head.parameters()).dtype),
        position_ids=batch.get("position_ids"),
        use_cache=False,
        output_hidden_states=True,
        logits_to_keep=1,
    )


def causal_lm_loss_sums(
    forward: Callable[..., Any],
    head: nn.Module,
    batch: dict[str, torch.Tensor],
    chunk_positions: int = CHUNK_POSITIONS,
) -> tuple[torch.Tensor, int]:
    """Summed next-token loss of a causal LM over the labelled positions of ``batch``.

    Args:
        forward: Calls the model (a Hugging Face causal LM, a PEFT model or a DeepSpeed
            engine around either) with keyword inputs and returns its output.
        head: The model's output projection (``get_output_embeddings()``).
        batch: ``input_ids`` and ``labels`` ``[batch, seq]``, optionally ``attention_mask``
            (2-D, or a 4-D packing mask) and ``position_ids``.
        chunk_positions: Labelled positions per head + cross-entropy chunk.

    Returns:
        The summed loss in nats (a float32 tensor, differentiable when autograd is on) and
        the number of labelled positions. ``total / count`` equals Hugging Face's own
        ``loss`` for the same ``labels``.
    """
    out = hidden_states_forward(forward, head, batch)
    total, count = head_loss_sums(head, out.hidden_states[-1], batch["labels"], chunk_positions)
    # The last-position logits join the graph at zero weight, so the head's forward inside
    # the model has a backward too (ZeRO-3 releases what it gathered there).
    return total + out.logits[..., :1].float().sum() * 0.0, count


def _chunk_logps(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()
    return -torch.nn.functional.cross_entropy(logits, targets, reduction="none")


def sequence_logps(
    forward: Callable[..., Any],
    head: nn.Module,
    batch: dict[str, torch.Tensor],
    chunk_positions: int = CHUNK_POSITIONS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence log-probability of the labelled tokens, ``sum_t log p(labels[t] | <t)``.

    The same lean head as :func:`causal_lm_loss_sums`: the head runs on labelled
    positions only, a chunk at a time, recomputed in backward; no ``[batch, seq, vocab]``
    logits are built. DPO compares these sums between a policy and its reference.

    Args:
        forward: Calls the model (HF causal LM, PEFT model or DeepSpeed engine).
        head: The model's output projection (``get_output_embeddings()``).
        batch: ``input_ids``, ``labels`` ``[batch, seq]``, optionally ``attention_mask``
            and ``position_ids``.
        chunk_positions: Labelled positions per head call.

    Returns:
        ``logps`` ``[batch]`` float32 (differentiable when autograd is on; 0 for a row
        without labels) and ``counts`` ``[batch]`` long, the labelled positions per row.
    """
    out = hidden_states_forward(forward, head, batch)
    hidden = out.hidden_states[-1]
    targets = shifted_targets(batch["labels"].to(hidden.device))
    keep = targets != IGNORE_INDEX
    rows = torch.arange(hidden.size(0), device=hidden.device)[:, None].expand_as(targets)[keep]
    picked, wanted = hidden[keep], targets[keep]
    # Zero-weight terms keep the head and the model's own last-position logits in the
    # graph with nothing labelled (ZeRO's hooks need every rank to reduce the same grads).
    zero = hidden[:, :1, :1].float().sum() * 0.0 + out.logits[..., :1].float().sum() * 0.0
    logps = torch.zeros(hidden.size(0), dtype=torch.float32, device=hidden.device) + zero
    remember = torch.is_grad_enabled() and hidden.requires_grad
    for start in range(0, int(wanted.numel()), chunk_positions):
        end = start + chunk_positions
        h, t = picked[start:end], wanted[start:end]
        if remember:
            part = checkpoint(_chunk_logps, head, h, t, use_reentrant=False)
        else:
            part = _chunk_logps(head, h, t)
        logps = logps.index_add(0, rows[start:end], part)
    return logps, keep.sum(dim=1)
