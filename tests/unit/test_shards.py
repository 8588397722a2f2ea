"""A worker's share of a table prepared in the driver, and its batches (no Ray)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from rayft.trainers.shards import equal_share, numpy_batch, table_batches


def rows_table(n: int) -> pa.Table:
    return pa.table(
        {
            "input_ids": pa.array([[i] * (1 + i % 3) for i in range(n)], pa.list_(pa.int32())),
            "sample_ids": pa.array([[f"s{i}"] for i in range(n)], pa.list_(pa.string())),
            "num_dropped": pa.array([i % 2 for i in range(n)], pa.int64()),
        }
    )


def ids(batch: dict) -> list[int]:
    return [int(row[0]) for row in batch["input_ids"]]


@pytest.mark.parametrize(("rows", "world"), [(40, 1), (40, 2), (41, 2), (7, 3)])
def test_every_worker_gets_the_same_number_of_consecutive_rows_and_none_twice(rows, world):
    shares = [equal_share(rows, rank, world) for rank in range(world)]
    assert {stop - start for start, stop in shares} == {rows // world}
    covered = [i for start, stop in shares for i in range(start, stop)]
    assert covered == list(range(rows // world * world))  # the remainder is left out


def test_a_rank_outside_the_world_is_refused():
    with pytest.raises(ValueError, match="rank 2 is not one of 2 workers"):
        equal_share(10, 2, 2)


def test_batches_keep_the_table_order_and_end_with_the_rest():
    batches = list(table_batches(rows_table(10), 4, lambda b: b))
    assert [ids(b) for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_a_seeded_order_is_a_permutation_the_same_for_the_same_seed_and_new_per_epoch():
    table = rows_table(32)

    def order(seed: int) -> list[int]:
        return [i for b in table_batches(table, 5, lambda b: b, seed) for i in ids(b)]

    assert sorted(order(7)) == list(range(32))
    assert order(7) == order(7)
    assert order(7) != order(8) and order(7) != list(range(32))


def test_batches_hold_numpy_columns_as_ray_datas_numpy_batches_do():
    batch = numpy_batch(rows_table(3))
    assert batch["input_ids"].dtype == object
    assert [row.tolist() for row in batch["input_ids"]] == [[0], [1, 1], [2, 2, 2]]
    assert batch["input_ids"][0].dtype == np.int32
    assert [list(row) for row in batch["sample_ids"]] == [["s0"], ["s1"], ["s2"]]
    assert batch["num_dropped"].dtype == np.int64 and batch["num_dropped"].tolist() == [0, 1, 0]


def test_a_batch_size_below_one_is_refused():
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        next(table_batches(rows_table(2), 0, lambda b: b))
