"""objective: classification without Ray: rows, labels, collate, metrics, spec errors, artifacts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score

from rayft.trainers.classification import (
    ClassificationObjective,
    check_row,
    classification_metrics,
    collate,
    label_name,
    row_text,
    sorted_labels,
    tokenize_row,
    with_labels,
)
from rayft.trainers.config import ClassificationSpec, ConfigError, validate_spec
from rayft.trainers.data import DataError, scan_sources


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_text_rows_with_string_labels_are_scanned_into_sorted_labels(
    tiny_spec, tmp_path: Path
) -> None:
    path = _write(
        tmp_path / "t.jsonl",
        [{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"}],
    )
    spec = validate_spec(tiny_spec(path, objective="classification"))
    scanned = scan_sources(spec)
    assert scanned.format == "classification"
    assert scanned.labels == ["neg", "pos"]
    assert with_labels(spec, scanned.labels).classification.labels == ["neg", "pos"]


def test_integer_labels_sort_numerically_and_index_given_labels() -> None:
    assert sorted_labels({"10", "2", "1"}) == ["1", "2", "10"]
    assert label_name(2, None) == "2"
    assert label_name(1, ["neg", "pos"]) == "pos"
    with pytest.raises(Exception, match="out of range"):
        label_name(2, ["neg", "pos"])
    with pytest.raises(Exception, match="label name"):
        label_name(True, None)


def test_unknown_label_fails_the_scan_with_file_and_line(tiny_spec, tmp_path: Path) -> None:
    path = _write(
        tmp_path / "t.jsonl",
        [{"text": "good", "label": "pos"}, {"text": "meh", "label": "neutral"}],
    )
    spec = validate_spec(
        tiny_spec(path, objective="classification", classification={"labels": ["neg", "pos"]})
    )
    with pytest.raises(DataError, match=r"t\.jsonl:2: label 'neutral' is not one of"):
        scan_sources(spec)


def test_missing_text_and_label_columns_are_named(tmp_path: Path) -> None:
    cls = ClassificationSpec(text_column="review", label_column="stars")
    with pytest.raises(Exception, match="missing field 'review'"):
        check_row({"text": "x", "stars": 1}, cls)
    with pytest.raises(Exception, match="missing field 'stars'"):
        check_row({"review": "x"}, cls)
    assert check_row({"review": "x", "stars": 5}, cls) == "5"


def test_messages_rows_are_the_chat_template_without_generation_prompt(tokenizer) -> None:
    cls = ClassificationSpec(labels=["neg", "pos"])
    messages = [{"role": "user", "content": "I loved it"}]
    row = {"messages": messages, "label": "pos"}
    assert check_row(row, cls) == "pos"
    text, templated = row_text(row, cls, tokenizer)
    assert templated
    assert text == tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=False
    )
    example = tokenize_row(row, tokenizer, cls, max_seq_len=512)
    assert example["input_ids"] == list(tokenizer(text, add_special_tokens=False)["input_ids"])
    assert example["labels"] == [1]


def test_text_rows_tokenize_to_their_class_id_and_truncate(tokenizer) -> None:
    cls = ClassificationSpec(labels=["neg", "pos"])
    example = tokenize_row({"text": "a rather long sentence", "label": 0}, tokenizer, cls, 4)
    assert example["labels"] == [0]
    assert len(example["input_ids"]) == 4
    assert example["truncated"]


def test_collate_pads_right_and_drops_carrier_rows() -> None:
    batch = {
        "input_ids": np.array(
            [np.array([5, 6, 7]), np.array([], dtype=np.int32), np.array([8])], dtype=object
        ),
        "labels": np.array(
            [np.array([1]), np.array([], dtype=np.int32), np.array([0])], dtype=object
        ),
        "sample_ids": np.array([np.array(["a"]), np.array([""]), np.array(["b"])], dtype=object),
        "num_truncated": np.array([0, 0, 1]),
        "num_dropped": np.array([0, 2, 0]),
    }
    out = collate(batch, pad_id=3)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 3, 3]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert out["labels"].tolist() == [1, 0]
    assert (out["num_tokens"], out["num_truncated"], out["num_dropped"]) == (4, 1, 2)


def test_metrics_from_summed_confusion_counts_match_scikit_learn() -> None:
    rng = np.random.default_rng(0)
    true = rng.integers(0, 3, size=200)
    pred = np.where(rng.random(200) < 0.7, true, rng.integers(0, 3, size=200))
    # Two workers' halves, summed as the loop's all-reduce does.
    confusion = np.zeros((3, 3))
    for half in (slice(0, 80), slice(80, 200)):
        np.add.at(confusion, (true[half], pred[half]), 1)
    metrics = classification_metrics(confusion)
    assert metrics["eval_accuracy"] == pytest.approx(accuracy_score(true, pred))
    assert metrics["eval_f1_macro"] == pytest.approx(f1_score(true, pred, average="macro"))


def test_objective_eval_metrics_report_loss_accuracy_and_f1(tiny_spec, tmp_path: Path) -> None:
    path = _write(tmp_path / "t.jsonl", [{"text": "x", "label": "a"}])
    spec = validate_spec(
        tiny_spec(path, objective="classification", classification={"labels": ["a", "b"]})
    )
    objective = ClassificationObjective(spec)
    sums = dict.fromkeys(objective.eval_keys, 0.0)
    sums.update({"loss_sum": 3.0, "count": 4.0, "confusion_0_0": 2.0, "confusion_1_1": 1.0})
    sums["confusion_1_0"] = 1.0
    metrics = objective.eval_metrics(sums)
    assert metrics["eval_loss"] == pytest.approx(0.75)
    assert metrics["eval_accuracy"] == pytest.approx(0.75)
    true, pred = [0, 0, 1, 1], [0, 0, 1, 0]
    assert metrics["eval_f1_macro"] == pytest.approx(f1_score(true, pred, average="macro"))
    assert metrics["eval_examples"] == 4


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        ({"data": {"train": "x.jsonl", "packing": True}}, "data.packing"),
        ({"model": {"name": "tiny-llama", "adapter": "prev"}}, "model.adapter"),
        ({"classification": {"labels": ["a", "a"]}}, "classification.labels"),
    ],
)
def test_spec_refuses_what_classification_cannot_combine_with(extra: dict, key: str) -> None:
    data = {"model": {"name": "tiny-llama"}, "data": {"train": "x.jsonl"}}
    data["objective"] = "classification"
    data.update(extra)
    with pytest.raises(ConfigError) as err:
        validate_spec(data)
    assert key in str(err.value)


def test_a_single_label_is_refused(tiny_spec, tmp_path: Path) -> None:
    path = _write(tmp_path / "t.jsonl", [{"text": "x", "label": "a"}, {"text": "y", "label": "a"}])
    spec = validate_spec(tiny_spec(path, objective="classification"))
    with pytest.raises(ConfigError, match="classification.labels"):
        with_labels(spec, scan_sources(spec).labels)


def test_lora_classifier_trains_its_head_and_passes_the_publish_check(
    tiny_spec, tiny_model_dir: Path, tmp_path: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from rayft.trainers.classification import load_classifier
    from rayft.trainers.methods import prepare_model
    from rayft.trainers.servable import check_servable, classifier_labels

    data = _write(tmp_path / "t.jsonl", [{"text": "x", "label": "a"}])
    spec = validate_spec(
        tiny_spec(data, objective="classification", classification={"labels": ["a", "b", "c"]})
    )
    model = prepare_model(load_classifier(str(tiny_model_dir), ["a", "b", "c"], 3), spec)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(".score." in n for n in trainable)
    out = tmp_path / "adapter"
    model.save_pretrained(out)
    assert classifier_labels(out, "adapter") == 3
    check_servable(out, "adapter", tiny_model_dir)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=3)
    loaded = PeftModel.from_pretrained(base, str(out)).eval()
    ids = torch.tensor([[5, 6, 7]])
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        assert torch.allclose(loaded(input_ids=ids).logits, expected, atol=1e-5)


def test_freeze_keeps_the_head_trainable(tiny_spec, tiny_model_dir: Path, tmp_path: Path) -> None:
    from rayft.trainers.classification import load_classifier
    from rayft.trainers.methods import prepare_model

    data = _write(tmp_path / "t.jsonl", [{"text": "x", "label": "a"}])
    spec = validate_spec(
        tiny_spec(
            data,
            objective="classification",
            method="freeze",
            freeze={"trainable_layers": 1},
            classification={"labels": ["a", "b"]},
        )
    )
    model = prepare_model(load_classifier(str(tiny_model_dir), ["a", "b"], 3), spec)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "score.weight" in trainable
    assert not any(n.startswith("model.layers.0.") for n in trainable)


def test_full_classifier_model_passes_the_publish_check(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    from rayft.trainers.classification import load_classifier
    from rayft.trainers.servable import check_servable, classifier_labels

    out = tmp_path / "model"
    load_classifier(str(tiny_model_dir), ["a", "b"], 3).save_pretrained(out)
    assert classifier_labels(out, "model") == 2
    assert classifier_labels(tiny_model_dir, "model") is None
    check_servable(out, "model")
