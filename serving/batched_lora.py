"""A batch that mixes LoRA adapters, in two matrix products per LoRA layer.

PEFT's mixed-adapter path (``adapter_names=[...]``) splits every LoRA layer's input by
adapter in Python: per layer and per adapter in the batch, an index, two small matrix
products, a scale and an indexed add. In a decode step of a few tokens per row that
bookkeeping, not arithmetic, is the LoRA layers' cost, and it grows with the number of
adapters in the batch. Here each LoRA layer holds the batch's adapters side by side (their
``A`` matrices stacked to ``[sum of ranks, in]``, their ``B`` matrices to
``[out, sum of ranks]``); a row's scale vector keeps its own adapter's rank columns (at
that adapter's ``scaling``) and zeroes the others, and a base row's is all zero:

    delta = ((x @ A_cat.T) * row_scale) @ B_cat.T

which is each row's own ``B(A(x)) * scaling``: the other adapters' columns add exact zeros.
The model runs with its adapters disabled (the plain base layers) and a forward hook on
each LoRA layer adds ``delta``. The stacked weights are built once per set of adapters and
dropped whenever an adapter loads, unloads or changes (:meth:`BatchedLora.invalidate`).

Only plain LoRA on linear layers is stacked: an adapter with a variant (DoRA), a LoRA bias
or a LoRA layer of another kind (embeddings, convolutions) makes :meth:`BatchedLora.forward`
return ``None``, and the caller takes PEFT's own path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["BatchedLora"]


@dataclass
class _Stacked:
    """One LoRA layer's adapters side by side."""

    module: Any
    a: torch.Tensor  # [sum of ranks, in]
    b: torch.Tensor  # [out, sum of ranks]
    owner: torch.Tensor  # [sum of ranks]: the adapter index of each rank column
    scale: torch.Tensor  # [sum of ranks]: that adapter's scaling


KEPT_SETS = 8
"""Adapter sets whose stacked weights are kept (the oldest goes first)."""


class BatchedLora:
    """Mixed-adapter forward passes of one PEFT model (see the module's docstring)."""

    def __init__(self) -> None:
        self._stacks: dict[tuple[str, ...], list[_Stacked] | None] = {}

    def invalidate(self) -> None:
        """Forget the stacked weights: an adapter was loaded, unloaded or overwritten."""
        self._stacks.clear()

    def forward(
        self, model: Any, adapters: Sequence[str], base_name: str, inputs: dict[str, Any]
    ) -> Any | None:
        """``model(**inputs)`` where row ``i`` runs adapter ``adapters[i]`` (``base_name``:
        none); ``None`` when an adapter of the batch cannot be stacked."""
        names = tuple(sorted({a for a in adapters if a != base_name}))
        if names not in self._stacks:
            if len(self._stacks) >= KEPT_SETS:
                del self._stacks[next(iter(self._stacks))]
            self._stacks[names] = _stack(model, names)
        layers = self._stacks[names]
        if layers is None:
            return None
        index = {name: i for i, name in enumerate(names)}
        rows = torch.tensor([index.get(a, -1) for a in adapters], dtype=torch.long)
        handles = []
        try:
            for layer in layers:
                row_scale = torch.where(
                    layer.owner[None, :] == rows[:, None].to(layer.owner.device),
                    layer.scale[None, :],
                    torch.zeros((), dtype=layer.scale.dtype, device=layer.scale.device),
                )
                handles.append(layer.module.register_forward_hook(_adder(layer, row_scale)))
            with model.disable_adapter():
                return model(**inputs)
        finally:
            for handle in handles:
                handle.remove()


def _adder(layer: _Stacked, row_scale: torch.Tensor) -> Any:
    def hook(_module: Any, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        x = args[0].to(layer.a.dtype)
        hidden = x @ layer.a.T
        shape = (hidden.shape[0],) + (1,) * (hidden.dim() - 2) + (hidden.shape[-1],)
        return output + ((hidden * row_scale.view(shape)) @ layer.b.T).to(output.dtype)

    return hook


def _stack(model: Any, names: tuple[str, ...]) -> list[_Stacked] | None:
    """Every LoRA layer's adapters among ``names`` stacked; ``None`` if one cannot be."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.layer import Linear

    stacked = []
    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, LoraLayer):
                continue
            present = [n for n in names if n in module.lora_A]
            if not present:
                continue
            if not isinstance(module, Linear) or any(_unstackable(module, n) for n in present):
                return None
            a = torch.cat([module.lora_A[n].weight for n in present])
            b = torch.cat([module.lora_B[n].weight for n in present], dim=1)
            owner = torch.cat(
                [torch.full((module.lora_A[n].weight.shape[0],), names.index(n)) for n in present]
            ).to(a.device)
            scale = torch.cat(
                [
                    torch.full((module.lora_A[n].weight.shape[0],), float(module.scaling[n]))
                    for n in present
                ]
            ).to(device=a.device, dtype=a.dtype)
            stacked.append(_Stacked(module, a, b, owner, scale))
    return stacked


def _unstackable(module: Any, name: str) -> bool:
    return (
        name in getattr(module, "lora_variant", {})
        or module.lora_B[name].bias is not None
        or not isinstance(module.lora_dropout[name], torch.nn.Identity | torch.nn.Dropout)
    )
