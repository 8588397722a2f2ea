"""Benchmarks: EleutherAI's lm-evaluation-harness tasks, run against a served model.

rayft ships small lm-eval tasks in ``trainers/lm_eval_tasks/`` (a task YAML and its JSON
lines data each; nothing is downloaded): ``rayft_capitals`` (log-likelihood, multiple
choice) and ``rayft_arithmetic`` (greedy generation, exact match). ``eval.benchmarks`` in
a job spec and ``rayft eval --benchmarks`` name tasks from that allow-list, or from a
local task folder given explicitly (``--tasks-dir``).

:func:`run_benchmarks` runs lm-eval's own ``local-completions`` model, which talks to
rayft's ``POST /v1/completions`` exactly as it talks to any OpenAI-compatible server:
log-likelihoods from ``echo`` + ``logprobs`` over token-id prompts, generations from
``max_tokens`` + ``stop``. lm-eval tokenizes requests itself with the served base
model's tokenizer, read from a local directory (``tokenizer``), so no hub is asked.

A training run (``eval.benchmarks``) scores the weights it starts from and the artifact
it exports, in the driver's process, with lm-eval's own transformers model (``hf``,
:func:`weights_model_args`): the served model's scores equal those
(``tests/integration/test_lm_eval.py`` checks the served ones against transformers).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from rayft.trainers.manifest import BenchmarkReport, BenchmarkScores

TASKS_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"
"""The lm-eval tasks rayft ships (YAML + JSON lines each)."""

_TASK_LINE = re.compile(r"^task:\s*([A-Za-z0-9_.-]+)\s*$", re.MULTILINE)


class BenchmarkError(ValueError):
    """A benchmark that cannot run: an unknown task, no lm-eval, or lm-eval failed."""


def task_names(folder: Path = TASKS_DIR) -> list[str]:
    """The lm-eval task names defined by the YAML files directly in ``folder``."""
    names: list[str] = []
    for path in sorted(folder.glob("*.yaml")):
        names += _TASK_LINE.findall(path.read_text(encoding="utf-8"))
    return names


SHIPPED_TASKS: tuple[str, ...] = tuple(task_names())
"""The allow-list: tasks ``eval.benchmarks`` may name without a task folder."""


def benchmark_problems(
    tasks: list[str], tasks_dir: str | None = None, folder_key: str = "eval.benchmarks_dir"
) -> list[str]:
    """Why ``tasks`` cannot run (empty when they can): unknown names, duplicates, a
    task folder that is not one. ``folder_key`` is where the user names a task folder."""
    problems: list[str] = []
    allowed = list(SHIPPED_TASKS)
    if tasks_dir is not None:
        folder = Path(tasks_dir).expanduser()
        if not folder.is_dir():
            return [f"task folder {tasks_dir!r} does not exist"]
        allowed += task_names(folder)
    unknown = [t for t in tasks if t not in allowed]
    if unknown:
        where = "" if tasks_dir is None else f" and the tasks of {tasks_dir}"
        problems.append(
            f"unknown benchmark task(s) {', '.join(map(repr, unknown))}; choose from "
            f"{', '.join(allowed)} (rayft's tasks{where}), or name a folder of lm-eval task "
            f"YAML files in {folder_key}"
        )
    if len(set(tasks)) != len(tasks):
        problems.append("a benchmark task is named twice")
    return problems


def served_model_args(
    base_url: str, model: str, tokenizer: str | Path, max_length: int = 2048
) -> dict[str, Any]:
    """lm-eval ``local-completions`` arguments for ``model`` served at ``base_url``.

    Args:
        base_url: The server's root (``http://host:port``).
        model: The base model or adapter name the server answers to.
        tokenizer: A local directory holding the served base model's tokenizer.
        max_length: The served model's context window (lm-eval cuts prompts to it).
    """
    return {
        "model": model,
        "base_url": f"{base_url.rstrip('/')}/v1/completions",
        "tokenizer_backend": "huggingface",
        "tokenizer": str(tokenizer),
        "max_length": max_length,
        "max_retries": 1,
        "num_concurrent": 1,
    }


def weights_model_args(
    model_dir: Path, adapter: Path | None = None, tokenizer: Path | None = None
) -> dict[str, Any]:
    """lm-eval ``hf`` arguments for weights on this machine: a base (or full fine-tune)
    directory, an optional PEFT adapter directory and the tokenizer's directory (default
    ``model_dir``), on a GPU if there is one."""
    import json

    import torch

    on_gpu = torch.cuda.is_available()
    config = json.loads((model_dir / "config.json").read_text())
    args: dict[str, Any] = {
        "pretrained": str(model_dir),
        "tokenizer": str(tokenizer or model_dir),
        "device": "cuda" if on_gpu else "cpu",
        "dtype": "auto" if on_gpu else "float32",
        "max_length": int(config.get("max_position_embeddings") or 2048),
    }
    if adapter is not None:
        args["peft"] = str(adapter)
    return args


def run_benchmarks(
    tasks: list[str],
    model_args: dict[str, Any],
    *,
    model: str = "local-completions",
    tasks_dir: str | None = None,
    batch_size: int = 8,
    limit: int | None = None,
    samples_out: Path | None = None,
) -> dict[str, BenchmarkScores]:
    """Run lm-eval's ``tasks`` on one model; scores per task.

    Args:
        tasks: Task names (checked by :func:`benchmark_problems`).
        model_args: The lm-eval model's arguments (:func:`served_model_args`).
        model: The lm-eval model type (``local-completions`` for a served model).
        tasks_dir: A local folder of more lm-eval task YAML files.
        batch_size: Prompts per request.
        limit: At most this many documents per task.
        samples_out: When given, lm-eval's per-document records are written there as
            ``<task>.jsonl``.

    Raises:
        BenchmarkError: An unknown task, lm-eval not installed, or lm-eval failed.
    """
    problems = benchmark_problems(tasks, tasks_dir, folder_key="--tasks-dir")
    if problems:
        raise BenchmarkError("; ".join(problems))
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise BenchmarkError(
            "benchmarks need lm-evaluation-harness: pip install 'rayft[eval]'"
        ) from None
    paths = [str(TASKS_DIR), *([str(Path(tasks_dir).expanduser())] if tasks_dir else [])]
    manager = TaskManager(include_path=paths, include_defaults=False)
    try:
        results = lm_eval.simple_evaluate(
            model=model,
            model_args=model_args,
            tasks=list(tasks),
            task_manager=manager,
            batch_size=batch_size,
            limit=limit,
            log_samples=samples_out is not None,
        )
    except Exception as err:  # noqa: BLE001 - lm-eval raises anything; the caller reports it
        raise BenchmarkError(f"lm-eval failed: {type(err).__name__}: {err}") from err
    if samples_out is not None:
        _write_samples(results.get("samples") or {}, samples_out)
    return {task: scores_of(results, task) for task in tasks}


def scores_of(results: dict[str, Any], task: str) -> BenchmarkScores:
    """One task's scores from ``lm_eval.simple_evaluate``'s results."""
    import lm_eval

    raw = results["results"][task]
    metrics = {
        key: float(value)
        for key, value in raw.items()
        if "," in key and "_stderr," not in key and isinstance(value, (int, float))
    }
    stderr = {
        key.replace("_stderr,", ","): float(value)
        for key, value in raw.items()
        if "_stderr," in key and isinstance(value, (int, float))
    }
    return BenchmarkScores(
        metrics=metrics,
        stderr=stderr,
        samples=int(
            raw.get("sample_len") or results.get("n-samples", {}).get(task, {}).get("effective", 0)
        ),
        lm_eval_version=lm_eval.__version__,
    )


def _write_samples(samples: dict[str, list[dict[str, Any]]], folder: Path) -> None:
    import json

    folder.mkdir(parents=True, exist_ok=True)
    for task, rows in samples.items():
        with open(folder / f"{task}.jsonl", "w", encoding="utf-8") as out:
            for row in rows:
                out.write(json.dumps(row, default=str) + "\n")


def benchmark_line(report: BenchmarkReport) -> str:
    """One line of what training changed: each task's metrics, before -> after."""
    parts = []
    for task, after in report.after.items():
        before = report.before.get(task)
        for key, value in after.metrics.items():
            was = before.metrics.get(key) if before is not None else None
            start = f"{was:.3f} -> " if was is not None else ""
            parts.append(f"{task} {key.split(',')[0]} {start}{value:.3f}")
    return "[rayft] benchmarks: " + ("; ".join(parts) or "none scored")
