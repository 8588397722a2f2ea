"""GRPO on a local Ray cluster: answers sampled on rollout engines (Ray actors running the
serving engine), graded in Ray tasks, TRL's loss; rewards on the console records, the
held-out grade before and after in rayft.json, an adapter that loads with plain PEFT, and
no rollout engine left once the run ends."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rayft.trainers.config import validate_spec
from rayft.trainers.driver import run_training

pytestmark = pytest.mark.slow

FUZZY = {
    "type": "text_similarity",
    "name": "close",
    "input": "{{ sample.output_text }}",
    "reference": "{{ item.answer }}",
    "evaluation_metric": "fuzzy_match",
}


def write_prompts(path: Path, pairs: list[tuple[int, int]]) -> Path:
    with open(path, "w") as handle:
        for a, b in pairs:
            row = {
                "messages": [{"role": "user", "content": f"what is {a} plus {b}?"}],
                "answer": str(a + b),
            }
            handle.write(json.dumps(row) + "\n")
    return path


def test_lora_grpo_samples_on_rollout_engines_and_publishes(ray_cluster, tmp_path, tiny_model_dir):
    import ray

    spec = validate_spec(
        {
            "model": {"name": "tiny-llama", "dtype": "float32"},
            "data": {
                "train": str(
                    write_prompts(tmp_path / "train.jsonl", [(a, a + 1) for a in range(8)])
                ),
                "eval": str(write_prompts(tmp_path / "eval.jsonl", [(a, 2) for a in range(3)])),
                "max_seq_len": 64,
            },
            "objective": "grpo",
            "grpo": {"grader": FUZZY, "num_generations": 4, "max_new_tokens": 8, "beta": 0.04},
            "lora": {"r": 8, "dropout": 0.0},
            "optim": {"lr": 1e-3, "max_steps": 4, "batch_size": 2, "warmup_ratio": 0.0},
            "scaling": {"num_workers": 1},
            "eval": {"every_steps": 2},
            "output": {"name": "grpo-lora", "overwrite": True},
        }
    )
    outcome = run_training(spec, show_progress=False)
    meta = json.loads((Path(outcome.artifact) / "rayft.json").read_text())
    assert (meta["objective"], meta["method"]) == ("grpo", "lora")
    trains = [r for r in meta["history"] if r["kind"] == "train"]
    assert [r["step"] for r in trains] == [1, 2, 3, 4]
    assert all(0.0 <= r["reward"] <= 1.0 for r in trains)
    assert any(r["reward"] > 0 for r in trains)  # fuzzy match gives partial credit
    evals = [r for r in meta["history"] if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 2, 4]  # the held-out grade before and after
    assert all(r["eval_prompts"] == 3 for r in evals)
    assert meta["metrics"]["eval_reward"] == pytest.approx(-meta["metrics"]["eval_loss"])

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(outcome.artifact)
    )
    assert list(model.peft_config) == ["default"]
    # The rollout engine ended with the run's workers that owned it.
    alive = [a for a in ray.util.list_named_actors(all_namespaces=True) if "rollout" in a["name"]]
    assert alive == []
