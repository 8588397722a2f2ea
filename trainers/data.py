"""The data pipeline: check the source files, then read, split, tokenize, shuffle and
pack them for the training loop, with Ray Data or, for small data, in the driver.

``build_datasets`` is the entry point. It scans every file on the driver first, so a
bad line is reported as ``file:line`` before any Ray work starts, then builds the Ray
Datasets whose rows are ready for ``trainers.packing.collate``: lazy ones whose tasks
run across the cluster, or (``data.prepare``; ``auto`` up to ``DRIVER_PREPARE_ROWS``
rows) one table prepared in the driver by the same functions and handed to Ray whole,
which saves starting Ray Data's tasks (seconds on every run of a small dataset).

Output columns (one row per training sequence):

* ``input_ids``, ``labels``: ``list<int32>``; labels are -100 where no loss is taken.
* ``position_ids``, ``segment_ids``: ``list<int32>``, only when ``data.packing``.
* ``sample_ids``: ``list<string>``, the samples in the row (one when not packed).
* ``num_truncated``: samples in the row that were cut to ``data.max_seq_len``.
* ``num_dropped``: samples dropped because no labelled token was left (see below).

Dropped samples: tokenization drops a sample whose labels are all -100 (e.g. a prompt
longer than ``max_seq_len``). Its count is added to ``num_dropped`` of another row
from the same tokenization batch, so summing ``num_dropped`` over one pass of the data
(as ``collate`` does per batch) gives the exact number dropped without a second pass.
When every sample of a tokenization batch is dropped, one row with no tokens carries
the count; ``collate`` counts it and leaves it out of the tensors.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from rayft.trainers.formats import (
    FORMATS,
    PREFERENCE_FIELDS,
    ChatTemplateError,
    RowError,
    check_row,
    detect_format,
)
from rayft.trainers.loss import IGNORE_INDEX
from rayft.trainers.models import resolve_model
from rayft.trainers.objectives import objective_class, objective_for
from rayft.trainers.packing import first_fit_decreasing, pack_examples
from rayft.trainers.storage import StorageRoot, is_uri, local_path
from rayft.trainers.storage import filesystem as _filesystem

if TYPE_CHECKING:
    import pyarrow as pa
    import ray.data

    from rayft.trainers.config import JobSpec
    from rayft.trainers.objective import RowCheck

# Fields each format reads; everything else in a row is ignored (and not hashed).
FORMAT_FIELDS: dict[str, tuple[str, ...]] = {
    "chat": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "input", "output"),
    "text": ("text",),
    "preference": PREFERENCE_FIELDS,
}
REQUIRED_FIELDS: dict[str, tuple[str, ...]] = {
    "chat": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
    "text": ("text",),
    # TRL's and OpenAI's preference shapes share no column; rows are checked one by one.
    "preference": (),
}
HF_DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
SCAN_BATCH_ROWS = 1024
TOKENIZE_BATCH_ROWS = 1024
# Packing fills rows from this many samples at a time: large enough that first-fit-
# decreasing leaves little padding, small enough for one task's memory.
PACK_GROUP_ROWS = 512
# ``data.prepare: auto`` prepares data of at most this many rows (train and eval files)
# in the driver: the scan holds and tokenizes them there already (about 20 s per 10k
# short chat rows), and the prepared table is a few MB per thousand rows.
DRIVER_PREPARE_ROWS = 10_000


class DataError(Exception):
    """A data source that cannot be used; the message names the file and line or row."""


@dataclass(frozen=True)
class SourceReport:
    """What ``scan_source`` found in one file or dataset directory."""

    path: str
    format: str
    rows: int
    blank_lines: int
    sha256: str


@dataclass
class PreparedData:
    """The datasets a training run iterates, and what they were built from.

    ``train`` and ``eval`` are lazy Ray Datasets, or, when the rows were prepared in the
    driver (``in_driver``, see ``data.prepare``), pyarrow Tables that go to the workers
    through the object store.
    """

    train: ray.data.Dataset | pa.Table
    eval: ray.data.Dataset | pa.Table | None
    reports: list[SourceReport]
    fingerprint: str
    format: str
    train_rows: int = 0
    """Rows in the train files (before the eval split and before dropping)."""
    eval_rows: int = 0
    """Rows in the eval files (0 when eval is split off train)."""
    packed: bool = False
    eval_fraction: float = 0.0
    in_driver: bool = False
    """``train`` and ``eval`` are tables prepared in the driver, not Ray Datasets."""

    @property
    def summary(self) -> str:
        """One line for logs: sources, rows, blank lines, eval split and fingerprint."""
        blank = sum(r.blank_lines for r in self.reports)
        text = (
            f"{len(self.reports)} source(s), {self.train_rows} train rows"
            + (f", {self.eval_rows} eval rows" if self.eval_rows else "")
            + (f", {self.eval_fraction:g} of train held out for eval" if self.eval_fraction else "")
            + (f", {blank} blank lines skipped" if blank else "")
        )
        return f"{text}; dataset sha256 {self.fingerprint[:12]}"


# ---------------------------------------------------------------- source kinds


def _source_kind(path: str) -> str:
    """``jsonl``, ``json``, ``parquet``, ``csv`` or ``hf`` (a saved HF dataset dir)."""
    import pyarrow.fs as pafs

    fs, inner = _filesystem(path)
    info = fs.get_file_info(inner)
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"{path}: file not found; check data.train / data.eval in the job spec")
    if info.type == pafs.FileType.Directory:
        names = {i.base_name for i in fs.get_file_info(pafs.FileSelector(inner))}
        if any(marker in names for marker in HF_DATASET_MARKERS):
            return "hf"
        raise DataError(
            f"{path}: is a directory but not a saved Hugging Face dataset (no "
            f"{' / '.join(HF_DATASET_MARKERS)}); give a .jsonl, .json, .parquet or .csv file "
            "or a directory written by datasets.Dataset.save_to_disk"
        )
    suffix = inner.lower().rsplit(".", 1)[-1] if "." in inner else ""
    kinds = {"jsonl": "jsonl", "ndjson": "jsonl", "json": "json", "parquet": "parquet"}
    kinds["csv"] = "csv"
    if suffix not in kinds:
        raise DataError(
            f"{path}: unsupported file type '.{suffix}'; use .jsonl, .json, .parquet, .csv "
            "or a saved Hugging Face dataset directory"
        )
    return kinds[suffix]


def _json_is_array(path: str) -> bool:
    """Whether a .json file holds one JSON array (else it is JSON lines)."""
    fs, inner = _filesystem(path)
    with fs.open_input_stream(inner) as stream:
        head = stream.read(4096).decode("utf-8", errors="replace").lstrip("\ufeff \t\r\n")
    return head.startswith("[")


def _iter_lines(path: str, hasher: Any) -> Iterator[bytes]:
    """Lines of a file, read in chunks (never the whole file), feeding ``hasher``."""
    fs, inner = _filesystem(path)
    with fs.open_input_stream(inner) as stream:
        buffered = io.BufferedReader(_RawStream(stream), buffer_size=1 << 20)
        for line in buffered:
            hasher.update(line)
            yield line


class _RawStream(io.RawIOBase):
    """Adapts a pyarrow input stream to ``io`` so ``BufferedReader`` can split lines."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._stream.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def _hash_files(path: str) -> str:
    """sha256 of a file's bytes, or of every file under a directory (sorted by name)."""
    import pyarrow.fs as pafs

    fs, inner = _filesystem(path)
    hasher = hashlib.sha256()
    if fs.get_file_info(inner).type == pafs.FileType.Directory:
        infos = fs.get_file_info(pafs.FileSelector(inner, recursive=True))
        files = sorted(i.path for i in infos if i.type == pafs.FileType.File)
    else:
        files = [inner]
    for name in files:
        if len(files) > 1 or name != inner:
            hasher.update(os.path.relpath(name, inner).encode() + b"\0")
        with fs.open_input_stream(name) as stream:
            while chunk := stream.read(1 << 20):
                hasher.update(chunk)
    return hasher.hexdigest()


# ---------------------------------------------------------------- scanning


class _FormatChecker:
    """Detects the format on the first row (``auto``) and checks every row against it."""

    def __init__(self, path: str, fmt: str, rows: RowCheck | None = None) -> None:
        if rows is None and fmt != "auto" and fmt not in FORMATS:
            raise ValueError(f"unknown format {fmt!r}")
        self.path = path
        # An objective's own row check replaces the formats' (``Objective.row_check``).
        self.rows = rows
        self.fmt = rows.format if rows is not None else fmt
        self.detected_at: str | None = None

    def check(self, row: Any, where: str) -> None:
        if not isinstance(row, dict):
            raise DataError(
                f"{where}: a row must be a JSON object, got {type(row).__name__}; "
                "write one object per line"
            )
        if self.rows is not None:
            self._check_own(self.rows, row, where)
            return
        if self.fmt == "auto":
            try:
                self.fmt = detect_format(row)
            except RowError as err:
                raise DataError(f"{where}: {err}; or set data.format explicitly") from None
            self.detected_at = where
        try:
            check_row(row, self.fmt)
        except RowError as err:
            how = (
                f"format {self.fmt}, detected at {self.detected_at}"
                if self.detected_at
                else f"data.format={self.fmt}"
            )
            raise DataError(
                f"{where}: {err} ({how}); fix the row, or set data.format if the format is wrong"
            ) from None

    @staticmethod
    def _check_own(rows: RowCheck, row: dict[str, Any], where: str) -> None:
        try:
            rows.check(row)
        except RowError as err:
            raise DataError(f"{where}: {err} ({rows.described}); fix the row") from None


def scan_source(path: str, fmt: str = "auto", row_check: RowCheck | None = None) -> SourceReport:
    """Check a data source on the driver, before any Ray work.

    JSON lines are streamed line by line; parquet, csv and saved Hugging Face datasets
    are read in record batches, so no source is loaded into memory whole (a ``.json``
    array file is the exception: it is one JSON document).

    Args:
        path: A ``.jsonl``/``.json``/``.parquet``/``.csv`` file or a directory written
            by ``datasets.Dataset.save_to_disk`` (local path or pyarrow URI).
        fmt: ``auto`` (detect on the first row, then require every row to fit) or one
            of ``trainers.formats.FORMATS``.
        row_check: The objective's own check of every row (``Objective.row_check``),
            which replaces ``fmt``'s; it collects what it finds (e.g. label names).

    Returns:
        The source's format, row count, blank lines skipped and sha256 (of the file's
        bytes, or of all files in a directory, sorted by name).

    Raises:
        DataError: Naming the file and line (JSON lines) or row index (other sources):
            a missing file, a line that is not JSON, a row that fits no format or is
            missing a field of the format.
    """
    kind = _source_kind(path)
    checker = _FormatChecker(path, fmt, row_check)
    if kind == "jsonl" or (kind == "json" and not _json_is_array(path)):
        hasher = hashlib.sha256()
        rows, blank = _scan_json_lines(path, checker, hasher)
        digest = hasher.hexdigest()
    else:
        if kind == "json":
            rows = _scan_json_array(path, checker)
        elif kind == "parquet":
            rows = _scan_batches(path, _parquet_batches(path, checker.fmt), checker)
        elif kind == "csv":
            rows = _scan_batches(path, _csv_batches(path, checker.fmt), checker)
        else:
            rows = _scan_batches(path, _hf_batches(path), checker)
        blank, digest = 0, _hash_files(path)
    if rows == 0:
        raise DataError(f"{path}: has no rows; point data.train / data.eval at a file with data")
    return SourceReport(path, checker.fmt, rows, blank, digest)


_TOO_DEEP = "JSON nested too deeply to read; a row is an object of a few levels"


def _scan_json_lines(path: str, checker: _FormatChecker, hasher: Any) -> tuple[int, int]:
    rows = blank = 0
    for lineno, raw in enumerate(_iter_lines(path, hasher), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise DataError(
                f"{path}:{lineno}: not UTF-8 text ({err}); save the file as UTF-8"
            ) from None
        if lineno == 1:
            line = line.lstrip("\ufeff")
        if not line.strip():
            blank += 1
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(
                f"{path}:{lineno}: not valid JSON ({err.msg} at column {err.colno}); "
                "each line must be one complete JSON object"
            ) from None
        except RecursionError:
            raise DataError(f"{path}:{lineno}: {_TOO_DEEP}") from None
        except ValueError as err:  # e.g. an integer past Python's 4300-digit limit
            raise DataError(f"{path}:{lineno}: not valid JSON ({err})") from None
        checker.check(row, f"{path}:{lineno}")
        rows += 1
    return rows, blank


def _scan_json_array(path: str, checker: _FormatChecker) -> int:
    fs, inner = _filesystem(path)
    with fs.open_input_stream(inner) as stream:
        raw = stream.read()
    try:
        data = json.loads(raw.decode("utf-8").lstrip("\ufeff"))
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text ({err}); save the file as UTF-8") from None
    except json.JSONDecodeError as err:
        raise DataError(
            f"{path}:{err.lineno}: not valid JSON ({err.msg} at column {err.colno})"
        ) from None
    except RecursionError:
        raise DataError(f"{path}: {_TOO_DEEP}") from None
    except ValueError as err:  # e.g. an integer past Python's 4300-digit limit
        raise DataError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: a .json file must hold an array of rows or JSON lines")
    for index, row in enumerate(data):
        checker.check(row, f"{path}: row index {index}")
    return len(data)


def _scan_batches(path: str, batches: Iterator[pa.RecordBatch], checker: _FormatChecker) -> int:
    rows = 0
    for batch in batches:
        for row in batch.to_pylist():
            checker.check(row, f"{path}: row index {rows}")
            rows += 1
    return rows


def _check_columns(path: str, names: list[str], fmt: str) -> None:
    if fmt == "auto":
        return
    missing = [c for c in REQUIRED_FIELDS.get(fmt, ()) if c not in names]
    if missing:
        raise DataError(
            f"{path}: no column {missing[0]!r} for data.format={fmt} (columns: "
            f"{', '.join(names)}); rename the column or set data.format"
        )


def _parquet_batches(path: str, fmt: str) -> Iterator[pa.RecordBatch]:
    import pyarrow.parquet as pq

    fs, inner = _filesystem(path)
    try:
        parquet = pq.ParquetFile(inner, filesystem=fs)
    except Exception as err:  # noqa: BLE001 - any reader failure is a bad file
        raise DataError(f"{path}: not a readable parquet file ({err})") from None
    _check_columns(path, parquet.schema_arrow.names, fmt)
    yield from parquet.iter_batches(batch_size=SCAN_BATCH_ROWS)


def _csv_header(path: str) -> list[str]:
    import csv

    fs, inner = _filesystem(path)
    with fs.open_input_stream(inner) as stream:
        text = io.TextIOWrapper(io.BufferedReader(_RawStream(stream)), encoding="utf-8-sig")
        return next(csv.reader(text), [])


def _csv_options(path: str) -> dict[str, Any]:
    import pyarrow as pa
    import pyarrow.csv as pacsv

    # Every column is text: "42" in an output column is the string the model should emit.
    columns = _csv_header(path)
    convert = pacsv.ConvertOptions(
        column_types={c: pa.string() for c in columns}, strings_can_be_null=False
    )
    return {"convert_options": convert}


def _csv_batches(path: str, fmt: str) -> Iterator[pa.RecordBatch]:
    import pyarrow.csv as pacsv

    fs, inner = _filesystem(path)
    _check_columns(path, _csv_header(path), fmt)
    with fs.open_input_stream(inner) as stream:
        try:
            reader = pacsv.open_csv(stream, **_csv_options(path))
            yield from reader
        except Exception as err:  # noqa: BLE001 - pyarrow names the offending row
            raise DataError(f"{path}: not a readable CSV file ({err})") from None


def _load_hf(path: str) -> Any:
    import datasets

    try:
        loaded = datasets.load_from_disk(path.removeprefix("file://"))
    except Exception as err:  # noqa: BLE001 - any loader failure is a bad directory
        raise DataError(f"{path}: not a readable saved Hugging Face dataset ({err})") from None
    if isinstance(loaded, datasets.DatasetDict):
        if "train" in loaded:
            return loaded["train"]
        if len(loaded) == 1:
            return next(iter(loaded.values()))
        raise DataError(
            f"{path}: holds splits {', '.join(loaded)} but no 'train'; give the split's "
            f"directory, e.g. {path}/{next(iter(loaded))}"
        )
    return loaded


def _hf_batches(path: str) -> Iterator[pa.RecordBatch]:
    dataset = _load_hf(path).with_format("arrow")
    for table in dataset.iter(batch_size=SCAN_BATCH_ROWS):
        yield from table.to_batches()


# ---------------------------------------------------------------- reading with Ray


def _canonical(row: dict[str, Any], fmt: str) -> str:
    """The row's format fields (nulls dropped) as compact JSON with sorted keys."""
    fields = FORMAT_FIELDS.get(fmt)
    kept = {k: v for k, v in row.items() if v is not None and (fields is None or k in fields)}
    return json.dumps(kept, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _sample_id(canonical: str) -> str:
    # Content-only: duplicate rows share an id, so they land on the same side of the
    # eval split and cannot leak from train into eval.
    return hashlib.sha1(canonical.encode("utf-8")).hexdigest()[:16]


def _rows_table(rows: list[dict[str, Any]], fmt: str) -> pa.Table:
    import pyarrow as pa

    canonical = [_canonical(r, fmt) for r in rows]
    return pa.table(
        {
            "sample_id": pa.array([_sample_id(c) for c in canonical], pa.string()),
            "row": pa.array(canonical, pa.string()),
        }
    )


def _parse_lines(batch: pa.Table, fmt: str) -> pa.Table:
    lines = batch.column("text").to_pylist()
    rows = [json.loads(line.lstrip("\ufeff")) for line in lines if line.strip()]
    return _rows_table(rows, fmt)


def _parse_arrays(batch: pa.Table, fmt: str) -> pa.Table:
    rows: list[dict[str, Any]] = []
    for blob in batch.column("bytes").to_pylist():
        rows += json.loads(blob.decode("utf-8").lstrip("\ufeff"))
    return _rows_table(rows, fmt)


def _from_records(batch: pa.Table, fmt: str) -> pa.Table:
    return _rows_table(batch.to_pylist(), fmt)


def read_rows(paths: str | list[str], fmt: str) -> ray.data.Dataset:
    """Read data sources into a Ray Dataset of raw rows.

    Args:
        paths: Files or saved HF dataset directories (as accepted by ``scan_source``).
        fmt: The rows' format; only its fields are kept. ``auto`` keeps every field.

    Returns:
        A lazy dataset with columns ``sample_id`` (16 hex chars of the sha1 of the
        row's canonical JSON) and ``row`` (that JSON, a string, so rows with different
        nested shapes do not need one Arrow schema). Row order follows the files.
    """
    import ray.data

    paths = [paths] if isinstance(paths, str) else list(paths)
    parts: list[ray.data.Dataset] = []
    for path in paths:
        kind = _source_kind(path)
        target = path if is_uri(path) else str(local_path(path))
        if kind == "jsonl" or (kind == "json" and not _json_is_array(path)):
            raw = ray.data.read_text(target, drop_empty_lines=True, file_extensions=None)
            parse = _parse_lines
        elif kind == "json":
            raw = ray.data.read_binary_files(target, file_extensions=None)
            parse = _parse_arrays
        elif kind == "parquet":
            raw = ray.data.read_parquet(target, partitioning=None, file_extensions=None)
            parse = _from_records
        elif kind == "csv":
            raw = ray.data.read_csv(
                target, partitioning=None, file_extensions=None, **_csv_options(path)
            )
            parse = _from_records
        else:
            # A saved HF dataset is memory-mapped Arrow; from_arrow copies it into the
            # object store (from_huggingface would first look the dataset up on the hub).
            table = _load_hf(path).with_format("arrow")[:]
            blocks = max(1, table.num_rows // 10_000)
            raw = ray.data.from_arrow(table, override_num_blocks=blocks)
            parse = _from_records
        parts.append(raw.map_batches(parse, batch_format="pyarrow", fn_kwargs={"fmt": fmt}))
    dataset = parts[0]
    for part in parts[1:]:
        dataset = dataset.union(part)
    return dataset


# ---------------------------------------------------------------- tokenizing


_TOKENIZERS: dict[str, Any] = {}


def load_tokenizer(tokenizer_dir: str) -> Any:
    """The tokenizer in ``tokenizer_dir``, loaded once per process."""
    if tokenizer_dir not in _TOKENIZERS:
        from transformers import AutoTokenizer

        _TOKENIZERS[tokenizer_dir] = AutoTokenizer.from_pretrained(tokenizer_dir)
    return _TOKENIZERS[tokenizer_dir]


def _unit_hash(text: str) -> float:
    """A uniform number in [0, 1) from a string, the same on every machine and run."""
    return int.from_bytes(hashlib.sha1(text.encode("utf-8")).digest()[:8], "big") / 2.0**64


def in_eval_split(sample_id: str, fraction: float) -> bool:
    """Whether a sample belongs to the eval split taken from train (``data.eval_fraction``)."""
    return _unit_hash(f"eval:{sample_id}") < fraction


def _split(batch: pa.Table, fraction: float, want_eval: bool) -> pa.Table:
    import pyarrow as pa

    ids = batch.column("sample_id").to_pylist()
    keep = [in_eval_split(s, fraction) == want_eval for s in ids]
    return batch.filter(pa.array(keep, pa.bool_()))


def _shuffle_key(seed: int, sample_id: str) -> str:
    return hashlib.sha1(f"{seed}:{sample_id}".encode()).hexdigest()


BASE_EXAMPLE_KEYS = ("input_ids", "labels", "truncated")
"""Keys every tokenized example has; an objective's row tokenizer may add its own columns
(e.g. the second answer of a preference pair), which travel with the row to its collate."""


def _tokenize(
    batch: pa.Table,
    fmt: str,
    tokenizer_dir: str,
    spec: dict[str, Any],
    seed: int | None,
    pack_groups: int,
) -> pa.Table:
    import pyarrow as pa

    from rayft.trainers.config import JobSpec

    tokenizer = load_tokenizer(tokenizer_dir)
    job = JobSpec.from_dict(spec)
    tokenize = objective_for(job).row_tokenizer(job)
    kept: list[tuple[str, dict[str, Any]]] = []
    dropped: list[str] = []
    for sample_id, text in zip(
        batch.column("sample_id").to_pylist(), batch.column("row").to_pylist(), strict=True
    ):
        example = tokenize(json.loads(text), fmt, tokenizer)
        if example is None:
            dropped.append(sample_id)
        else:
            kept.append((sample_id, example))
    counts = [0] * len(kept)
    if dropped and kept:
        counts[0] = len(dropped)
    elif dropped:
        # Every sample of this batch was dropped: one empty row carries the count.
        carrier = {"input_ids": [], "labels": [], "truncated": False}
        kept, counts = [("", carrier)], [len(dropped)]
    ids = [s for s, _ in kept]
    columns: dict[str, pa.Array] = {
        "input_ids": pa.array([e["input_ids"] for _, e in kept], pa.list_(pa.int32())),
        "labels": pa.array([e["labels"] for _, e in kept], pa.list_(pa.int32())),
        "sample_id": pa.array(ids, pa.string()),
        "truncated": pa.array([e["truncated"] for _, e in kept], pa.bool_()),
        "num_dropped": pa.array(counts, pa.int64()),
    }
    extra = [key for key in (kept[0][1] if kept else {}) if key not in BASE_EXAMPLE_KEYS]
    for key in extra:
        columns[key] = pa.array([e.get(key) for _, e in kept])
    if seed is not None:
        # A carrier row takes its key from a dropped sample so it lands anywhere.
        keys = [_shuffle_key(seed, s or f"dropped:{dropped[0]}") for s in ids]
        columns["shuffle_key"] = pa.array(keys, pa.string())
        if pack_groups:
            groups = [int(_unit_hash(k) * pack_groups) for k in keys]
            columns["pack_group"] = pa.array(groups, pa.int64())
    return pa.table(columns)


def _unpacked(batch: pa.Table) -> pa.Table:
    import pyarrow as pa
    import pyarrow.compute as pc

    ids = batch.column("sample_id").to_pylist()
    columns = {
        "input_ids": batch.column("input_ids"),
        "labels": batch.column("labels"),
        "sample_ids": pa.array([[s] if s else [] for s in ids], pa.list_(pa.string())),
        "num_truncated": pc.cast(batch.column("truncated"), pa.int64()),
        "num_dropped": batch.column("num_dropped"),
    }
    internal = {"sample_id", "truncated", "shuffle_key", "pack_group", *columns}
    # An objective's own columns (see BASE_EXAMPLE_KEYS) pass through unchanged.
    columns |= {name: batch.column(name) for name in batch.column_names if name not in internal}
    return pa.table(columns)


PACKED_COLUMNS = (
    "input_ids",
    "labels",
    "position_ids",
    "segment_ids",
    "sample_ids",
    "num_truncated",
    "num_dropped",
)


def _packed_table(rows: list[dict[str, Any]]) -> dict[str, pa.Array]:
    import pyarrow as pa

    ints = pa.list_(pa.int32())
    types = {"input_ids": ints, "labels": ints, "position_ids": ints, "segment_ids": ints}
    types |= {"sample_ids": pa.list_(pa.string()), "num_truncated": pa.int64()}
    types["num_dropped"] = pa.int64()
    return {name: pa.array([r[name] for r in rows], types[name]) for name in PACKED_COLUMNS}


def _examples(batch: pa.Table) -> list[dict[str, Any]]:
    return [
        {
            "input_ids": r["input_ids"],
            "labels": r["labels"],
            "sample_id": r["sample_id"],
            "truncated": r["truncated"],
            "num_dropped": r["num_dropped"],
        }
        for r in batch.select(
            ["input_ids", "labels", "sample_id", "truncated", "num_dropped"]
        ).to_pylist()
    ]


def _pack_in_order(batch: pa.Table, max_seq_len: int) -> pa.Table:
    import pyarrow as pa

    return pa.table(_packed_table(pack_examples(_examples(batch), max_seq_len)))


def _pack_group(group: pa.Table, max_seq_len: int) -> pa.Table:
    import pyarrow as pa

    # Rows of a group arrive in no particular order: order them by their shuffle key
    # so the packed rows depend only on the data and the seed.
    group = group.sort_by([("shuffle_key", "ascending"), ("sample_id", "ascending")])
    rows = pack_examples(_examples(group), max_seq_len)
    columns = _packed_table(rows)
    group_id = group.column("pack_group")[0].as_py()
    columns["pack_group"] = pa.array([group_id] * len(rows), pa.int64())
    columns["pack_index"] = pa.array(range(len(rows)), pa.int64())
    return pa.table(columns)


def _tokenized(
    rows: ray.data.Dataset,
    spec: JobSpec,
    fmt: str,
    tokenizer_dir: str,
    seed: int | None,
    pack_groups: int,
) -> ray.data.Dataset:
    kwargs = {
        "fmt": fmt,
        "tokenizer_dir": tokenizer_dir,
        "spec": spec.to_dict(),
        "seed": seed,
        "pack_groups": pack_groups,
    }
    return rows.map_batches(
        _tokenize, batch_size=TOKENIZE_BATCH_ROWS, batch_format="pyarrow", fn_kwargs=kwargs
    )


def pack_group_count(expected_rows: int) -> int:
    """How many groups shuffled packing draws its rows from (about ``PACK_GROUP_ROWS`` each)."""
    return max(1, round(expected_rows / PACK_GROUP_ROWS))


def _prepare(
    rows: ray.data.Dataset,
    spec: JobSpec,
    fmt: str,
    tokenizer_dir: str,
    shuffle: bool,
    expected_rows: int,
) -> ray.data.Dataset:
    """Tokenize, then shuffle and/or pack, deterministically for a given seed.

    Shuffling is a sort on ``sha1(seed:sample_id)``: unlike ``random_shuffle``, whose
    output depends on how rows fall into blocks, a sort on a content key gives the same
    order on every run and cluster size. It is an all-to-all exchange (like any global
    shuffle), which Ray spills to disk for data larger than the object store.

    Packing after a shuffle groups samples by a hash of that key into groups of about
    ``PACK_GROUP_ROWS`` (a ``groupby``, so a group's members do not depend on block
    boundaries), packs each group, and sorts the packed rows by (group, index).
    Packing without a shuffle packs consecutive batches of ``PACK_GROUP_ROWS`` samples
    in file order; batch boundaries follow Ray's blocks, which are the same run to run
    for the same files and cluster.
    """
    max_seq_len = spec.data.max_seq_len
    packing = spec.data.packing
    seed = spec.optim.seed if shuffle else None
    groups = pack_group_count(expected_rows) if shuffle and packing else 0
    tokens = _tokenized(rows, spec, fmt, tokenizer_dir, seed, groups)
    if not packing:
        if shuffle:
            tokens = tokens.sort(["shuffle_key", "sample_id"])
        return tokens.map_batches(_unpacked, batch_format="pyarrow")
    if not shuffle:
        return tokens.map_batches(
            _pack_in_order,
            batch_size=PACK_GROUP_ROWS,
            batch_format="pyarrow",
            fn_kwargs={"max_seq_len": max_seq_len},
        )
    # One hash partition per pack group at most: Ray's default (200) is far too many
    # for small fine-tuning sets and costs a task per partition.
    partitions = min(groups, 200)
    packed = (
        tokens.groupby("pack_group", num_partitions=partitions)
        .map_groups(_pack_group, batch_format="pyarrow", fn_kwargs={"max_seq_len": max_seq_len})
        .sort(["pack_group", "pack_index"])
    )
    return packed.select_columns(list(PACKED_COLUMNS))


# ---------------------------------------------------------------- preparing in the driver


def _slices(table: pa.Table, rows: int) -> list[pa.Table]:
    """``table`` in consecutive slices of ``rows`` rows; one empty slice for no rows."""
    return [table.slice(start, rows) for start in range(0, max(table.num_rows, 1), rows)]


def _concat(tables: list[pa.Table]) -> pa.Table:
    import pyarrow as pa

    # An all-dropped batch's carrier row lacks an objective's own columns: they are null.
    return pa.concat_tables(tables, promote_options="default")


def driver_rows(paths: list[str], fmt: str) -> pa.Table:
    """``read_rows`` in the driver: the same ``sample_id`` and ``row`` columns, one table."""
    return _concat([_rows_table(list(iter_rows(path)), fmt) for path in paths])


def _pack_groups(tokens: pa.Table, max_seq_len: int) -> pa.Table:
    import pyarrow.compute as pc

    column = tokens.column("pack_group")
    groups = sorted(set(column.to_pylist()))
    packed = _concat([_pack_group(tokens.filter(pc.equal(column, g)), max_seq_len) for g in groups])
    packed = packed.sort_by([("pack_group", "ascending"), ("pack_index", "ascending")])
    return packed.select(list(PACKED_COLUMNS))


def prepare_in_driver(
    rows: pa.Table,
    spec: JobSpec,
    fmt: str,
    tokenizer_dir: str,
    shuffle: bool,
    expected_rows: int,
) -> pa.Table:
    """``_prepare`` on one table in this process: the same steps, functions and order."""
    max_seq_len = spec.data.max_seq_len
    packing = spec.data.packing
    seed = spec.optim.seed if shuffle else None
    groups = pack_group_count(expected_rows) if shuffle and packing else 0
    kwargs = {"spec": spec.to_dict(), "seed": seed, "pack_groups": groups}
    tokens = _concat(
        [
            _tokenize(batch, fmt, tokenizer_dir, **kwargs)
            for batch in _slices(rows, TOKENIZE_BATCH_ROWS)
        ]
    )
    if not packing:
        if shuffle:
            tokens = tokens.sort_by([("shuffle_key", "ascending"), ("sample_id", "ascending")])
        return _unpacked(tokens)
    if not shuffle:
        return _concat(
            [_pack_in_order(batch, max_seq_len) for batch in _slices(tokens, PACK_GROUP_ROWS)]
        )
    return _pack_groups(tokens, max_seq_len)


def prepares_in_driver(spec: JobSpec, rows: int) -> bool:
    """Whether ``build_datasets`` prepares ``rows`` rows in the driver (``data.prepare``)."""
    if spec.data.prepare == "auto":
        return rows <= DRIVER_PREPARE_ROWS
    return spec.data.prepare == "driver"


def _datasets(
    spec: JobSpec,
    scanned: SourceScan,
    read: Callable[[list[str]], Any],
    split: Callable[[Any, bool], Any],
    prepare: Callable[[Any, bool, int], Any],
) -> tuple[Any, Any]:
    """``(train, eval)``: the sources read, the eval split taken, each side prepared.

    The steps are the same in the driver and with Ray Data; ``read``, ``split`` and
    ``prepare`` do them on a table or on a Ray Dataset.
    """
    data = spec.data
    train_rows = sum(r.rows for r in scanned.train)
    rows = read([r.path for r in scanned.train])
    held_out = None
    fraction = data.eval_fraction
    if scanned.eval:
        expected = sum(r.rows for r in scanned.eval)
        held_out = prepare(read([r.path for r in scanned.eval]), False, expected)
    elif fraction > 0:
        held_out = prepare(split(rows, True), False, int(train_rows * fraction))
        rows = split(rows, False)
    return prepare(rows, data.shuffle, int(train_rows * (1 - fraction))), held_out


def _datasets_in_driver(
    spec: JobSpec, tokenizer_dir: str, scanned: SourceScan
) -> tuple[pa.Table, pa.Table | None]:
    fmt, fraction = scanned.format, spec.data.eval_fraction
    return _datasets(
        spec,
        scanned,
        read=lambda paths: driver_rows(paths, fmt),
        split=lambda table, want_eval: _split(table, fraction, want_eval),
        prepare=lambda table, shuffle, expected: prepare_in_driver(
            table, spec, fmt, tokenizer_dir, shuffle, expected
        ),
    )


def _datasets_with_ray(
    spec: JobSpec, tokenizer_dir: str, scanned: SourceScan
) -> tuple[ray.data.Dataset, ray.data.Dataset | None]:
    fmt, fraction = scanned.format, spec.data.eval_fraction

    def split(rows: ray.data.Dataset, want_eval: bool) -> ray.data.Dataset:
        kwargs = {"fraction": fraction, "want_eval": want_eval}
        return rows.map_batches(_split, batch_format="pyarrow", fn_kwargs=kwargs)

    return _datasets(
        spec,
        scanned,
        read=lambda paths: read_rows(paths, fmt),
        split=split,
        prepare=lambda rows, shuffle, expected: _prepare(
            rows, spec, fmt, tokenizer_dir, shuffle, expected
        ),
    )


def _as_list(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _first_row(path: str) -> dict[str, Any]:
    kind = _source_kind(path)
    if kind == "jsonl" or (kind == "json" and not _json_is_array(path)):
        for raw in _iter_lines(path, hashlib.sha256()):
            if raw.strip():
                return json.loads(raw.decode("utf-8").lstrip("\ufeff"))
    if kind == "json":
        fs, inner = _filesystem(path)
        with fs.open_input_stream(inner) as stream:
            return json.loads(stream.read().decode("utf-8").lstrip("\ufeff"))[0]
    batches = {"parquet": _parquet_batches, "csv": _csv_batches}
    source = batches[kind](path, "auto") if kind in batches else _hf_batches(path)
    return next(iter(source)).slice(0, 1).to_pylist()[0]


def _check_tokenizer(path: str, fmt: str, tokenizer_dir: str, spec: JobSpec) -> None:
    """Tokenize the first row on the driver, so a tokenizer or chat-template problem is
    reported here rather than from inside a Ray task."""
    if not objective_class(spec).scan_tokenizes:
        return  # the objective's rows are counted, not tokenized, by the scan as well

    try:
        tokenizer = load_tokenizer(tokenizer_dir)
    except Exception as err:  # noqa: BLE001 - any loader failure means the same thing
        raise DataError(f"cannot load a tokenizer from {tokenizer_dir} ({err})") from None
    try:
        objective_for(spec).row_tokenizer(spec)(_first_row(path), fmt, tokenizer)
    except ChatTemplateError as err:
        raise DataError(f"{path}: cannot tokenize {fmt} rows with {tokenizer_dir}: {err}") from None


def dataset_fingerprint(train: list[SourceReport], eval_: list[SourceReport]) -> str:
    """sha256 over the train and eval sources' hashes, in the order given."""
    hasher = hashlib.sha256()
    for role, reports in (("train", train), ("eval", eval_)):
        for report in reports:
            hasher.update(f"{role}:{report.sha256}\n".encode())
    return hasher.hexdigest()


@dataclass(frozen=True)
class SourceScan:
    """Every data source of a job, checked once: what ``scan_sources`` found."""

    train: list[SourceReport]
    eval: list[SourceReport]
    format: str
    labels: list[str] = field(default_factory=list)
    """The distinct labels of every row, in class-id order, when the objective's own row
    check collects them (``RowCheck.labels``)."""
    rows: RowScan | None = None
    """Every row tokenized as training will tokenize it (``scan_rows``)."""


def _first_row_at(path: str) -> str:
    """Where a source's first row is, as ``file:line`` (JSON lines) or ``file: row index 0``."""
    kind = _source_kind(path)
    if kind == "jsonl" or (kind == "json" and not _json_is_array(path)):
        for lineno, raw in enumerate(_iter_lines(path, hashlib.sha256()), start=1):
            if raw.strip():
                return f"{path}:{lineno}"
    return f"{path}: row index 0"


def _check_objective_format(spec: JobSpec, reports: list[SourceReport]) -> None:
    """Every source is in a format the objective trains on (``Objective.format_problem``)."""
    objective = objective_class(spec)
    for report in reports:
        problem = objective.format_problem(report.format)
        if problem is not None:
            raise DataError(f"{_first_row_at(report.path)}: {problem}")


# ---------------------------------------------------------------- lengths


UNCUT_LEN = 1 << 30
"""``data.max_seq_len`` of the row tokenizer that measures rows whole."""
SCAN_ROWS_MAX = 200_000
"""Rows ``scan_rows`` tokenizes at most; the counts of a larger dataset cover its first rows."""


@dataclass(frozen=True)
class RowCounts:
    """One split's rows, tokenized by the run's row tokenizer at ``data.max_seq_len``."""

    rows: int = 0
    kept: int = 0
    """Rows with at least one labelled token left: the ones that train."""
    dropped: int = 0
    """Rows that lose every label to truncation (the prompt fills ``data.max_seq_len``)."""
    unlabelled: int = 0
    """Rows with no labelled token even whole (e.g. an empty answer)."""
    truncated: int = 0
    """Kept rows cut to ``data.max_seq_len``."""
    longest: int = 0
    """Tokens of the longest row, whole (a preference pair: prompt + its longer answer)."""
    prompt_range: tuple[int, int] | None = None
    """Fewest and most tokens before the first label, over the dropped rows."""


@dataclass(frozen=True)
class RowScan:
    """What tokenizing every row found: per split, and what packing makes of train."""

    max_seq_len: int
    train: RowCounts
    eval: RowCounts
    packed_rows: int | None = None
    """``data.packing``: the packed training rows, when so few that it matters (fewer
    tokens than ``scaling.num_workers`` full rows); ``None`` otherwise."""
    template: str = ""
    """How prompts are rendered, for messages (e.g. "with the chat template")."""
    complete: bool = True
    """False when only the first ``SCAN_ROWS_MAX`` rows were tokenized."""

    @property
    def notice(self) -> str | None:
        """One line when rows are dropped or truncated, else ``None``."""
        train = self.train
        parts = []
        if train.dropped:
            low, high = train.prompt_range or (0, 0)
            parts.append(
                f"{train.dropped} of {train.rows} training rows lose every label at "
                f"data.max_seq_len={self.max_seq_len} (prompts of {_span(low, high)} tokens"
                f"{self.template}) and are dropped"
            )
        if train.unlabelled:
            parts.append(
                f"{train.unlabelled} of {train.rows} training rows have no labelled token at "
                "all and are dropped"
            )
        if train.truncated:
            parts.append(f"{train.truncated} of {train.rows} training rows are truncated")
        if not parts:
            return None
        first = "" if self.complete else f" (in the first {SCAN_ROWS_MAX} rows)"
        return (
            f"[rayft] data{first}: {'; '.join(parts)}; the longest row has {train.longest} "
            f"tokens (data.max_seq_len ≥ {train.longest} keeps every row whole)"
        )


class _Tally:
    """Counts one split's rows as they are tokenized (see ``RowCounts``)."""

    def __init__(self, keep_lengths: int) -> None:
        self.counts: dict[str, int] = dict.fromkeys(
            ("rows", "kept", "dropped", "unlabelled", "truncated", "longest"), 0
        )
        self.prompts: list[int] = []
        self.tokens = 0
        self.keep_lengths = keep_lengths
        self.lengths: list[tuple[str, int]] = []
        """Kept rows' (sample id, tokens), while the split has fewer than ``keep_lengths``."""

    def add(self, sample_id: str, cut: dict | None, whole: dict | None) -> None:
        counts = self.counts
        counts["rows"] += 1
        counts["longest"] = max(counts["longest"], _tokens(whole or cut))
        if cut is None:
            if whole is None:
                counts["unlabelled"] += 1
                return
            counts["dropped"] += 1
            start = _label_start(whole)
            self.prompts = [min(self.prompts + [start]), max(self.prompts + [start])]
            return
        counts["kept"] += 1
        counts["truncated"] += bool(cut["truncated"])
        length = _tokens(cut)
        self.tokens += length
        if self.tokens < self.keep_lengths:
            self.lengths.append((sample_id, length))
        else:
            self.lengths = []

    def result(self) -> RowCounts:
        span = (self.prompts[0], self.prompts[1]) if self.prompts else None
        return RowCounts(**self.counts, prompt_range=span)


def _tokens(example: dict | None) -> int:
    if example is None:
        return 0
    rejected = example.get("rejected_input_ids") or []
    return max(len(example["input_ids"]), len(rejected))


def _label_start(example: dict) -> int:
    """Tokens before the first label the model predicts (labels[0] never is)."""
    labels = example["labels"]
    return next((i for i in range(1, len(labels)) if labels[i] != IGNORE_INDEX), len(labels))


def _span(low: int, high: int) -> str:
    return str(low) if low == high else f"{low}–{high}"


def iter_rows(path: str) -> Iterator[dict[str, Any]]:
    """The rows of a source already checked by ``scan_source``, in file order."""
    kind = _source_kind(path)
    if kind == "jsonl" or (kind == "json" and not _json_is_array(path)):
        for raw in _iter_lines(path, hashlib.sha256()):
            line = raw.decode("utf-8").lstrip("\ufeff")
            if line.strip():
                yield json.loads(line)
        return
    if kind == "json":
        fs, inner = _filesystem(path)
        with fs.open_input_stream(inner) as stream:
            yield from json.loads(stream.read().decode("utf-8").lstrip("\ufeff"))
        return
    batches = {"parquet": _parquet_batches, "csv": _csv_batches}
    source = batches[kind](path, "auto") if kind in batches else _hf_batches(path)
    for batch in source:
        yield from batch.to_pylist()


def _template_note(tokenizer: Any, fmt: str) -> str:
    """How prompts are rendered, for messages: the chat template, and whether it adds a
    system prompt to rows that have none."""
    from rayft.trainers.formats import _render

    if fmt == "text" or not getattr(tokenizer, "chat_template", None):
        return ""
    try:
        bare = _render(tokenizer, [{"role": "user", "content": "x"}], True)
    except Exception:  # noqa: BLE001 - the note is only a hint
        return " with the chat template"
    if "system" in bare.lower():
        return " with the chat template, which adds a default system prompt to rows without one"
    return " with the chat template"


def _base_model_dir(spec: JobSpec, root: StorageRoot | None) -> str:
    """``spec.model.name`` resolved in ``root`` as the run will resolve it."""
    if root is None:
        raise ValueError("scanning rows needs the base model's tokenizer_dir or the storage root")
    return str(resolve_model(spec.model.name, root.models, root))


def scan_rows(
    spec: JobSpec, scan: SourceScan, tokenizer_dir: str | None, root: StorageRoot | None = None
) -> RowScan:
    """Tokenize every row as the run's row tokenizer will, and count what it keeps.

    Each row of ``data.train`` (and of the eval data: ``data.eval``, or the
    ``data.eval_fraction`` split of train, by the same sample ids as ``build_datasets``)
    goes through ``objective_for(spec).row_tokenizer(spec)`` with the base model's
    tokenizer, chat template included; a dropped or truncated row is tokenized again
    whole to measure what it needs. Rows of an objective that loses no label to truncation
    (``Objective.scan_tokenizes`` false) are counted, not tokenized.

    Cost: one more pass over the files and one tokenization per row, on the driver, the
    same work Ray Data's tokenize tasks do: with a chat template, rendering dominates
    (about 3 ms per short row on one busy CPU core with ``tiny-llama``'s tokenizer, so
    ~20 s per 10k rows). At most ``SCAN_ROWS_MAX`` rows are tokenized; the counts of a
    larger dataset cover its first rows (``RowScan.complete`` is false). Memory holds
    one row at a time.

    Args:
        spec: The job spec.
        scan: What ``scan_sources`` found in the files (their format).
        tokenizer_dir: The base model's directory; ``None`` resolves ``spec.model.name``
            in ``root`` as the run will (``trainers.models.resolve_model``).
        root: The run's storage root; needed when ``tokenizer_dir`` is ``None``.
    """
    data = spec.data
    tokenizer = cut = whole = None
    if objective_class(spec).scan_tokenizes:
        if tokenizer_dir is None:
            tokenizer_dir = _base_model_dir(spec, root)
        try:
            tokenizer = load_tokenizer(tokenizer_dir)
        except Exception as err:  # noqa: BLE001 - any loader failure means the same thing
            raise DataError(f"cannot load a tokenizer from {tokenizer_dir} ({err})") from None
        objective = objective_for(spec)
        cut = objective.row_tokenizer(spec)
        uncut = spec.model_copy(update={"data": data.model_copy(update={"max_seq_len": UNCUT_LEN})})
        whole = objective.row_tokenizer(uncut)
    budget = spec.scaling.num_workers * data.max_seq_len if data.packing else 0
    train, held_out = _Tally(budget), _Tally(0)
    split = data.eval_fraction if not scan.eval else 0.0
    measured = 0
    for role, path, row in _tagged_rows(scan):
        if measured == SCAN_ROWS_MAX:
            break
        measured += 1
        sample_id = _sample_id(_canonical(row, scan.format))
        tally = held_out if role == "eval" or in_eval_split(sample_id, split) else train
        if cut is None:
            tally.add(sample_id, {"input_ids": [], "truncated": False}, None)
            continue
        try:
            example = cut(row, scan.format, tokenizer)
            full = None
            if example is None or example["truncated"]:
                full = whole(row, scan.format, tokenizer)
        except ChatTemplateError as err:
            raise DataError(
                f"{path}: cannot tokenize {scan.format} rows with {tokenizer_dir}: {err}"
            ) from None
        tally.add(sample_id, example, full)
    packed = None
    if train.lengths:
        expected = int(sum(r.rows for r in scan.train) * (1 - split))
        packed = _packed_rows(train.lengths, spec, expected)
    return RowScan(
        data.max_seq_len,
        train.result(),
        held_out.result(),
        packed,
        _template_note(tokenizer, scan.format) if tokenizer is not None else "",
        complete=measured < SCAN_ROWS_MAX,
    )


def _tagged_rows(scan: SourceScan) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for role, reports in (("train", scan.train), ("eval", scan.eval)):
        for report in reports:
            for row in iter_rows(report.path):
                yield role, report.path, row


def _packed_rows(kept: list[tuple[str, int]], spec: JobSpec, expected_rows: int) -> int:
    """Rows that packing makes of the kept samples, grouped as ``_prepare`` groups them."""
    max_seq_len = spec.data.max_seq_len
    if spec.data.shuffle:
        count = pack_group_count(expected_rows)
        groups: dict[int, list[int]] = {}
        for sample_id, length in kept:
            key = _shuffle_key(spec.optim.seed, sample_id)
            groups.setdefault(int(_unit_hash(key) * count), []).append(length)
        chunks = list(groups.values())
    else:
        lengths = [length for _, length in kept]
        chunks = [lengths[i : i + PACK_GROUP_ROWS] for i in range(0, len(lengths), PACK_GROUP_ROWS)]
    return sum(len(first_fit_decreasing(chunk, max_seq_len)) for chunk in chunks)


def check_trainable(spec: JobSpec, rows: RowScan) -> None:
    """Refuse data that would train on nothing, or leave a worker an empty shard.

    Raises:
        DataError: No training row keeps a label; fewer kept rows (or packed rows) than
            ``scaling.num_workers``; or eval data in which no row keeps a label. The
            message names ``data.max_seq_len`` and the length the rows need.
    """
    train, workers = rows.train, spec.scaling.num_workers
    msl = rows.max_seq_len
    if train.kept == 0:
        raise DataError(_nothing_left("training", train, rows))
    if train.kept < workers:
        cut = ""
        if train.dropped:
            cut = (
                f" ({train.dropped} of {train.rows} lose every label at data.max_seq_len={msl}; "
                f"data.max_seq_len ≥ {train.longest} keeps them)"
            )
        raise DataError(
            f"only {train.kept} training row(s) keep a label{cut}, fewer than "
            f"scaling.num_workers={workers}: every worker needs at least one row; set "
            f"scaling.num_workers ≤ {train.kept} or add rows to data.train"
        )
    if rows.packed_rows is not None and rows.packed_rows < workers:
        raise DataError(
            f"the {train.kept} training rows pack into {rows.packed_rows} sequence(s) of "
            f"data.max_seq_len={msl} tokens (data.packing), fewer than "
            f"scaling.num_workers={workers}: every worker needs at least one; set "
            f"scaling.num_workers ≤ {rows.packed_rows}, data.packing=false, or add rows"
        )
    if rows.eval.rows and rows.eval.kept == 0:
        raise DataError(_nothing_left("eval", rows.eval, rows))


def _nothing_left(split: str, counts: RowCounts, rows: RowScan) -> str:
    msl = rows.max_seq_len
    if counts.dropped == 0:
        return (
            f"no {split} row has a labelled token (every answer is empty); give rows with "
            "a non-empty completion/assistant turn"
        )
    low, high = counts.prompt_range or (0, 0)
    empty = (
        f" ({counts.unlabelled} more have no labelled token at all)" if counts.unlabelled else ""
    )
    return (
        f"every {split} completion is cut away: prompts render to {_span(low, high)} tokens"
        f"{rows.template}, data.max_seq_len is {msl}{empty}; the rows need up to "
        f"{counts.longest} tokens: set data.max_seq_len ≥ {counts.longest}"
    )


def scan_sources(
    spec: JobSpec, tokenizer_dir: str | None = None, root: StorageRoot | None = None
) -> SourceScan:
    """Scan every train and eval file of ``spec`` and tokenize its rows (nothing from Ray).

    The files are checked row by row (``scan_source``), then every row is tokenized as
    training will tokenize it (``scan_rows``; its docstring gives the cost). Rows that
    lose every label or are truncated are counted in ``SourceScan.rows`` and said in one
    line on stderr.

    Args:
        spec: The job spec.
        tokenizer_dir: The base model's directory, when the caller has it; else
            ``spec.model.name`` is resolved here (from the model cache, without Ray).
        root: The run's storage root (``spec.storage``), where ``spec.model.name`` is
            resolved; needed when ``tokenizer_dir`` is ``None``.

    Raises:
        DataError: A source is missing or malformed, the sources are in different
            formats, or the rows cannot train (``check_trainable``).
    """
    data = spec.data
    train_paths, eval_paths = _as_list(data.train), _as_list(data.eval)
    if not train_paths:
        raise DataError("data.train lists no files; give at least one")
    # An objective with its own row check reads its rows whatever data.format says.
    own = objective_class(spec).row_check(spec)
    train_reports = [scan_source(p, data.format, own) for p in train_paths]
    eval_reports = [scan_source(p, data.format, own) for p in eval_paths]
    reports = train_reports + eval_reports
    _check_objective_format(spec, reports)
    formats = {r.format for r in reports}
    if len(formats) > 1:
        listing = ", ".join(f"{r.path} ({r.format})" for r in reports)
        raise DataError(
            f"data sources are in different formats: {listing}; convert them to one format"
        )
    labels = own.labels() if own is not None else []
    scan = SourceScan(train_reports, eval_reports, formats.pop(), labels)
    rows = scan_rows(spec, scan, tokenizer_dir, root)
    check_trainable(spec, rows)
    if rows.notice:
        print(rows.notice, file=sys.stderr, flush=True)
    return replace(scan, rows=rows)


def build_datasets(
    spec: JobSpec, tokenizer_dir: str, scanned: SourceScan | None = None
) -> PreparedData:
    """Check every source, then build the lazy train (and eval) Ray Datasets.

    Args:
        spec: The job spec; ``spec.data`` says what to read and how, ``spec.optim.seed``
            seeds the shuffle.
        tokenizer_dir: A local directory ``AutoTokenizer.from_pretrained`` can load
            on every node.
        scanned: What ``scan_sources(spec)`` already found (the CLI scans before it
            starts Ray); the sources are scanned here when it is omitted.

    Returns:
        ``PreparedData`` whose datasets have the columns listed in this module's
        docstring. The eval split (``data.eval_fraction``) holds the samples with
        ``sha1("eval:" + sample_id)`` below the fraction, so it is the same on every
        run; eval data is never shuffled.

    Raises:
        DataError: A source is missing or malformed (raised before any Ray work), or
            the sources are in different formats.
    """
    data = spec.data
    scanned = scanned or scan_sources(spec, tokenizer_dir)
    train_reports, eval_reports, fmt = scanned.train, scanned.eval, scanned.format
    reports = train_reports + eval_reports
    train_rows = sum(r.rows for r in train_reports)
    if scanned.rows is None:  # the scan tokenized every row already, this tokenizer included
        _check_tokenizer(train_reports[0].path, fmt, tokenizer_dir, spec)
    eval_rows = sum(r.rows for r in eval_reports)
    in_driver = prepares_in_driver(spec, train_rows + eval_rows)
    if in_driver:
        train_ds, eval_ds = _datasets_in_driver(spec, tokenizer_dir, scanned)
    else:
        train_ds, eval_ds = _datasets_with_ray(spec, tokenizer_dir, scanned)
    return PreparedData(
        train=train_ds,
        eval=eval_ds,
        reports=reports,
        fingerprint=dataset_fingerprint(train_reports, eval_reports),
        format=fmt,
        train_rows=train_rows,
        eval_rows=eval_rows,
        packed=data.packing,
        eval_fraction=data.eval_fraction if not eval_reports else 0.0,
        in_driver=in_driver,
    )
