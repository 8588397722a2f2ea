"""DPO on a local Ray cluster: held-out reward accuracy rises from chance, the published
adapter loads with plain PEFT, and full-weight DPO under ZeRO-3 (a sharded frozen
reference) trains on two workers, resumes from a checkpoint and publishes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from harness import StopAfterCheckpoint
from specs import tiny_spec

from rayft.trainers.config import validate_spec
from rayft.trainers.driver import run_training

pytestmark = pytest.mark.slow

THINGS = [
    ("red", "apple"),
    ("blue", "sky"),
    ("green", "grass"),
    ("white", "snow"),
    ("black", "night"),
    ("yellow", "sun"),
    ("gray", "stone"),
    ("pink", "rose"),
    ("orange", "carrot"),
    ("brown", "bear"),
]


def write_pairs(path: Path, things: list[tuple[str, str]], openai: bool = False) -> Path:
    """Pairs whose chosen answer names the thing politely and whose rejected one refuses:
    a preference a model learns from some colours and shows on others."""
    with open(path, "w") as handle:
        for color, thing in things:
            prompt = f"name a {color} thing"
            chosen, rejected = f"the {thing} is {color}", f"no {color} things here, sorry"
            if openai:
                row = {
                    "input": {"messages": [{"role": "user", "content": prompt}]},
                    "preferred_output": [{"role": "assistant", "content": chosen}],
                    "non_preferred_output": [{"role": "assistant", "content": rejected}],
                }
            else:
                row = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
            handle.write(json.dumps(row) + "\n")
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("dpo")
    return {
        "train": write_pairs(folder / "train.jsonl", THINGS[:6] * 4),
        "eval": write_pairs(folder / "eval.jsonl", THINGS[6:], openai=True),
    }


def manifest(path: Path) -> dict:
    return json.loads((Path(path) / "rayft.json").read_text())


def test_lora_dpo_learns_the_preference_and_publishes_an_adapter(
    ray_cluster, files, tiny_model_dir
):
    spec = validate_spec(
        tiny_spec(
            files["train"],
            model={"dtype": "float32"},
            data={"eval": str(files["eval"]), "max_seq_len": 64},
            objective="dpo",
            dpo={"beta": 0.1},
            lora={"r": 8, "alpha": 16, "dropout": 0.0},
            optim={"lr": 1e-2, "max_steps": 8, "batch_size": 4, "warmup_ratio": 0.0},
            scaling={"num_workers": 1},
            eval={"every_steps": 4},
            output={"name": "dpo-lora", "overwrite": True},
        )
    )
    outcome = run_training(spec, show_progress=False)
    meta = manifest(outcome.artifact)
    evals = [r for r in meta["history"] if r["kind"] == "eval"]
    assert evals[0]["step"] == 0 and evals[0]["eval_reward_accuracy"] == pytest.approx(0.5)
    assert evals[0]["eval_loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference
    assert evals[-1]["step"] == 8
    final = meta["metrics"]
    assert final["eval_reward_accuracy"] > 0.8
    assert final["eval_reward_margin"] > 0 and final["eval_loss"] < evals[0]["eval_loss"]
    assert final["eval_rewards_chosen"] > final["eval_rewards_rejected"]
    assert final["eval_pairs"] == 4
    trains = [r for r in meta["history"] if r["kind"] == "train"]
    assert trains and all(r["loss"] > 0 for r in trains)
    assert (meta["objective"], meta["method"]) == ("dpo", "lora")

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    assert not (Path(outcome.artifact) / "ref").exists()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = PeftModel.from_pretrained(base, str(outcome.artifact))
    assert list(model.peft_config) == ["default"]


def test_full_weight_dpo_under_zero3_resumes_and_publishes(ray_cluster, files):
    import ray.train

    spec = validate_spec(
        tiny_spec(
            files["train"],
            model={"dtype": "float32"},
            data={"eval": str(files["eval"]), "max_seq_len": 64},
            # The older spelling of objective: dpo with method: full, still read.
            method="dpo",
            dpo={"weights": "full", "loss": "ipo"},
            deepspeed={"zero_stage": 3},
            optim={
                "lr": 1e-4,
                "max_steps": 2,
                "batch_size": 2,
                # The default checkpointing (selective, full recompute under ZeRO-3)
                # must survive the first backward after a resume.
                "warmup_ratio": 0.0,
            },
            scaling={"num_workers": 2, "max_failures": 0},
            checkpoint={"every_steps": 1},
            eval={"at_start": False},
            output={"name": "dpo-full", "overwrite": True},
        )
    )
    # Stopped after the checkpoint of step 1, then resumed: the policy comes back from the
    # checkpoint and the frozen, sharded reference is rebuilt from the base model.
    with pytest.raises((ray.train.TrainingFailedError, RuntimeError)):
        run_training(
            spec,
            run_id="dpo-full-run",
            show_progress=False,
            loop_callbacks=[StopAfterCheckpoint(1)],
        )
    outcome = run_training(spec, run_id="dpo-full-run", resume=True, show_progress=False)
    assert outcome.metrics["step"] == 2
    meta = manifest(outcome.artifact)
    assert (meta["objective"], meta["method"]) == ("dpo", "full")
    assert (meta["spec"]["objective"], meta["spec"]["method"]) == ("dpo", "full")
    assert "weights" not in meta["spec"]["dpo"] and "task" not in meta["spec"]
    assert meta["metrics"]["eval_pairs"] == 4
    assert {"eval_loss", "eval_reward_accuracy", "eval_reward_margin"} <= set(meta["metrics"])
    assert [r["step"] for r in meta["history"] if r["kind"] == "train"][-1] == 2

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(outcome.artifact))
    assert sum(p.numel() for p in model.parameters()) > 0
