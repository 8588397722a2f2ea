"""Activation checkpointing of a causal LM's decoder layers: full or selective recompute.

``optim.gradient_checkpointing`` picks one of three modes:

* ``False``: every activation the backward pass needs is kept (fastest, most memory);
* ``True``: full recompute, each decoder layer keeps only its input and runs its
  forward again during backward (least memory, one extra forward per step);
* ``"selective"``: PyTorch's selective activation checkpointing. Inside each layer the
  outputs of the expensive operations (dense matrix products and attention) are kept
  and everything cheap and elementwise (norms, SiLU, products with the gate, RoPE,
  ``repeat_kv``, dropout, casts, LoRA's low-rank up-projection) is recomputed in
  backward, so the recompute costs little time while the many elementwise
  intermediates are not held for every layer.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import nn

from rayft.trainers.compat import sdpa_kernel_ops

CheckpointingMode = bool | Literal["selective"]

LOW_RANK_RATIO = 4
"""A product whose contraction dimension is at most 1/4 of its output width (LoRA's B, an
``r x out`` up-projection) does few multiply-adds per element it writes: it is recomputed,
not kept."""


def _is_low_rank(op: Any, args: tuple[Any, ...]) -> bool:
    """Whether a matrix product contracts over far fewer elements than it writes."""
    a, b = (args[1], args[2]) if op is torch.ops.aten.addmm.default else (args[0], args[1])
    return a.shape[-1] * LOW_RANK_RATIO <= b.shape[-1]


def selective_policy() -> Callable[..., Any]:
    """The policy of ``"selective"``: keep dense matmul and attention outputs, recompute the rest.

    Returns:
        A policy function for ``torch.utils.checkpoint.create_selective_checkpoint_contexts``.
    """
    from torch.utils.checkpoint import CheckpointPolicy

    matmuls = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}
    attention = sdpa_kernel_ops()

    def policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
        if op in attention or (op in matmuls and not _is_low_rank(op, args)):
            return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def checkpoint_kwargs(mode: CheckpointingMode) -> dict[str, Any]:
    """Keyword arguments for ``torch.utils.checkpoint.checkpoint`` in ``mode`` (not ``False``)."""
    kwargs: dict[str, Any] = {"use_reentrant": False}
    if mode == "selective":
        from torch.utils.checkpoint import create_selective_checkpoint_contexts

        # A fresh pair of contexts per checkpointed call: each layer caches its own outputs.
        kwargs["context_fn"] = functools.partial(
            create_selective_checkpoint_contexts, selective_policy()
        )
    return kwargs


def effective_mode(mode: CheckpointingMode, zero_stage: int) -> CheckpointingMode:
    """The mode a run uses: ``"selective"`` becomes full recompute under ZeRO-3.

    ZeRO-3 gathers each layer's parameters inside the checkpointed region, and whether a
    gather runs in the forward or only in the recompute depends on DeepSpeed's prefetch
    state (a resumed run differs from a fresh one); selective checkpointing requires the
    recompute to replay exactly the operations it recorded, and fails otherwise.
    """
    return True if mode == "selective" and zero_stage == 3 else mode


def enable_checkpointing(model: nn.Module, mode: CheckpointingMode) -> None:
    """Turn on activation checkpointing of ``model``'s decoder layers (nothing for ``False``).

    Args:
        model: A Hugging Face causal LM, before PEFT wraps it.
        mode: ``True`` (full recompute) or ``"selective"``.
    """
    if mode is False:
        return
    kwargs = checkpoint_kwargs(mode)
    # transformers 5.x renamed gradient_checkpointing_enable (now a deprecated alias).
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False
