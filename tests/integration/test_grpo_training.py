"""GRPO on a local Ray cluster: answers sampled on rollout engines (Ray actors running the
serving engine), graded on a Ray actor, TRL's loss; rewards on the console records, the
held-out grade before and after in rayft.json, an adapter that loads with plain PEFT, and
no rollout engine left once the run ends."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from harness import FUZZY_GRADER
from specs import tiny_spec

from rayft.trainers.config import validate_spec
from rayft.trainers.driver import run_training

pytestmark = pytest.mark.slow


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
        tiny_spec(
            write_prompts(tmp_path / "train.jsonl", [(a, a + 1) for a in range(8)]),
            model={"dtype": "float32"},
            data={
                "eval": str(write_prompts(tmp_path / "eval.jsonl", [(a, 2) for a in range(3)])),
                "max_seq_len": 64,
            },
            objective="grpo",
            grpo={
                "grader": FUZZY_GRADER,
                "num_generations": 4,
                "max_new_tokens": 8,
                "beta": 0.04,
            },
            lora={"r": 8, "dropout": 0.0},
            optim={"lr": 1e-3, "max_steps": 4, "batch_size": 2, "warmup_ratio": 0.0},
            scaling={"num_workers": 1},
            eval={"every_steps": 2},
            output={"name": "grpo-lora", "overwrite": True},
        )
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


def test_a_rollout_engine_the_cluster_cannot_place_fails_the_run_naming_its_cpus(
    ray_cluster, tmp_path
):
    # Something else holds half the cluster's CPUs: the worker still starts, the rollout
    # engine (grpo.rollout_cpus of them) cannot, and the run fails after
    # scaling.start_timeout_s instead of waiting for it forever.
    import ray

    total = ray.cluster_resources()["CPU"]

    @ray.remote
    class Holder:
        def ready(self) -> bool:
            return True

    holder = Holder.options(num_cpus=total - 2).remote()
    ray.get(holder.ready.remote())
    spec = validate_spec(
        tiny_spec(
            write_prompts(tmp_path / "train.jsonl", [(a, a + 1) for a in range(4)]),
            data={"max_seq_len": 64},
            objective="grpo",
            grpo={
                "grader": FUZZY_GRADER,
                "num_generations": 2,
                "max_new_tokens": 8,
                "rollout_cpus": 2,
            },
            optim={"max_steps": 1, "batch_size": 2},
            scaling={"num_workers": 1, "start_timeout_s": 8, "max_failures": 0},
            output={"name": "grpo-no-room", "overwrite": True},
        )
    )
    try:
        with pytest.raises(Exception, match=r"grpo\.rollout_cpus=2") as err:
            run_training(spec, show_progress=False)
    finally:
        ray.kill(holder)
    assert "scaling.start_timeout_s" in str(err.value)
    alive = [a for a in ray.util.list_named_actors(all_namespaces=True) if "rollout" in a["name"]]
    assert alive == []


def test_full_weight_grpo_under_zero3_on_two_workers_publishes_a_model(ray_cluster, tmp_path):
    spec = validate_spec(
        tiny_spec(
            write_prompts(tmp_path / "train.jsonl", [(a, 1) for a in range(8)]),
            model={"dtype": "float32"},
            data={"max_seq_len": 64},
            objective="grpo",
            method="full",
            deepspeed={"zero_stage": 3},
            grpo={"grader": FUZZY_GRADER, "num_generations": 2, "max_new_tokens": 4},
            optim={"lr": 1e-4, "max_steps": 2, "batch_size": 2, "warmup_ratio": 0.0},
            scaling={"num_workers": 2},
            output={"name": "grpo-full", "overwrite": True},
        )
    )
    outcome = run_training(spec, show_progress=False)
    meta = json.loads((Path(outcome.artifact) / "rayft.json").read_text())
    assert (meta["kind"], meta["objective"], meta["method"]) == ("model", "grpo", "full")
    trains = [r for r in meta["history"] if r["kind"] == "train"]
    # Step 2 sampled on the weights step 1 made: the broadcast reached the engine.
    assert [r["step"] for r in trains] == [1, 2] and trains[1]["sync_s"] > 1e-3


def tiny_grpo(tmp_path: Path, name: str, **sections) -> dict:
    """A tiny-llama LoRA GRPO spec over 8 training prompts and 2 held-out ones."""
    data = tiny_spec(
        write_prompts(tmp_path / "train.jsonl", [(a, 3) for a in range(8)]),
        model={"dtype": "float32"},
        data={
            "eval": str(write_prompts(tmp_path / "eval.jsonl", [(9, 1), (2, 7)])),
            "max_seq_len": 64,
        },
        objective="grpo",
        grpo={"grader": FUZZY_GRADER, "num_generations": 2, "max_new_tokens": 4},
        lora={"r": 4, "dropout": 0.0},
        optim={"lr": 1e-3, "max_steps": 4, "batch_size": 2, "warmup_ratio": 0.0},
        scaling={"num_workers": 1},
        output={"name": name, "overwrite": True},
    )
    # Section by section, one level deep: a grader given here replaces the default one.
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    return data


def test_a_resumed_grpo_run_goes_on_from_its_rollout_position(ray_cluster, tmp_path, rayft_home):
    import ray.train
    from harness import StopAfterCheckpoint

    spec = validate_spec(
        tiny_grpo(
            tmp_path,
            "grpo-resume",
            checkpoint={"every_steps": 2, "keep": 2},
            eval={"every_steps": 4},
            # The deliberate stop must end the run, not be recovered from by a restart.
            scaling={"max_failures": 0},
        )
    )
    with pytest.raises((ray.train.TrainingFailedError, RuntimeError)):
        run_training(
            spec,
            run_id="grpo-resume-run",
            show_progress=False,
            loop_callbacks=[StopAfterCheckpoint(2)],
        )
    resumed = run_training(spec, run_id="grpo-resume-run", resume=True, show_progress=False)
    assert resumed.metrics["step"] == 4
    order = [
        json.loads(line)
        for line in (rayft_home / "runs" / "grpo-resume-run" / "data_order" / "rank0.jsonl")
        .read_text()
        .splitlines()
    ]
    by_step: dict[int, set[str]] = {}
    for entry in order:  # a row's sample ids, repeated for each answer of its group
        for ids in entry["samples"]:
            by_step.setdefault(entry["step"], set()).update(ids)
    # Each step drew the next 2 prompts: the resumed run went on from the rollout position
    # the checkpoint held instead of sampling the first batches again.
    assert sorted(by_step) == [1, 2, 3, 4]
    assert all(len(prompts) == 2 for prompts in by_step.values())
    assert len(set().union(*by_step.values())) == 8
    meta = json.loads((Path(resumed.artifact) / "rayft.json").read_text())
    assert [r["step"] for r in meta["history"] if r["kind"] == "train"][-2:] == [3, 4]


def test_a_sweep_over_grpo_temperature_ranks_its_trials_by_the_held_out_grade(
    ray_cluster, tmp_path, rayft_home
):
    from rayft.raytune.sweep import run_sweep
    from rayft.trainers.registry import ArtifactManifest

    data = tiny_grpo(
        tmp_path,
        "sweep-grpo",
        optim={"max_steps": 2},
        eval={"every_steps": 2, "at_start": False},
        tune={
            "search_space": {"grpo.temperature": {"grid": [0.5, 1.2]}},
            "scheduler": {"type": "none"},
            "search": "grid",
            "max_concurrent_trials": 1,
        },
    )
    outcome = run_sweep(validate_spec(data), sweep_id="grpo-temperature", show_progress=False)
    assert sorted(r["grpo.temperature"] for r in outcome.rows) == [0.5, 1.2]
    assert [r["state"] for r in outcome.rows] == ["finished", "finished"]
    losses = [r["eval_loss"] for r in outcome.rows]
    assert losses == sorted(losses) and all(-1.0 <= x <= 0.0 for x in losses)
    manifest = ArtifactManifest.read(outcome.artifact)
    assert (manifest.objective, manifest.sweep.id) == ("grpo", "grpo-temperature")
    assert manifest.sweep.params == {"grpo.temperature": outcome.best["grpo.temperature"]}
    assert manifest.spec["grpo"]["temperature"] == outcome.best["grpo.temperature"]
    assert manifest.metrics["eval_reward"] == pytest.approx(-outcome.best["eval_loss"])


def test_a_model_grader_judges_on_the_grading_actor(ray_cluster, tmp_path, capsys):
    # The judge (tiny-llama itself) loads in the run's grading actor; its replies are no
    # score, so each grade is a parse error that the console reports, scored 0.
    judged = {
        "type": "score_model",
        "name": "judge",
        "model": "tiny-llama",
        "input": [{"role": "user", "content": "Is {{ sample.output_text }} {{ item.answer }}?"}],
        "sampling_params": {"max_completions_tokens": 4},
    }
    data = tiny_grpo(tmp_path, "grpo-judged", grpo={"grader": judged}, optim={"max_steps": 1})
    del data["data"]["eval"]
    outcome = run_training(validate_spec(data), show_progress=True)
    out = capsys.readouterr().err  # the console's lines
    assert "[rayft] grader: sample" in out and "the judge answered" in out, out[-3000:]
    meta = json.loads((Path(outcome.artifact) / "rayft.json").read_text())
    trains = [r for r in meta["history"] if r["kind"] == "train"]
    assert [r["step"] for r in trains] == [1] and trains[0]["reward"] == 0.0


SUMS = {
    "type": "python",
    "name": "sum",
    "source": (
        "import re\n"
        "def grade(sample, item):\n"
        "    text = sample['output_text'].strip().rstrip('.')\n"
        "    if text == item['answer']:\n"
        "        return 1.0\n"
        "    numbers = re.findall(r'-?[0-9]+', text)\n"
        "    return 0.5 if numbers and numbers[-1] == item['answer'] else 0.0\n"
    ),
}
"""The sum alone scores 1, an answer that ends on the sum (``2 + 3 = 5``) 0.5."""
QUESTION = "What is {a} + {b}? Reply with only the number."
SYSTEM = "You add numbers."
"""A short system message: SmolLM2's template otherwise adds a 17-token default one to each
prompt, which a step pays for in every sampled and trained sequence."""


def write_sums(path: Path, pairs: list[tuple[int, int]], answered: bool = False) -> Path:
    """Prompt rows (``answer`` for the grader); with ``answered``, chat rows whose assistant
    message is the sum, for supervised fine-tuning."""
    with open(path, "w") as handle:
        for a, b in pairs:
            messages = [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": QUESTION.format(a=a, b=b)},
            ]
            if answered:
                messages.append({"role": "assistant", "content": str(a + b)})
            handle.write(json.dumps({"messages": messages, "answer": str(a + b)}) + "\n")
    return path


@pytest.fixture(scope="module")
def sums(tmp_path_factory) -> dict[str, Path]:
    import random

    pairs = [(a, b) for a in range(10) for b in range(10)]
    random.Random(7).shuffle(pairs)
    folder = tmp_path_factory.mktemp("sums")
    return {
        "train": write_sums(folder / "train.jsonl", pairs[:64]),
        "eval": write_sums(folder / "eval.jsonl", pairs[64:88]),
        # Demonstrations for the SFT start: 12 of the training pairs, none held out.
        "sft": write_sums(folder / "sft.jsonl", pairs[:12], answered=True),
    }


# Training and sampling alternate within a step, so each gets both cores as torch threads
# (2 CPUs for the worker, 2 for the rollout engine, on the 4-CPU test cluster).
TWO_THREADS = {"scaling": {"num_workers": 1, "cpus_per_worker": 2}}


def grpo_on_sums(
    sums: dict[str, Path], name: str, steps: int, lr: float, adapter: str | None = None
) -> dict:
    spec = validate_spec(
        {
            "model": {"name": "smollm2-135m-instruct", "dtype": "float32", "adapter": adapter},
            "data": {"train": str(sums["train"]), "eval": str(sums["eval"]), "max_seq_len": 96},
            "objective": "grpo",
            "grpo": {
                "grader": SUMS,
                "num_generations": 4,
                "max_new_tokens": 8,
                "temperature": 1.0,
                "rollout_cpus": 2,
            },
            "lora": {"r": 16, "dropout": 0.0},
            "optim": {"lr": lr, "max_steps": steps, "batch_size": 4, "warmup_ratio": 0.0},
            **TWO_THREADS,
            "output": {"name": name, "overwrite": True},
        }
    )
    outcome = run_training(spec, show_progress=False)
    return json.loads((Path(outcome.artifact) / "rayft.json").read_text())


def grades(meta: dict) -> tuple[float, float]:
    evals = [r for r in meta["history"] if r["kind"] == "eval"]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == meta["steps"]
    return evals[0]["eval_reward"], evals[-1]["eval_reward"]


def test_smollm2_learns_to_answer_sums_from_the_base(ray_cluster, sums):
    meta = grpo_on_sums(sums, "grpo-sums", steps=16, lr=1e-3)
    before, after = grades(meta)
    # Measured: 0.313 -> 0.500 over 16 steps (answers are seeded by step and the prompts'
    # order by optim.seed, so a rerun samples the same groups); the sampled answers' mean
    # grade went 0.13 -> 0.5. Sampling at temperature 0.7 (at lr 5e-4 or 1e-3) moved the
    # held-out grade only 0.313 -> 0.375: too few groups held a better answer to learn from.
    assert after >= before + 0.08, (before, after)
    trains = [r for r in meta["history"] if r["kind"] == "train"]
    early, late = trains[:4], trains[-4:]
    assert sum(r["reward"] for r in late) > sum(r["reward"] for r in early)


def test_smollm2_learns_to_answer_sums_from_an_sft_adapter(ray_cluster, sums):
    # First a supervised adapter on a few demonstrations, then GRPO continues that adapter
    # (model.adapter): the held-out grade starts from the SFT adapter's and rises.
    sft = validate_spec(
        {
            "model": {"name": "smollm2-135m-instruct", "dtype": "float32"},
            "data": {"train": str(sums["sft"]), "max_seq_len": 96},
            "lora": {"r": 16, "dropout": 0.0},
            "optim": {"lr": 2e-4, "max_steps": 3, "batch_size": 4, "warmup_ratio": 0.0},
            **TWO_THREADS,
            "output": {"name": "sums-sft", "overwrite": True},
        }
    )
    run_training(sft, show_progress=False)
    # Half the base run's lr: at 1e-3 the held-out grade of this adapter fell to 0.04.
    meta = grpo_on_sums(sums, "grpo-sums-sft", steps=16, lr=5e-4, adapter="sums-sft")
    parent = meta["parent_adapter"]
    assert parent["name"] == "sums-sft" and parent["run_id"].startswith("sums-sft-")
    assert parent["steps"] == 3 and meta["method"] == "lora"
    before, after = grades(meta)
    # Measured: 0.354 (the SFT adapter's grade; the base's is 0.313) -> 0.458 over 16 steps;
    # the sampled answers' mean grade went 0.09 -> 0.5.
    assert after >= before + 0.08, (before, after)


def test_full_weight_grpo_samples_on_vllm_and_reloads_the_policy_each_step(ray_cluster, sums):
    # grpo.rollout_engine=vllm with method full: the rollout engine starts vLLM with weight
    # reloads open, and after each optimizer step reloads the policy's state dict in place.
    import os

    from rayft.serving.vllm_engine import find_vllm_python

    if os.environ.get("RAYFT_VLLM") == "0" or find_vllm_python() is None:
        pytest.skip("no vLLM environment (scripts/install_vllm.sh)")
    spec = validate_spec(
        {
            "model": {"name": "smollm2-135m-instruct", "dtype": "float32"},
            "data": {"train": str(sums["train"]), "max_seq_len": 96},
            "objective": "grpo",
            "method": "full",
            "grpo": {
                "grader": SUMS,
                "num_generations": 4,
                "max_new_tokens": 8,
                "beta": 0.0,
                "rollout_cpus": 2,
                "rollout_engine": "vllm",
            },  # fmt: skip
            "optim": {"lr": 1e-5, "max_steps": 2, "batch_size": 4, "warmup_ratio": 0.0},
            **TWO_THREADS,
            "output": {"name": "grpo-vllm-full", "overwrite": True},
        }
    )
    outcome = run_training(spec, show_progress=False)
    meta = json.loads((Path(outcome.artifact) / "rayft.json").read_text())
    assert meta["method"] == "full" and meta["steps"] == 2
    trains = [r for r in meta["history"] if r["kind"] == "train"]
    assert [r["step"] for r in trains] == [1, 2]
    assert all(0.0 <= r["reward"] <= 1.0 for r in trains)
    assert (Path(outcome.artifact) / "model.safetensors").is_file()
