"""A worker's batches of data prepared in the driver (``data.prepare``), without Ray Data.

The driver puts each prepared table in the object store once; every worker reads it
there (zero-copy) and iterates its share as ``iter_torch_batches`` iterates a Ray
Dataset's shard: batches of numpy columns through the objective's collate function.
Skipping Ray Data saves starting its split coordinator and dataset actors on every run,
and its streaming executor on every epoch.

* The training table is split as Ray Train splits a dataset (``equal_share``): every
  worker gets ``rows // world`` consecutive rows, the remainder is left out, so every
  worker takes the same number of steps.
* A shuffled run reorders its share every epoch with a seeded permutation
  (``optim.seed + epoch``): the same order on every run and resume.
* The eval table is not split: every worker reads all of it, as Ray Train gives an
  unsplit dataset to every worker.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pyarrow as pa


def equal_share(rows: int, rank: int, world: int) -> tuple[int, int]:
    """``(start, stop)`` of worker ``rank``'s rows: ``rows // world`` consecutive rows."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not one of {world} workers")
    size = rows // world
    return rank * size, (rank + 1) * size


def numpy_batch(table: pa.Table) -> dict[str, Any]:
    """Columns of ``table`` as numpy arrays, as Ray Data's ``numpy`` batches hold them
    (a list column is an object array of arrays)."""
    return {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}


def table_batches(
    table: pa.Table,
    batch_size: int,
    collate: Callable[[dict[str, Any]], Any],
    seed: int | None = None,
) -> Iterator[Any]:
    """Collated batches of ``batch_size`` rows of ``table`` (the last may be smaller).

    Args:
        table: The rows to iterate.
        batch_size: Rows per batch.
        collate: Turns a batch of numpy columns into model inputs.
        seed: Iterate the rows in the order of ``random.Random(seed)``'s permutation;
            ``None`` keeps the table's order.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    order = list(range(table.num_rows))
    if seed is not None:
        random.Random(seed).shuffle(order)
    for start in range(0, len(order), batch_size):
        yield collate(numpy_batch(table.take(order[start : start + batch_size])))
