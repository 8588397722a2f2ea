"""The Ray Data pipeline end to end on a local Ray: files -> build_datasets -> collate."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import torch
from specs import tiny_spec

from rayft.trainers.config import validate_spec
from rayft.trainers.data import (
    DRIVER_PREPARE_ROWS,
    PreparedData,
    build_datasets,
    driver_rows,
    prepares_in_driver,
    read_rows,
)
from rayft.trainers.formats import tokenize_example
from rayft.trainers.packing import collate_fn
from rayft.trainers.storage import StorageRoot

pytestmark = pytest.mark.slow

MAX_SEQ_LEN = 96
N_ROWS = 40
N_TOO_LONG = 3


@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    context.enable_progress_bars = False
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def chat_rows() -> list[dict[str, Any]]:
    words = "one two three four five".split()
    rows = []
    for i in range(N_ROWS):
        answer = " ".join(words[: 1 + i % 5]) + f" {i}"
        rows.append(
            {
                "messages": [
                    {"role": "system", "content": "you are helpful"},
                    {"role": "user", "content": f"question {i} about paris"},
                    {"role": "assistant", "content": answer},
                ]
            }
        )
    # Prompts longer than max_seq_len: nothing is left to learn, so they are dropped.
    for i in range(N_TOO_LONG):
        long_prompt = "the quick brown fox jumps over a lazy dog " * 16 + str(i)
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": long_prompt},
                    {"role": "assistant", "content": "ok"},
                ]
            }
        )
    return rows


@pytest.fixture(scope="module")
def train_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in chat_rows()))
    return path


def build(train_file: Path, model_dir: Path, prepare: str = "ray", **data: Any) -> PreparedData:
    """``build_datasets`` with Ray Data's tasks unless ``prepare`` says otherwise."""
    spec = validate_spec(
        {
            "data": {
                "train": str(train_file),
                "max_seq_len": MAX_SEQ_LEN,
                "prepare": prepare,
                **data,
            },
            "optim": {"seed": 7},
        }
    )
    return build_datasets(spec, str(model_dir))


def batches(ds: Any, pad_id: int, packed: bool) -> list[dict[str, Any]]:
    return list(ds.iter_torch_batches(batch_size=4, collate_fn=collate_fn(pad_id, packed)))


def sample_ids(out: list[dict[str, Any]]) -> list[str]:
    return [s for b in out for row in b["sample_ids"] for s in row]


def test_unpacked_shuffled_with_eval_split(
    ray_local: None, train_file: Path, tiny_model_dir: Path, tokenizer: Any
) -> None:
    prepared = build(train_file, tiny_model_dir, eval_fraction=0.25, shuffle=True)
    assert prepared.format == "chat" and prepared.train_rows == N_ROWS + N_TOO_LONG
    assert prepared.reports[0].rows == N_ROWS + N_TOO_LONG
    assert len(prepared.fingerprint) == 64
    assert prepared.summary == (
        f"1 source(s), {N_ROWS + N_TOO_LONG} train rows, 0.25 of train held out for eval; "
        f"dataset sha256 {prepared.fingerprint[:12]}"
    )
    train = batches(prepared.train, tokenizer.pad_token_id, packed=False)
    evals = batches(prepared.eval, tokenizer.pad_token_id, packed=False)
    train_ids, eval_ids = sample_ids(train), sample_ids(evals)
    assert eval_ids and not set(train_ids) & set(eval_ids)
    assert len(train_ids) + len(eval_ids) == N_ROWS
    dropped = sum(b["num_dropped"] for b in train + evals)
    assert dropped == N_TOO_LONG

    # Every sequence's labelled tokens are its assistant answer plus <|im_end|>.
    answers = {m["messages"][-1]["content"] for m in chat_rows()[:N_ROWS]}
    for batch in train:
        ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
        assert ids.dtype == labels.dtype == torch.long
        assert mask.shape == ids.shape
        assert batch["num_tokens"] == int(mask.sum())
        assert batch["num_label_tokens"] == int((labels[:, 1:] != -100).sum())
        for row in range(ids.shape[0]):
            target = ids[row][labels[row] != -100].tolist()
            text = tokenizer.decode(target)
            assert text.endswith("<|im_end|>") and text[: -len("<|im_end|>")] in answers
            assert (labels[row][mask[row] == 0] == -100).all()
            assert (ids[row][mask[row] == 0] == tokenizer.pad_token_id).all()

    # Deterministic run to run, and actually shuffled.
    again = build(train_file, tiny_model_dir, eval_fraction=0.25, shuffle=True)
    assert sample_ids(batches(again.train, tokenizer.pad_token_id, packed=False)) == train_ids
    in_file_order = build(train_file, tiny_model_dir, eval_fraction=0.25, shuffle=False)
    unshuffled = sample_ids(batches(in_file_order.train, tokenizer.pad_token_id, packed=False))
    assert sorted(unshuffled) == sorted(train_ids) and unshuffled != train_ids


def test_packed_rows_keep_samples_apart(
    ray_local: None, train_file: Path, tiny_model_dir: Path, tokenizer: Any
) -> None:
    prepared = build(train_file, tiny_model_dir, packing=True, shuffle=True)
    assert prepared.eval is None and prepared.packed
    out = batches(prepared.train, tokenizer.pad_token_id, packed=True)
    assert len(sample_ids(out)) == N_ROWS and len(set(sample_ids(out))) == N_ROWS
    assert sum(b["num_dropped"] for b in out) == N_TOO_LONG
    # Packing filled rows: fewer rows than samples, none longer than max_seq_len.
    n_rows = sum(len(b["sample_ids"]) for b in out)
    assert n_rows < N_ROWS / 2
    # Each sample tokenized alone, by its id, to locate it inside the packed rows.
    by_id = {
        r["sample_id"]: json.loads(r["row"]) for r in read_rows(str(train_file), "chat").take_all()
    }
    alone = {s: tokenize_example(row, "chat", tokenizer, MAX_SEQ_LEN) for s, row in by_id.items()}

    for batch in out:
        ids, labels, mask, pos = (
            batch["input_ids"],
            batch["labels"],
            batch["attention_mask"],
            batch["position_ids"],
        )
        assert ids.shape[1] <= MAX_SEQ_LEN
        assert mask.shape == (ids.shape[0], 1, ids.shape[1], ids.shape[1])
        assert mask.dtype == torch.float32
        for row, row_samples in enumerate(batch["sample_ids"]):
            start = 0
            for sample_id in row_samples:
                example = alone[sample_id]
                assert example is not None
                end = start + len(example["input_ids"])
                assert ids[row, start:end].tolist() == example["input_ids"]
                assert pos[row, start:end].tolist() == list(range(end - start))
                # No label crosses a boundary: the first label of every sample is -100,
                # the rest are the sample's own labels.
                assert labels[row, start] == -100
                assert labels[row, start + 1 : end].tolist() == example["labels"][1:]
                # Attention: each token of this sample sees exactly its own earlier tokens.
                for q in range(start, end):
                    visible = (mask[row, 0, q] == 0).nonzero().flatten().tolist()
                    assert visible == list(range(start, q + 1))
                start = end
            # Padding attends to itself only and carries no labels.
            for q in range(start, ids.shape[1]):
                assert (mask[row, 0, q] == 0).nonzero().flatten().tolist() == [q]
                assert labels[row, q] == -100 and ids[row, q] == tokenizer.pad_token_id

    again = build(train_file, tiny_model_dir, packing=True, shuffle=True)
    assert [b["sample_ids"] for b in batches(again.train, tokenizer.pad_token_id, True)] == [
        b["sample_ids"] for b in out
    ]


def test_every_source_kind_reads_the_same_rows(ray_local: None, tmp_path: Path) -> None:
    import datasets

    rows = [{"prompt": f"question {i}", "completion": f"answer {i}"} for i in range(12)]
    sources = {
        "train.jsonl": lambda p: p.write_text("".join(json.dumps(r) + "\n\n" for r in rows)),
        "train.json": lambda p: p.write_text(json.dumps(rows, indent=2)),
        "lines.json": lambda p: p.write_text("".join(json.dumps(r) + "\n" for r in rows)),
        "train.parquet": lambda p: pq.write_table(pa.Table.from_pylist(rows), p),
        "train.csv": lambda p: pacsv.write_csv(pa.Table.from_pylist(rows), p),
        "hf_dir": lambda p: datasets.Dataset.from_list(rows).save_to_disk(str(p)),
    }
    seen = {}
    for name, write in sources.items():
        write(tmp_path / name)
        got = read_rows(str(tmp_path / name), "prompt_completion").take_all()
        seen[name] = [(r["sample_id"], json.loads(r["row"])) for r in got]
        # The driver's reader gives the same ids and rows, in the same order.
        local = driver_rows([str(tmp_path / name)], "prompt_completion").to_pylist()
        assert [(r["sample_id"], json.loads(r["row"])) for r in local] == seen[name], name
    reference = seen["train.jsonl"]
    assert [row for _, row in reference] == rows
    for name, got in seen.items():
        assert got == reference, name


LAYOUTS = {
    "unpacked, shuffled, eval split": {"eval_fraction": 0.25, "shuffle": True},
    "unpacked, in file order": {"shuffle": False},
    "packed, shuffled": {"packing": True, "shuffle": True},
    "packed, in file order": {"packing": True, "shuffle": False},
}


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_data_prepared_in_the_driver_equals_ray_datas_rows_and_order(
    ray_local: None, train_file: Path, tiny_model_dir: Path, layout: dict[str, Any]
) -> None:
    """``data.prepare: driver`` (``auto`` for small data) runs the same steps in the driver:
    every column of every row, dropped-sample counts included, in the same order."""
    import ray

    with_ray = build(train_file, tiny_model_dir, "ray", **layout)
    in_driver = build(train_file, tiny_model_dir, "driver", **layout)
    assert in_driver.in_driver and not with_ray.in_driver
    for split in ("train", "eval"):
        ray_ds, table = getattr(with_ray, split), getattr(in_driver, split)
        assert (ray_ds is None) == (table is None), split
        if ray_ds is None:
            continue
        expected = ray_ds.take_all()
        assert expected and ray.data.from_arrow(table).take_all() == expected, split
    assert in_driver.summary == with_ray.summary


def test_a_driver_tables_batches_collate_as_ray_datas_do(
    ray_local: None, train_file: Path, tiny_model_dir: Path, tokenizer: Any
) -> None:
    """The workers iterate a driver-prepared table with ``trainers.shards``: in table
    order its collated batches are Ray Data's ``iter_torch_batches`` ones, tensor for tensor."""
    from rayft.trainers.shards import table_batches

    for packed in (False, True):
        table = build(train_file, tiny_model_dir, "driver", packing=packed, shuffle=False).train
        collate = collate_fn(tokenizer.pad_token_id, packed)
        ours = list(table_batches(table, 4, collate))
        theirs = list(ray_dataset(table).iter_torch_batches(batch_size=4, collate_fn=collate))
        assert len(ours) == len(theirs) > 1
        for mine, reference in zip(ours, theirs, strict=True):
            assert mine.keys() == reference.keys()
            for key, value in reference.items():
                if isinstance(value, torch.Tensor):
                    assert torch.equal(mine[key], value), key
                else:
                    assert mine[key] == value, key


def ray_dataset(table: pa.Table) -> Any:
    import ray

    return ray.data.from_arrow(table)


def test_auto_prepares_small_data_in_the_driver_and_large_data_with_ray() -> None:
    def spec(prepare: str) -> Any:
        return validate_spec({"data": {"train": "t.jsonl", "prepare": prepare}})

    assert prepares_in_driver(spec("auto"), DRIVER_PREPARE_ROWS)
    assert not prepares_in_driver(spec("auto"), DRIVER_PREPARE_ROWS + 1)
    assert prepares_in_driver(spec("driver"), 10 * DRIVER_PREPARE_ROWS)
    assert not prepares_in_driver(spec("ray"), 1)


def test_each_source_is_scanned_once_per_run(
    ray_local, train_file, tiny_model_dir, tmp_path, monkeypatch
):
    """The CLI's early check hands its scan to the run: no file is read a second time."""
    import rayft.trainers.data as data

    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text("".join(json.dumps(r) + "\n" for r in chat_rows()[:8]))
    spec = validate_spec(
        tiny_spec(train_file, data={"eval": str(eval_file), "max_seq_len": MAX_SEQ_LEN})
    )
    scanned_paths: list[str] = []
    real = data.scan_source

    def counting(path: str, *args: Any) -> data.SourceReport:
        scanned_paths.append(path)
        return real(path, *args)

    monkeypatch.setattr(data, "scan_source", counting)
    scanned = data.scan_sources(spec, root=StorageRoot.resolve(spec.storage))
    prepared = data.build_datasets(spec, str(tiny_model_dir), scanned)
    assert scanned_paths == [str(train_file), str(eval_file)]
    assert prepared.reports == [*scanned.train, *scanned.eval]
    assert prepared.in_driver  # small data: the tables are prepared in the driver
    assert prepared.eval.num_rows > 0 and prepared.train.num_rows > 0
