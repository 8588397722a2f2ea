"""Training-time generation metrics (``eval.metrics``) and the forgetting check
(``eval.general``) in one short run: two workers, ZeRO-2, tiny-llama.

Every reported number is recomputed here from the published adapter with plain
transformers/PEFT: the greedy answers' metrics on the eval rows, and the general set's
loss under the base model (before) and the adapter (after).
"""

from __future__ import annotations

import json

import pytest
import torch
from specs import tiny_spec

from rayft.trainers.config import validate_spec
from rayft.trainers.driver import run_training
from rayft.trainers.formats import end_of_turn_ids
from rayft.trainers.generation_eval import general_examples, split_sample
from rayft.trainers.metrics import generation_metrics

pytestmark = pytest.mark.slow

METRICS = ["exact_match", "token_f1", "rouge_l", "bleu"]
MAX_NEW = 8


def greedy(model, tokenizer, prompt: list[int]) -> str:
    x = torch.tensor([prompt])
    out = model.generate(
        input_ids=x,
        attention_mask=torch.ones_like(x),
        max_new_tokens=MAX_NEW,
        do_sample=False,
        eos_token_id=sorted(end_of_turn_ids(tokenizer)),
        pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
    )
    return tokenizer.decode(out[0, x.shape[1] :], skip_special_tokens=True).strip()


def general_loss(model, examples) -> float:
    total = count = 0.0
    for ids, labels in examples:
        with torch.no_grad():
            out = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels]))
        n = sum(1 for label in labels[1:] if label != -100)
        total, count = total + float(out.loss) * n, count + n
    return total / count


def test_generation_metrics_and_general_delta_are_recorded_and_printed(
    ray_cluster, color_chats, tiny_model_dir, tmp_path, capsys
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    train = color_chats(tmp_path / "train.jsonl", 48)
    held_out = color_chats(tmp_path / "eval.jsonl", 8)
    spec = validate_spec(
        tiny_spec(
            train,
            data={"eval": str(held_out), "max_seq_len": 64},
            lora={"r": 8, "alpha": 16, "dropout": 0.0},
            optim={"lr": 3e-3, "max_steps": 8, "batch_size": 4, "warmup_ratio": 0.0},
            scaling={"num_workers": 2, "max_failures": 0},
            eval={"metrics": METRICS, "max_new_tokens": MAX_NEW, "general": "builtin:general"},
            output={"name": "eval-extras"},
        )
    )
    outcome = run_training(spec, show_progress=True)
    printed = capsys.readouterr().err

    evals = outcome.evals()
    assert len(evals) == 2  # the untrained model, then the final one
    for record in evals:
        for name in METRICS:
            assert 0.0 <= record[f"eval_{name}"] <= 1.0
    manifest = json.loads((outcome.artifact / "rayft.json").read_text())
    for name in METRICS:
        assert manifest["metrics"][f"eval_{name}"] == pytest.approx(evals[-1][f"eval_{name}"])

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    examples = general_examples("builtin:general", tokenizer, 512)
    before_loss = general_loss(base, examples)
    tuned = PeftModel.from_pretrained(base, outcome.artifact).eval()

    # The final eval's metrics are those of the published adapter's greedy answers.
    from rayft.trainers.formats import tokenize_example

    rows = [json.loads(line) for line in held_out.read_text().splitlines()]
    samples = [
        split_sample(e["input_ids"], e["labels"])
        for e in (tokenize_example(r, "chat", tokenizer, 64) for r in rows)
    ]
    predictions = [greedy(tuned, tokenizer, p) for p, _ in samples]
    references = [tokenizer.decode(a, skip_special_tokens=True).strip() for _, a in samples]
    expected = generation_metrics(predictions, references, METRICS)
    for name in METRICS:
        assert evals[-1][f"eval_{name}"] == pytest.approx(expected[name], abs=1e-6)

    general = manifest["general"]
    assert general["set"] == "builtin:general" and general["rows"] == 50
    assert general["before"]["loss"] == pytest.approx(before_loss, rel=1e-3)
    assert general["after"]["loss"] == pytest.approx(general_loss(tuned, examples), rel=1e-3)
    for key in ("loss", "perplexity", "exact_match"):
        assert general["delta"][key] == pytest.approx(
            general["after"][key] - general["before"][key]
        )
    line = [ln for ln in printed.splitlines() if "general knowledge (builtin:general" in ln]
    assert len(line) == 1 and "loss" in line[0] and "exact_match" in line[0]
