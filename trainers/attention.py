"""Which attention kernel a training model runs with (``model.attn_implementation``).

``auto`` is flash-attention 2 where the ``flash_attn`` package is importable and CUDA is
available, and PyTorch's SDPA elsewhere. The choice also decides how packed rows reach the
model (``trainers.packing.collate``): flash-attention's variable-length kernels keep packed
samples apart from ``position_ids`` that restart at 0 per sample, so those batches carry no
mask; SDPA and eager need the 4-D block-diagonal mask.

Torch is imported only inside :func:`cuda_available`, so ``trainers.config`` can name the
choices without loading it.
"""

from __future__ import annotations

import importlib.util
from typing import Literal

AttnImplementation = Literal["auto", "sdpa", "eager", "flash_attention_2"]
"""The values of ``model.attn_implementation``."""

FLASH = "flash_attention_2"
"""Transformers' name of the flash-attention 2 kernels."""


def flash_attn_available() -> bool:
    """Whether the ``flash_attn`` package can be imported (it is not imported here)."""
    return importlib.util.find_spec("flash_attn") is not None


def cuda_available() -> bool:
    """Whether this process sees a CUDA device."""
    import torch

    return torch.cuda.is_available()


def resolve_attention(requested: str) -> str:
    """The ``attn_implementation`` to load the model with on this process's device.

    Args:
        requested: ``model.attn_implementation``: ``auto``, ``sdpa``, ``eager`` or
            ``flash_attention_2``.

    Returns:
        ``flash_attention_2`` for ``auto`` where ``flash_attn`` is importable and CUDA is
        available, else ``sdpa``; any other value as given.

    Raises:
        ValueError: ``flash_attention_2`` was asked for where it cannot run; the message
            names the key to change.
    """
    if requested == "auto":
        return FLASH if flash_attn_available() and cuda_available() else "sdpa"
    if requested == FLASH:
        missing = [
            what
            for what, ok in (
                ("the flash_attn package (pip install flash-attn)", flash_attn_available()),
                ("a CUDA GPU", cuda_available()),
            )
            if not ok
        ]
        if missing:
            raise ValueError(
                f"model.attn_implementation=flash_attention_2 needs {' and '.join(missing)}, "
                "which this worker lacks; set model.attn_implementation=auto (flash-attention "
                "where it can run, SDPA elsewhere) or sdpa"
            )
    return requested


def uses_varlen_packing(attn_implementation: str, packed: bool) -> bool:
    """Whether packed rows go to the model flattened, with restarting ``position_ids`` and no
    mask (flash-attention's variable-length kernels), rather than with the 4-D block mask."""
    return packed and attn_implementation == FLASH
