"""Evaluation datasets are read a row at a time, up to the row limit, naming bad rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rayft.serving.errors import BadRequest, TooLarge
from rayft.serving.evaluation import read_rows
from rayft.serving.json_rows import MAX_ROW_BYTES

ROW = {"prompt": 'a \u00e9 [not] {a} \\"quote\\"', "completion": "b"}


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_rows_come_back_whole_in_order(tmp_path: Path, suffix: str) -> None:
    rows = [{**ROW, "i": i, "nested": {"x": [i, {"y": "]"}]}} for i in range(300)]
    if suffix == ".json":  # pretty-printed, with a byte order mark, spanning many reads
        data = ("\ufeff" + json.dumps(rows, indent=2, ensure_ascii=False)).encode()
    else:
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n\n" for r in rows).encode()
    assert read_rows(write(tmp_path / f"d{suffix}", data)) == rows
    assert read_rows(write(tmp_path / f"e{suffix}", data), limit=300) == rows


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_reading_stops_after_the_limit_without_reading_the_rest(tmp_path: Path, suffix) -> None:
    head = [json.dumps({**ROW, "i": i}) for i in range(11)]
    # Past the 11th row the file is garbage: read, it would be a 400, not a 413.
    if suffix == ".json":
        data = ("[" + ",\n".join(head) + ", {\xff broken").encode("latin-1")
    else:
        data = ("\n".join(head) + "\n{\xff broken\n").encode("latin-1")
    with pytest.raises(TooLarge, match="more than 10 rows"):
        read_rows(write(tmp_path / f"d{suffix}", data), limit=10)


@pytest.mark.parametrize(
    ("name", "data", "says"),
    [
        ("latin.jsonl", b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n', "latin.jsonl:2: not UTF-8"),
        (
            "latin.json",
            b'[{"prompt": "ok"}, {"prompt": "caf\xe9"}]',
            "latin.json:row index 1: not UTF-8",
        ),
        (
            "deep.jsonl",
            b'{"a": 1}\n' + b"[" * 100_000 + b"\n",
            "deep.jsonl:2: JSON nested too deeply",
        ),
        (
            "deep.json",
            b'[{"a": 1}, {"a": ' + b"[" * 100_000 + b"]",
            "deep.json:row index 1: JSON nested",
        ),
        ("bad.json", b'[{"a": 1}, {"a": 2,}]', "bad.json:row index 1: not valid JSON"),
        ("notrows.json", b"[1, 2]", "row index 0: a row is a JSON object"),
        ("cut.json", b'[{"a": 1}, {"a": 2}', "row index 2: expected ',' or ']'"),
        ("tail.json", b'[{"a": 1}] {"a": 2}', "data after the array's end"),
        (
            "long.jsonl",
            b'{"a": "' + b"x" * MAX_ROW_BYTES + b'"}\n',
            "long.jsonl:1: the line is over",
        ),
        (
            "long.json",
            b'[{"a": "' + b"x" * (MAX_ROW_BYTES + 10) + b'"}]',
            "row index 0: the row is over",
        ),
    ],
)
def test_bad_rows_are_400_naming_the_line_or_row(tmp_path: Path, name, data, says) -> None:
    with pytest.raises(BadRequest) as refused:
        read_rows(write(tmp_path / name, data))
    assert says in str(refused.value)
    assert refused.value.status == 400


def test_serve_arguments_refuse_a_queue_smaller_than_an_evaluation() -> None:
    from rayft.serving.app import parse_args
    from rayft.trainers.config import ConfigError

    with pytest.raises(ConfigError, match="max_queued_rows"):
        parse_args({"model": "tiny-llama", "max_eval_rows": 3000})
    args = parse_args({"model": "tiny-llama", "max_eval_rows": 3000, "max_queued_rows": 3000})
    assert args.max_queued_rows == 3000 and args.max_concurrent_uploads == 4
