"""Driver-side source checks: formats, file:line errors, hashes (no Ray)."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from rayft.trainers.data import (
    DataError,
    SourceReport,
    dataset_fingerprint,
    in_eval_split,
    scan_source,
)
from rayft.trainers.storage import StorageRoot

ROWS: dict[str, dict[str, Any]] = {
    "chat": {
        "messages": [
            {"role": "user", "content": "capital of france"},
            {"role": "assistant", "content": "paris"},
        ]
    },
    "prompt_completion": {"prompt": "capital of france", "completion": "paris"},
    "alpaca": {"instruction": "name the capital", "input": "france", "output": "paris"},
    "text": {"text": "paris is the capital of france"},
}


def write_jsonl(path: Path, rows: list[Any], blank_after: int | None = None) -> Path:
    lines = [json.dumps(r) for r in rows]
    if blank_after is not None:
        lines.insert(blank_after, "")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("fmt", list(ROWS))
def test_jsonl_format_detection(tmp_path: Path, fmt: str) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", [ROWS[fmt]] * 3, blank_after=1)
    report = scan_source(str(path))
    assert report == SourceReport(
        str(path), fmt, 3, 1, hashlib.sha256(path.read_bytes()).hexdigest()
    )


def test_malformed_line_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    write_jsonl(path, [ROWS["chat"]] * 6)
    with path.open("a") as handle:
        handle.write('{"messages": [\n')
    with pytest.raises(DataError, match=r"train\.jsonl:7: not valid JSON \("):
        scan_source(str(path))


def test_missing_field_names_field_and_line(tmp_path: Path) -> None:
    rows = [ROWS["prompt_completion"]] * 2 + [{"prompt": "no answer"}]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(DataError, match=r"train\.jsonl:3: missing field 'completion'"):
        scan_source(str(path))
    with pytest.raises(DataError, match=r"train\.jsonl:3: missing field 'completion'"):
        scan_source(str(path), "prompt_completion")


def test_rows_must_all_fit_the_detected_format(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", [ROWS["chat"], ROWS["alpaca"]])
    with pytest.raises(
        DataError,
        match=r"train\.jsonl:2: missing field 'messages' \(format chat, detected at .*train\.jsonl:1\)",
    ):
        scan_source(str(path))
    bad_role = {"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}
    path = write_jsonl(tmp_path / "roles.jsonl", [ROWS["chat"], bad_role])
    with pytest.raises(DataError, match=r"roles\.jsonl:2: messages\[1\]\.role must be one of"):
        scan_source(str(path))


def test_declared_format_is_enforced(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", [ROWS["text"]])
    with pytest.raises(DataError, match=r"train\.jsonl:1: missing field 'messages'.*data\.format"):
        scan_source(str(path), "chat")


def test_unknown_rows_and_non_objects(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", [{"question": "a", "answer": "b"}])
    with pytest.raises(DataError, match=r"train\.jsonl:1: row fits no known format"):
        scan_source(str(path))
    path = write_jsonl(tmp_path / "list.jsonl", [[1, 2]])
    with pytest.raises(DataError, match=r"list\.jsonl:1: a row must be a JSON object"):
        scan_source(str(path))


def test_missing_file_and_bad_sources_are_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match=rf"{missing}: file not found"):
        scan_source(str(missing))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match=r"empty\.jsonl: has no rows"):
        scan_source(str(empty))
    odd = tmp_path / "train.txt"
    odd.write_text("hi")
    with pytest.raises(DataError, match=r"unsupported file type '\.txt'"):
        scan_source(str(odd))
    plain_dir = tmp_path / "somedir"
    plain_dir.mkdir()
    with pytest.raises(DataError, match="not a saved Hugging Face dataset"):
        scan_source(str(plain_dir))


def test_json_array_and_json_lines_in_a_json_file(tmp_path: Path) -> None:
    array = tmp_path / "train.json"
    array.write_text(json.dumps([ROWS["alpaca"]] * 4, indent=2))
    assert scan_source(str(array)).format == "alpaca"
    assert scan_source(str(array)).rows == 4
    lines = write_jsonl(tmp_path / "lines.json", [ROWS["text"]] * 2)
    assert (scan_source(str(lines)).format, scan_source(str(lines)).rows) == ("text", 2)
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps([ROWS["alpaca"], {"instruction": "x"}]))
    with pytest.raises(DataError, match=r"broken\.json: row index 1: missing field 'output'"):
        scan_source(str(broken))


@pytest.mark.parametrize("fmt", list(ROWS))
def test_parquet_format_detection(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist([ROWS[fmt]] * 5), path)
    report = scan_source(str(path))
    assert (report.format, report.rows, report.blank_lines) == (fmt, 5, 0)
    assert report.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_parquet_errors_name_the_row_index(tmp_path: Path) -> None:
    path = tmp_path / "train.parquet"
    rows = [ROWS["prompt_completion"]] * 3 + [{"prompt": "q", "completion": None}]
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(DataError, match=r"train\.parquet: row index 3: missing field 'completion'"):
        scan_source(str(path))
    with pytest.raises(DataError, match=r"train\.parquet: no column 'messages'.*prompt"):
        scan_source(str(path), "chat")


@pytest.mark.parametrize("fmt", ["prompt_completion", "alpaca", "text"])
def test_csv_format_detection(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / "train.csv"
    pacsv.write_csv(pa.Table.from_pylist([ROWS[fmt]] * 3), path)
    report = scan_source(str(path))
    assert (report.format, report.rows) == (fmt, 3)


def test_csv_values_are_text_and_errors_name_the_row(tmp_path: Path) -> None:
    path = tmp_path / "numbers.csv"
    path.write_text("prompt,completion\nhow many,42\nand now,7\n")
    assert scan_source(str(path)).format == "prompt_completion"  # 42 is the string "42"
    path = tmp_path / "gap.csv"
    path.write_text("instruction,input,output\ndo,,done\nx,y,\n")
    with pytest.raises(DataError, match=r"gap\.csv: no column 'text'"):
        scan_source(str(path), "text")
    report = scan_source(str(path), "alpaca")
    assert report.rows == 2


@pytest.mark.parametrize("fmt", list(ROWS))
def test_hf_dataset_dir_format_detection(tmp_path: Path, fmt: str) -> None:
    import datasets

    target = tmp_path / "hf"
    datasets.Dataset.from_list([ROWS[fmt]] * 4).save_to_disk(str(target))
    report = scan_source(str(target))
    assert (report.format, report.rows) == (fmt, 4)
    assert report.sha256 == scan_source(str(target)).sha256
    # A DatasetDict directory reads its train split.
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_list([ROWS[fmt]] * 2)})
    splits.save_to_disk(str(tmp_path / "dd"))
    assert scan_source(str(tmp_path / "dd")).rows == 2


def test_hashes_change_with_content(tmp_path: Path) -> None:
    a = scan_source(str(write_jsonl(tmp_path / "a.jsonl", [ROWS["text"]])))
    b = scan_source(str(write_jsonl(tmp_path / "b.jsonl", [ROWS["text"]] * 2)))
    assert a.sha256 != b.sha256
    assert dataset_fingerprint([a], []) != dataset_fingerprint([b], [])
    assert dataset_fingerprint([a], [b]) != dataset_fingerprint([b], [a])
    assert dataset_fingerprint([a], [b]) == dataset_fingerprint([a], [b])


def test_eval_split_is_deterministic_and_proportional() -> None:
    ids = [hashlib.sha1(str(i).encode()).hexdigest()[:16] for i in range(4000)]
    chosen = [s for s in ids if in_eval_split(s, 0.1)]
    assert chosen == [s for s in ids if in_eval_split(s, 0.1)]
    assert 300 < len(chosen) < 500
    assert not any(in_eval_split(s, 0.0) for s in ids)


def test_tokenize_batch_carries_dropped_counts(tiny_model_dir: Path) -> None:
    from rayft.trainers.data import _tokenize

    long = {"prompt": "the quick brown fox " * 20, "completion": "paris"}
    short = {"prompt": "capital", "completion": "paris"}

    def batch(rows: list[dict[str, Any]]) -> pa.Table:
        ids = [f"id{i}" for i in range(len(rows))]
        return pa.table({"sample_id": ids, "row": [json.dumps(r) for r in rows]})

    kwargs = {
        "fmt": "prompt_completion",
        "tokenizer_dir": str(tiny_model_dir),
        "spec": {"data": {"train": "unused.jsonl", "max_seq_len": 16}},
        "seed": 1,
        "pack_groups": 4,
    }
    out = _tokenize(batch([long, short, long]), **kwargs)
    assert out.column("sample_id").to_pylist() == ["id1"]
    assert out.column("num_dropped").to_pylist() == [2]
    assert 0 <= out.column("pack_group")[0].as_py() < 4
    # A batch in which every row is dropped yields one empty row carrying the count.
    carrier = _tokenize(batch([long, long]), **kwargs)
    assert carrier.column("input_ids").to_pylist() == [[]]
    assert carrier.column("num_dropped").to_pylist() == [2]


def test_build_datasets_reports_problems_before_any_ray_work(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    from transformers import AutoTokenizer

    from rayft.trainers.config import validate_spec
    from rayft.trainers.data import build_datasets

    missing = validate_spec({"data": {"train": str(tmp_path / "missing.jsonl")}})
    with pytest.raises(DataError, match=r"missing\.jsonl: file not found"):
        build_datasets(missing, str(tiny_model_dir))

    # Chat rows with a tokenizer that has no chat template fail on the driver.
    plain = AutoTokenizer.from_pretrained(tiny_model_dir)
    plain.chat_template = None
    plain.save_pretrained(tmp_path / "plain_tok")
    (tmp_path / "plain_tok" / "chat_template.jinja").unlink(missing_ok=True)
    path = write_jsonl(tmp_path / "train.jsonl", [ROWS["chat"]])
    spec = validate_spec({"data": {"train": str(path)}})
    with pytest.raises(DataError, match=r"train\.jsonl: cannot tokenize chat rows"):
        build_datasets(spec, str(tmp_path / "plain_tok"))

    mixed = validate_spec(
        {
            "data": {
                "train": str(path),
                "eval": str(write_jsonl(tmp_path / "e.jsonl", [ROWS["text"]])),
            }
        }
    )
    with pytest.raises(DataError, match="different formats"):
        build_datasets(mixed, str(tiny_model_dir))


# ---------------------------------------------------------------- rows measured against max_seq_len

LONG_PROMPT = "the quick brown fox jumps over the lazy dog " * 3


def _pc_rows(prompts: list[str]) -> list[dict[str, Any]]:
    return [{"prompt": p, "completion": f"answer {i}"} for i, p in enumerate(prompts)]


def _whole_lengths(rows: list[dict[str, Any]], model_dir: Path) -> tuple[list[int], list[int]]:
    """(tokens of each row, tokens before its answer), measured with the tokenizer directly."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    full, prompt = [], []
    for row in rows:
        user = [{"role": "user", "content": row["prompt"]}]
        both = user + [{"role": "assistant", "content": row["completion"]}]
        render = tok.apply_chat_template
        prompt_text = render(user, tokenize=False, add_generation_prompt=True)
        full_text = render(both, tokenize=False)
        ids = tok(prompt_text, add_special_tokens=False)["input_ids"]
        rest = tok(full_text[len(prompt_text) :], add_special_tokens=False)["input_ids"]
        prompt.append(len(ids))
        full.append(len(ids) + len(rest))
    return full, prompt


def _spec(path: Path, **data: Any) -> Any:
    from rayft.trainers.config import validate_spec

    workers = data.pop("num_workers", 1)
    return validate_spec(
        {
            "model": {"name": "tiny-llama"},
            "data": {"train": str(path), **data},
            "scaling": {"num_workers": workers},
        }
    )


def test_prompts_that_fill_max_seq_len_are_refused_with_the_length_needed(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    from rayft.trainers.data import scan_sources

    rows = _pc_rows([LONG_PROMPT + " extra" * i for i in range(6)])
    full, prompt = _whole_lengths(rows, tiny_model_dir)
    assert 16 < min(prompt) < max(prompt)  # the template alone leaves no room for an answer
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(DataError) as err:
        scan_sources(_spec(path, max_seq_len=16), root=StorageRoot.resolve())
    message = str(err.value)
    assert "every training completion is cut away" in message
    assert "data.max_seq_len is 16" in message
    assert f"prompts render to {min(prompt)}–{max(prompt)} tokens" in message
    assert f"set data.max_seq_len ≥ {max(full)}" in message
    # At that length every row trains whole.
    scan = scan_sources(_spec(path, max_seq_len=max(full)), root=StorageRoot.resolve())
    assert scan.rows is not None
    assert (scan.rows.train.kept, scan.rows.train.truncated) == (6, 0)


def test_dropped_and_truncated_rows_are_counted_and_reported(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from rayft.trainers.data import scan_sources

    rows = _pc_rows([LONG_PROMPT + str(i) for i in range(3)] + [f"hi {i}" for i in range(5)])
    full, prompt = _whole_lengths(rows, tiny_model_dir)
    # Short rows fit; long prompts alone are longer than the limit.
    limit = max(full[3:])
    assert min(prompt[:3]) >= limit
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    capsys.readouterr()
    scan = scan_sources(_spec(path, max_seq_len=limit), root=StorageRoot.resolve())
    assert scan.rows is not None
    train = scan.rows.train
    assert (train.rows, train.kept, train.dropped, train.truncated) == (8, 5, 3, 0)
    assert train.longest == max(full)
    assert train.prompt_range == (min(prompt[:3]), max(prompt[:3]))
    lines = [line for line in capsys.readouterr().err.splitlines() if "[rayft] data" in line]
    assert len(lines) == 1
    assert f"3 of 8 training rows lose every label at data.max_seq_len={limit}" in lines[0]

    # A limit inside the answers truncates rows without dropping them.
    short = _pc_rows([f"hi {i}" for i in range(4)])
    s_full, s_prompt = _whole_lengths(short, tiny_model_dir)
    cut = max(s_prompt) + 2
    assert cut < min(s_full)
    path = write_jsonl(tmp_path / "short.jsonl", short)
    scan = scan_sources(_spec(path, max_seq_len=cut), root=StorageRoot.resolve())
    assert scan.rows is not None
    assert (scan.rows.train.kept, scan.rows.train.truncated, scan.rows.train.dropped) == (4, 4, 0)
    assert "4 of 4 training rows are truncated" in capsys.readouterr().err


def test_fewer_rows_than_workers_is_refused(tmp_path: Path, tiny_model_dir: Path) -> None:
    from rayft.trainers.data import scan_sources

    rows = _pc_rows([LONG_PROMPT + str(i) for i in range(3)] + ["hi"])
    full, _ = _whole_lengths(rows, tiny_model_dir)
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(DataError) as err:
        scan_sources(_spec(path, max_seq_len=full[3], num_workers=2), root=StorageRoot.resolve())
    message = str(err.value)
    assert "only 1 training row(s) keep a label" in message
    assert "scaling.num_workers=2" in message
    assert f"3 of 4 lose every label at data.max_seq_len={full[3]}" in message
    # Whole rows feed both workers.
    scan_sources(_spec(path, max_seq_len=max(full), num_workers=2), root=StorageRoot.resolve())

    # Packed, three short rows make one sequence: one worker would get nothing.
    path = write_jsonl(tmp_path / "few.jsonl", _pc_rows(["a", "b", "c"]))
    with pytest.raises(DataError, match=r"pack into 1 sequence.*scaling\.num_workers=2"):
        scan_sources(
            _spec(path, max_seq_len=512, packing=True, num_workers=2), root=StorageRoot.resolve()
        )
    scan = scan_sources(
        _spec(path, max_seq_len=512, packing=False, num_workers=2), root=StorageRoot.resolve()
    )
    assert scan.rows is not None and scan.rows.train.kept == 3


def test_packed_row_count_follows_the_packing_groups(tmp_path: Path) -> None:
    from rayft.trainers.data import _packed_rows
    from rayft.trainers.packing import pack_examples

    lengths = [30, 20, 50, 10, 40, 60, 5]
    kept = [(f"s{i}", n) for i, n in enumerate(lengths)]
    spec = _spec(tmp_path / "unused.jsonl", max_seq_len=64, packing=True, shuffle=False)
    examples = [{"input_ids": [1] * n, "labels": [1] * n, "sample_id": s} for s, n in kept]
    assert _packed_rows(kept, spec, len(kept)) == len(pack_examples(examples, 64))


def test_cli_train_refuses_rows_cut_away_before_ray_starts(
    tmp_path: Path,
    tiny_model_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from rayft.cluster.cli import main

    rows = _pc_rows([LONG_PROMPT + str(i) for i in range(48)])
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    config = tmp_path / "job.yaml"
    config.write_text(
        f"model: {{name: tiny-llama}}\ndata: {{train: {path}, max_seq_len: 32}}\n"
        "optim: {max_steps: 4}\nscaling: {num_workers: 1}\n"
    )
    capsys.readouterr()
    code = main(["train", str(config)])
    err = capsys.readouterr().err
    assert code == 2
    assert "every training completion is cut away" in err
    assert "data.max_seq_len is 32" in err
    assert "set data.max_seq_len ≥ " in err
    ray = sys.modules.get("ray")
    assert ray is None or not ray.is_initialized()
