"""objective: classification end to end: train a LoRA sentiment head with the real driver on
Ray Train + DeepSpeed, load the published adapter with plain transformers + PEFT, and
classify over HTTP through the Serve app."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import httpx
import pytest
import torch
from specs import tiny_spec

POSITIVE = ["great", "wonderful", "excellent", "lovely", "superb"]
NEGATIVE = ["awful", "terrible", "horrible", "dreadful", "boring"]
SUBJECTS = ["movie", "book", "meal", "hotel", "show", "song", "concert", "trip"]
# The sentiment word ends every sentence: the head pools the last token.
TEMPLATES = ["the {s} was {w}", "i found the {s} {w}", "my {s}? {w}", "honestly, that {s} felt {w}"]
LABELS = ["negative", "positive"]


def sentiment_rows() -> tuple[list[dict], list[dict]]:
    """Distinct templated sentences, 60% positive, split into train and held-out eval."""
    rows = [
        {"text": t.format(s=s, w=w), "label": "positive" if w in POSITIVE else "negative"}
        for t in TEMPLATES
        for s in SUBJECTS
        for w in POSITIVE + NEGATIVE
    ]
    rng = random.Random(0)
    rng.shuffle(rows)
    positive = [r for r in rows if r["label"] == "positive"]
    negative = [r for r in rows if r["label"] == "negative"][: len(positive) * 2 // 3]
    rows = positive + negative
    rng.shuffle(rows)
    return rows[48:], rows[:48]


@pytest.fixture(scope="module")
def trained(ray_cluster, tmp_path_factory) -> dict:
    """One LoRA classification run on the shared cluster, which Serve then uses too."""
    from rayft.trainers.config import validate_spec
    from rayft.trainers.driver import run_training

    folder = tmp_path_factory.mktemp("sentiment")
    train, held_out = sentiment_rows()
    for name, rows in (("train", train), ("eval", held_out)):
        # Integer class ids in the eval file, names in train: both read the same.
        lines = [{**r, "label": LABELS.index(r["label"])} if name == "eval" else r for r in rows]
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    spec = validate_spec(
        tiny_spec(
            folder / "train.jsonl",
            model={"dtype": "float32"},
            objective="classification",
            classification={"labels": LABELS},
            data={"eval": str(folder / "eval.jsonl"), "max_seq_len": 32},
            method="lora",
            lora={"r": 8, "alpha": 16, "dropout": 0.0},
            optim={
                "lr": 5e-3,
                "max_steps": 40,
                "batch_size": 16,
                "warmup_ratio": 0.0,
                "scheduler": "constant",
                "seed": 0,
            },
            scaling={"num_workers": 1},
            eval={"at_start": False},
            output={"name": "sentiment"},
        )
    )
    outcome = run_training(spec, show_progress=False)
    yield {"artifact": Path(outcome.artifact), "held_out": held_out, "train": train}


@pytest.fixture(scope="module")
def serve_url(trained: dict, rayft_home: Path):
    from ray import serve

    from rayft.serving.client import run_app

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    args = {
        "model": "tiny-llama",
        "storage": str(rayft_home),
        "dtype": "float32",
        "max_prompt_tokens": 64,
        "num_cpus": 1,
    }
    try:
        yield run_app(args)
    finally:
        serve.shutdown()


def test_held_out_accuracy_beats_the_majority_class_and_is_recorded(trained: dict) -> None:
    manifest = json.loads((trained["artifact"] / "rayft.json").read_text())
    held_out = trained["held_out"]
    majority = max(sum(r["label"] == label for r in held_out) for label in LABELS) / len(held_out)
    metrics = manifest["metrics"]
    assert metrics["eval_accuracy"] >= majority + 0.2, (metrics, majority)
    assert 0.0 < metrics["eval_f1_macro"] <= 1.0
    assert metrics["eval_loss"] < 0.69  # below chance-level cross-entropy for 2 labels
    assert manifest["objective"] == "classification"
    assert manifest["task"] == "classification"  # for readers that know only `task`
    assert manifest["labels"] == LABELS


def test_artifact_loads_with_plain_peft_and_agrees_with_the_server(
    trained: dict, tiny_model_dir: Path, serve_url: str
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    texts = [r["text"] for r in trained["held_out"]]
    tokenizer = AutoTokenizer.from_pretrained(trained["artifact"])
    base = AutoModelForSequenceClassification.from_pretrained(
        tiny_model_dir,
        num_labels=len(LABELS),
        id2label=dict(enumerate(LABELS)),
        label2id={n: i for i, n in enumerate(LABELS)},
        pad_token_id=tokenizer.pad_token_id,
    )
    model = PeftModel.from_pretrained(base, str(trained["artifact"])).eval()
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        local = [LABELS[i] for i in model(**batch).logits.argmax(-1).tolist()]
    expected = [r["label"] for r in trained["held_out"]]
    assert sum(a == b for a, b in zip(local, expected, strict=True)) / len(texts) > 0.75

    reply = httpx.post(
        f"{serve_url}/v1/classifications", json={"model": "sentiment", "input": texts}, timeout=120
    )
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["object"] == "list" and body["model"] == "sentiment"
    assert [d["index"] for d in body["data"]] == list(range(len(texts)))
    assert [d["label"] for d in body["data"]] == local
    for item in body["data"]:
        assert set(item["probabilities"]) == set(LABELS)
        assert sum(item["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert item["score"] == pytest.approx(item["probabilities"][item["label"]])
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > len(texts)

    one = httpx.post(
        f"{serve_url}/v1/classifications",
        json={"model": "sentiment", "input": texts[0]},
        timeout=60,
    ).json()
    assert [d["label"] for d in one["data"]] == local[:1]


@pytest.mark.parametrize(
    ("path", "body", "status", "mentions"),
    [
        ("/v1/classifications", {"model": "no-such", "input": "x"}, 404, "does not exist"),
        ("/v1/classifications", {"model": "tiny-llama", "input": "x"}, 400, "/v1/completions"),
        ("/v1/classifications", {"model": "sentiment", "input": []}, 400, "input is empty"),
        ("/v1/classifications", {"model": "sentiment", "input": [""]}, 400, "input[0]"),
        (
            "/v1/chat/completions",
            {"model": "sentiment", "messages": [{"role": "user", "content": "hi"}]},
            400,
            "/v1/classifications",
        ),
        ("/v1/completions", {"model": "sentiment", "prompt": "hi"}, 400, "/v1/classifications"),
    ],
)
def test_wrong_requests_get_the_usual_error_shape(
    serve_url: str, path: str, body: dict, status: int, mentions: str
) -> None:
    reply = httpx.post(f"{serve_url}{path}", json=body, timeout=60)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert mentions in error["message"]
    assert error["param"] in ("model", "input")
