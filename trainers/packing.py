"""Sequence packing, the block-causal attention mask, and the training-batch collate.

Packing puts several tokenized samples into one row of at most ``max_seq_len``
tokens. Two things keep packed samples independent, and both are tested:

* attention: a 4-D block-diagonal causal mask (``block_causal_mask``); resetting
  ``position_ids`` alone does not isolate samples in transformers' sdpa/eager kernels.
  With flash-attention 2 it does: the batch's rows are flattened into one sequence whose
  ``position_ids`` restart at 0 per sample and no mask is given (``varlen_inputs``);
  transformers then runs the variable-length kernels, one causal block per sample;
* loss: Hugging Face causal LMs shift labels inside the model (the logits at position
  ``t - 1`` predict ``labels[t]``), so the first label of every sample is set to -100;
  otherwise the last token of one sample would be trained to predict the first token
  of the next.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from rayft.trainers.loss import IGNORE_INDEX


def pack_examples(examples: list[dict[str, Any]], max_seq_len: int) -> list[dict[str, Any]]:
    """Pack tokenized examples into rows of at most ``max_seq_len`` tokens.

    First-fit-decreasing bin packing: examples are placed longest first (ties in input
    order) into the first row with room. Rows come out ordered by the input position of
    their earliest example, so a shuffled input stays shuffled; inside a row, examples
    keep their input order. The result depends only on the input list.

    Args:
        examples: Dicts with ``input_ids`` and ``labels`` (equal-length int lists) and
            ``sample_id`` (str); optional ``truncated`` (bool) and ``num_dropped`` (int).
            Examples with no tokens only carry ``num_dropped`` and are not packed.
        max_seq_len: Row capacity in tokens.

    Returns:
        Rows with ``input_ids``, ``labels`` (-100 at every sample's first position),
        ``position_ids`` (restarting at 0 per sample), ``segment_ids`` (1, 2, ... per
        sample), ``sample_ids`` (list[str]), ``num_truncated`` and ``num_dropped``
        (ints; the dropped counts of all inputs are added to the first row). Rows are
        not padded; ``collate`` pads them with segment 0. If every input is empty, one
        empty row carries ``num_dropped``.

    Raises:
        ValueError: An example is longer than ``max_seq_len`` or its labels do not
            match its ``input_ids``.
    """
    dropped = sum(int(e.get("num_dropped", 0)) for e in examples)
    real = [(i, e) for i, e in enumerate(examples) if len(e["input_ids"]) > 0]
    for _, e in real:
        if len(e["input_ids"]) > max_seq_len:
            raise ValueError(
                f"example {e['sample_id']} has {len(e['input_ids'])} tokens, more than "
                f"max_seq_len={max_seq_len}; truncate before packing"
            )
        if len(e["labels"]) != len(e["input_ids"]):
            raise ValueError(f"example {e['sample_id']}: labels and input_ids differ in length")

    positions = [i for i, _ in real]
    bins = first_fit_decreasing([len(e["input_ids"]) for _, e in real], max_seq_len)
    rows = [_join([examples[positions[i]] for i in members]) for members in bins]
    if not rows:
        rows = [_join([])]
    rows[0]["num_dropped"] = dropped
    return rows


def first_fit_decreasing(sizes: list[int], capacity: int) -> list[list[int]]:
    """Bins of first-fit-decreasing packing: the largest size first (ties in input order)
    into the first bin with room.

    Args:
        sizes: Item sizes, each at most ``capacity``.
        capacity: A bin's capacity.

    Returns:
        Each bin's item indices in ascending order; bins ordered by their first index.
    """
    order = sorted(range(len(sizes)), key=lambda i: (-sizes[i], i))
    bins: list[list[int]] = []
    room: list[int] = []
    for index in order:
        size = sizes[index]
        for b, free in enumerate(room):
            if size <= free:
                bins[b].append(index)
                room[b] -= size
                break
        else:
            bins.append([index])
            room.append(capacity - size)
    for members in bins:
        members.sort()
    bins.sort(key=lambda members: members[0])
    return bins


def _join(samples: list[dict[str, Any]]) -> dict[str, Any]:
    input_ids: list[int] = []
    labels: list[int] = []
    position_ids: list[int] = []
    segment_ids: list[int] = []
    for segment, sample in enumerate(samples, start=1):
        n = len(sample["input_ids"])
        input_ids += [int(t) for t in sample["input_ids"]]
        sample_labels = [int(t) for t in sample["labels"]]
        sample_labels[0] = IGNORE_INDEX  # no label may be predicted across a boundary
        labels += sample_labels
        position_ids += range(n)
        segment_ids += [segment] * n
    return {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": position_ids,
        "segment_ids": segment_ids,
        "sample_ids": [str(s["sample_id"]) for s in samples],
        "num_truncated": sum(bool(s.get("truncated", False)) for s in samples),
        "num_dropped": 0,
    }


def block_causal_mask(
    segment_ids: torch.Tensor, dtype: torch.dtype, shared: int | None = None
) -> torch.Tensor:
    """Additive attention mask that keeps packed samples from seeing each other.

    Args:
        segment_ids: ``[B, T]`` long tensor, 1, 2, ... per packed sample, 0 for padding.
        dtype: The float dtype of the mask (use the model's compute dtype).
        shared: A segment every sample of its row also sees (GRPO's prompt, which the
            group's answers follow: ``trainers.grpo.shared_prompt_rows``).

    Returns:
        ``[B, 1, T, T]`` tensor: 0 where query ``q`` may attend key ``k`` (same nonzero
        segment, or ``k`` in the ``shared`` segment, and ``k <= q``),
        ``torch.finfo(dtype).min`` elsewhere. A padding position attends only to itself,
        so no softmax row is fully masked (no NaN).
    """
    seg = segment_ids.long()
    t = seg.shape[-1]
    causal = torch.ones(t, t, dtype=torch.bool, device=seg.device).tril()
    same = seg[:, :, None] == seg[:, None, :]
    if shared is not None:
        same = same | (seg[:, None, :] == shared)
    allowed = same & (seg[:, :, None] != 0) & causal
    eye = torch.eye(t, dtype=torch.bool, device=seg.device)
    allowed = allowed | ((seg == 0)[:, :, None] & eye)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=seg.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None, :, :]


def row_arrays(column: Any) -> list[np.ndarray]:
    """The rows of a Ray Data list column as arrays (``[]`` for a missing column)."""
    # Ray hands list columns over as an object array of arrays, or as a 2-D array when
    # every row has the same length; iterating covers both.
    return [np.asarray(row) for row in column] if column is not None else []


def pad_rows(rows: list[np.ndarray], width: int, value: int) -> torch.Tensor:
    """``[len(rows), width]`` long tensor of the rows, right-padded with ``value``."""
    out = np.full((len(rows), width), value, dtype=np.int64)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return torch.from_numpy(out)


def varlen_inputs(
    input_rows: list[np.ndarray],
    label_rows: list[np.ndarray],
    position_rows: list[np.ndarray],
    pad_id: int,
) -> dict[str, torch.Tensor]:
    """Packed rows flattened into one ``[1, N]`` sequence for flash-attention's
    variable-length kernels: no padding and no mask.

    Transformers (``_is_packed_sequence``) finds the samples from ``position_ids`` that
    restart at 0, for a batch of one row only, hence the flattening. Every sample's first
    label is already -100 (``pack_examples``), so no label is predicted across a row's end
    either. With no tokens at all the sequence is one unlabelled pad token, so every worker
    still runs its step.

    Returns:
        ``input_ids``, ``labels`` and ``position_ids``, each ``[1, N]`` long.
    """
    if not input_rows:
        input_rows, label_rows = [np.array([pad_id])], [np.array([IGNORE_INDEX])]
        position_rows = [np.array([0])]
    return {
        name: torch.from_numpy(np.concatenate(rows).astype(np.int64)).reshape(1, -1)
        for name, rows in (
            ("input_ids", input_rows),
            ("labels", label_rows),
            ("position_ids", position_rows),
        )
    }


def collate(
    batch: dict[str, np.ndarray],
    pad_id: int,
    packed: bool,
    varlen: bool = False,
    width: int | None = None,
) -> dict[str, Any]:
    """Turn a Ray Data batch into model inputs; the ``collate_fn`` of ``iter_torch_batches``.

    Rows are right-padded to the longest row in the batch, or to ``width``. Rows with no
    tokens (they only carry a ``num_dropped`` count, see ``trainers.data``) are left out.

    Args:
        batch: Columns as numpy arrays: ``input_ids``, ``labels``, ``sample_ids``,
            ``num_truncated`` and, optionally, ``num_dropped``; ``position_ids`` and
            ``segment_ids`` when packed.
        pad_id: Token id written into padding.
        packed: Whether rows are packed (``segment_ids`` present).
        varlen: Packed rows go to flash-attention 2 (``trainers.attention``): flattened by
            :func:`varlen_inputs`, with no ``attention_mask``.
        width: Pad every row to this many tokens (at least the longest row's), so every
            batch has one shape; ignored with ``varlen``.

    Returns:
        ``input_ids`` and ``labels`` (``[B, T]`` long, labels -100 on padding),
        ``position_ids`` (``[B, T]`` long), ``attention_mask`` (``[B, T]`` 0/1 long when
        not packed, the ``[B, 1, T, T]`` float32 ``block_causal_mask`` when packed; absent
        with ``varlen``, where the three tensors are ``[1, N]`` and ``position_ids``
        restart at 0 per sample), ``sample_ids`` (list of lists of str, one list per
        packed row), and python ints ``num_tokens`` (non-padding tokens),
        ``num_label_tokens`` (tokens that contribute to the loss: ``labels[:, 1:] !=
        -100``), ``num_truncated`` and ``num_dropped``.
    """
    input_rows = row_arrays(batch["input_ids"])
    keep = [i for i, row in enumerate(input_rows) if len(row) > 0]
    input_rows = [input_rows[i] for i in keep]
    label_rows = [row_arrays(batch["labels"])[i] for i in keep]
    lengths = [len(row) for row in input_rows]
    width = max(max(lengths, default=0), width or 0)

    tensors: dict[str, torch.Tensor]
    if packed and varlen:
        position_rows = [row_arrays(batch["position_ids"])[i] for i in keep]
        tensors = varlen_inputs(input_rows, label_rows, position_rows, pad_id)
    elif packed:
        segment_ids = pad_rows([row_arrays(batch["segment_ids"])[i] for i in keep], width, 0)
        tensors = {
            "input_ids": pad_rows(input_rows, width, pad_id),
            "labels": pad_rows(label_rows, width, IGNORE_INDEX),
            "attention_mask": block_causal_mask(segment_ids, torch.float32),
            "position_ids": pad_rows(
                [row_arrays(batch["position_ids"])[i] for i in keep], width, 0
            ),
        }
    else:
        lengths_t = torch.tensor(lengths, dtype=torch.long).reshape(-1, 1)
        tensors = {
            "input_ids": pad_rows(input_rows, width, pad_id),
            "labels": pad_rows(label_rows, width, IGNORE_INDEX),
            "attention_mask": (torch.arange(width)[None, :] < lengths_t).long(),
            "position_ids": torch.arange(width, dtype=torch.long).expand(len(keep), width).clone(),
        }

    labels = tensors["labels"]
    sample_ids = [[str(s) for s in row_arrays(batch["sample_ids"])[i]] for i in keep]
    dropped = batch.get("num_dropped")
    return {
        **tensors,
        "sample_ids": sample_ids,
        "num_tokens": int(sum(lengths)),
        "num_label_tokens": int((labels[:, 1:] != IGNORE_INDEX).sum()),
        "num_truncated": int(np.asarray(batch["num_truncated"]).sum()),
        "num_dropped": int(np.asarray(dropped).sum()) if dropped is not None else 0,
    }


def collate_fn(pad_id: int, packed: bool, varlen: bool = False, width: int | None = None) -> Any:
    """The ``collate_fn`` for ``Dataset.iter_torch_batches`` over ``PreparedData`` rows.

    Ray 2.60 deprecates plain functions as ``collate_fn``; this wraps
    ``trainers.packing.collate`` in a ``NumpyBatchCollateFn``.

    Args:
        pad_id: The tokenizer's pad token id (its EOS id when it has no pad token).
        packed: ``PreparedData.packed``.
        varlen: Flatten packed rows for flash-attention 2 (see :func:`collate`).
        width: Pad every row to this many tokens (see :func:`collate`).

    Returns:
        A callable turning a batch of numpy columns into the dict ``collate`` returns.
    """
    from ray.data.collate_fn import NumpyBatchCollateFn

    class PackingCollateFn(NumpyBatchCollateFn):
        def __init__(self) -> None:
            self.pad_id = pad_id
            self.packed = packed
            self.varlen = varlen
            self.width = width

        def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
            return collate(batch, self.pad_id, self.packed, self.varlen, self.width)

    return PackingCollateFn()
