"""lm-eval benchmarks: the shipped tasks, their allow-list, the spec key and the record."""

from __future__ import annotations

import json

import pytest

from rayft.trainers.benchmarks import (
    SHIPPED_TASKS,
    TASKS_DIR,
    benchmark_problems,
    scores_of,
    task_names,
)
from rayft.trainers.config import ConfigError, validate_spec
from rayft.trainers.manifest import ArtifactManifest, BenchmarkReport, BenchmarkScores

SPEC = {"model": {"name": "tiny-llama"}, "data": {"train": "train.jsonl"}}


def test_the_shipped_tasks_are_a_multiple_choice_and_a_generation_task_of_20_rows():
    assert SHIPPED_TASKS == ("rayft_arithmetic", "rayft_capitals")
    assert sorted(task_names(TASKS_DIR)) == list(SHIPPED_TASKS)
    kinds = {}
    for path in TASKS_DIR.glob("*.yaml"):
        lines = path.read_text().splitlines()
        (name,) = [line.split(":", 1)[1].strip() for line in lines if line.startswith("task:")]
        kinds[name] = [line for line in lines if line.startswith("output_type:")]
    assert kinds == {
        "rayft_capitals": ["output_type: multiple_choice"],
        "rayft_arithmetic": ["output_type: generate_until"],
    }
    for data in ("capitals.jsonl", "arithmetic.jsonl"):
        rows = [json.loads(line) for line in (TASKS_DIR / data).read_text().splitlines()]
        assert len(rows) == 20
    capitals = [json.loads(line) for line in (TASKS_DIR / "capitals.jsonl").open()]
    assert all(0 <= row["answer"] < len(row["choices"]) == 4 for row in capitals)
    sums = [json.loads(line) for line in (TASKS_DIR / "arithmetic.jsonl").open()]
    assert all(int(row["answer"]) == row["a"] + row["b"] for row in sums)


def test_only_allowed_tasks_pass(tmp_path):
    assert benchmark_problems(["rayft_capitals", "rayft_arithmetic"]) == []
    (problem,) = benchmark_problems(["hellaswag"])
    assert "'hellaswag'" in problem and "eval.benchmarks_dir" in problem
    assert benchmark_problems(["rayft_capitals"] * 2) == ["a benchmark task is named twice"]
    (tmp_path / "mine.yaml").write_text("task: my_task\noutput_type: generate_until\n")
    assert benchmark_problems(["my_task"]) != []
    assert benchmark_problems(["my_task", "rayft_capitals"], str(tmp_path)) == []
    missing = str(tmp_path / "nowhere")
    assert benchmark_problems(["rayft_capitals"], missing) == [
        f"task folder {missing!r} does not exist"
    ]


def test_the_spec_names_the_key_at_fault():
    spec = validate_spec({**SPEC, "eval": {"benchmarks": ["rayft_capitals"]}})
    assert spec.eval.benchmarks == ["rayft_capitals"]
    with pytest.raises(ConfigError) as caught:
        validate_spec({**SPEC, "eval": {"benchmarks": ["mmlu"]}})
    assert caught.value.problems[0][0] == "eval.benchmarks"
    with pytest.raises(ConfigError) as caught:
        validate_spec({**SPEC, "eval": {"benchmarks_dir": "."}})
    assert caught.value.problems[0][0] == "eval.benchmarks_dir"


def test_scores_are_read_from_lm_eval_results_and_round_trip_in_the_manifest(tmp_path):
    results = {
        "results": {
            "rayft_capitals": {
                "alias": "rayft_capitals",
                "sample_len": 20,
                "acc,none": 0.25,
                "acc_stderr,none": 0.1,
                "acc_norm,none": 0.3,
                "acc_norm_stderr,none": "N/A",
            }
        }
    }
    scores = scores_of(results, "rayft_capitals")
    assert scores.metrics == {"acc,none": 0.25, "acc_norm,none": 0.3}
    assert scores.stderr == {"acc,none": 0.1}
    assert scores.samples == 20
    report = BenchmarkReport(before={"rayft_capitals": scores}, after={"rayft_capitals": scores})
    ArtifactManifest(kind="adapter", name="x", benchmarks=report).write(tmp_path)
    again = ArtifactManifest.read(tmp_path)
    assert again.benchmarks == report
    assert isinstance(again.benchmarks.after["rayft_capitals"], BenchmarkScores)


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--benchmarks", "hellaswag"], "--tasks-dir"),
        ([], "--benchmarks TASK"),
        (["--data", "rows.jsonl", "--benchmarks", "rayft_capitals"], "give one of them"),
        (["--benchmarks", "rayft_capitals", "--limit", "0"], "--limit 0"),
    ],
)
def test_rayft_eval_refuses_bad_benchmark_arguments_before_loading_anything(
    args, says, capsys, monkeypatch, tmp_path
):
    from rayft.cluster.cli import main

    monkeypatch.setenv("RAYFT_HOME", str(tmp_path))  # empty: no model could load from it
    assert main(["eval", "--model", "tiny-llama", *args]) == 2
    assert says in capsys.readouterr().err
