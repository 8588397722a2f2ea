"""lm-evaluation-harness against a served model: its scores equal a direct computation.

The unchanged ``lm_eval`` command runs rayft's two shipped tasks (log-likelihood multiple
choice, greedy generation) against tiny-llama served over real HTTP on 127.0.0.1 in this
process (``cluster.benchmarking.served_here``: the app a Serve replica runs, no Ray); every
document's log-likelihood, the accuracy and every generation are recomputed here with
transformers. ``rayft eval --benchmarks``'s Python core scores a published LoRA adapter
the same way, checked against PEFT.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from harness import copy_registry

from rayft.cluster.benchmarking import benchmark, served_here
from rayft.trainers.benchmarks import TASKS_DIR
from rayft.trainers.storage import StorageRoot

CONTEXT = "Question: What is the capital of {country}?\nAnswer:"
QUESTION = "Question: What is {a} plus {b}?\nAnswer:"


@pytest.fixture(scope="module")
def served(tmp_path_factory, published_adapters: Path) -> Iterator[dict[str, Any]]:
    root = copy_registry(published_adapters, tmp_path_factory.mktemp("lm-eval") / "root")
    with served_here("tiny-llama", StorageRoot.resolve(str(root)), dtype="float32") as (
        url,
        key,
        engine,
    ):
        yield {"url": url, "key": key, "engine": engine, "root": root}


def _rows(name: str) -> list[dict[str, Any]]:
    lines = (TASKS_DIR / name).read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _continuation_logprob(model: Any, tokenizer: Any, context: str, continuation: str) -> float:
    """``log p(continuation | context)``, summed over the continuation's tokens."""
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    ids = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    table = torch.log_softmax(logits, dim=-1)
    return sum(float(table[t - 1, ids[t]]) for t in range(len(context_ids), len(ids)))


def _direct_capitals(model: Any, tokenizer: Any) -> tuple[list[list[float]], float]:
    """Every choice's log-likelihood per document, and the accuracy they give."""
    scores, right = [], 0
    for row in _rows("capitals.jsonl"):
        context = CONTEXT.format(country=row["country"])
        lls = [_continuation_logprob(model, tokenizer, context, f" {c}") for c in row["choices"]]
        scores.append(lls)
        right += int(max(range(len(lls)), key=lls.__getitem__) == row["answer"])
    return scores, right / len(scores)


def _lm_eval_lls(samples: list[dict[str, Any]]) -> list[list[float]]:
    ordered = sorted(samples, key=lambda s: s["doc_id"])
    return [[float(r[0][0]) for r in s["resps"]] for s in ordered]


def _samples(folder: Path, task: str) -> list[dict[str, Any]]:
    (path,) = folder.rglob(f"samples_{task}_*.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_lm_eval_command_scores_equal_transformers(served, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    engine = served["engine"]
    model_args = ",".join(
        [
            "model=tiny-llama",
            f"base_url={served['url']}/v1/completions",
            "tokenizer_backend=huggingface",
            f"tokenizer={engine.model_dir}",
            f"max_length={engine.context_window}",
            "max_retries=1",
        ]
    )
    env = {
        **os.environ,
        "OPENAI_API_KEY": served["key"],
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(tmp_path / "datasets-cache"),
    }
    command = [
        str(Path(sys.executable).parent / "lm_eval"),
        "--model",
        "local-completions",
        "--model_args",
        model_args,
        "--tasks",
        "rayft_capitals,rayft_arithmetic",
        "--include_path",
        str(TASKS_DIR),
        "--batch_size",
        "8",
        "--output_path",
        str(tmp_path / "out"),
        "--log_samples",
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    (results_file,) = (tmp_path / "out").rglob("results_*.json")
    results = json.loads(results_file.read_text())["results"]

    tokenizer = AutoTokenizer.from_pretrained(engine.model_dir)
    model = AutoModelForCausalLM.from_pretrained(engine.model_dir, dtype=torch.float32).eval()
    direct, accuracy = _direct_capitals(model, tokenizer)
    served_lls = _lm_eval_lls(_samples(tmp_path / "out", "rayft_capitals"))
    assert len(served_lls) == 20
    for ours, reference in zip(served_lls, direct, strict=True):
        assert ours == pytest.approx(reference, abs=1e-4)
    assert results["rayft_capitals"]["acc,none"] == pytest.approx(accuracy)

    # Greedy generations, cut at the task's stop strings, equal transformers' own.
    generated = sorted(_samples(tmp_path / "out", "rayft_arithmetic"), key=lambda s: s["doc_id"])
    matches = 0
    for sample, row in zip(generated, _rows("arithmetic.jsonl"), strict=True):
        ids = tokenizer(QUESTION.format(**row), add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=8, do_sample=False)
        text = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
        for stop in ("\n", "."):
            text = text.split(stop)[0]
        assert sample["resps"][0][0] == text
        matches += int(sample["filtered_resps"][0] == row["answer"])
    assert results["rayft_arithmetic"]["exact_match,strip"] == pytest.approx(matches / 20)


def test_benchmarks_of_an_adapter_equal_peft(served, tmp_path, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    engine = served["engine"]
    monkeypatch.setenv("RAYFT_API_KEY", served["key"])
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    scores = benchmark(
        "a1",
        ["rayft_capitals"],
        url=served["url"],
        root=StorageRoot.resolve(str(served["root"])),
        samples_out=tmp_path / "samples",
    )
    tokenizer = AutoTokenizer.from_pretrained(engine.model_dir)
    base = AutoModelForCausalLM.from_pretrained(engine.model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(served["root"] / "adapters" / "a1")).eval()
    direct, accuracy = _direct_capitals(model, tokenizer)
    lines = (tmp_path / "samples" / "rayft_capitals.jsonl").read_text().splitlines()
    ours = _lm_eval_lls([json.loads(line) for line in lines])
    for row, reference in zip(ours, direct, strict=True):
        assert row == pytest.approx(reference, abs=1e-4)
    assert scores["rayft_capitals"].metrics["acc,none"] == pytest.approx(accuracy)
    assert scores["rayft_capitals"].samples == 20


def test_a_training_run_records_the_benchmarks_served_models_score(
    served, ray_cluster, tiny_spec, monkeypatch
):
    # eval.benchmarks: lm-eval scores the starting weights and the export in the driver
    # (lm-eval's transformers model); they equal what the served base and adapter score.
    from rayft.trainers.config import validate_spec
    from rayft.trainers.driver import run_training
    from rayft.trainers.manifest import ArtifactManifest

    tasks = ["rayft_capitals", "rayft_arithmetic"]
    spec = tiny_spec(
        method="lora",
        data={"format": "chat", "max_seq_len": 64},
        optim={"max_steps": 3, "batch_size": 4, "lr": 3e-3},
        scaling={"num_workers": 1},
        eval={"benchmarks": tasks},
        output={"name": "bench-lora"},
        storage=str(served["root"]),
    )
    outcome = run_training(validate_spec(spec), show_progress=False)
    report = ArtifactManifest.read(outcome.artifact).benchmarks
    assert report is not None and set(report.before) == set(report.after) == set(tasks)

    monkeypatch.setenv("RAYFT_API_KEY", served["key"])
    root = StorageRoot.resolve(str(served["root"]))
    for side, model in (("before", "tiny-llama"), ("after", "bench-lora")):
        scored = benchmark(model, tasks, url=served["url"], root=root)
        for task in tasks:
            recorded = getattr(report, side)[task]
            assert recorded.samples == scored[task].samples == 20
            assert recorded.metrics == pytest.approx(scored[task].metrics), (side, task)
