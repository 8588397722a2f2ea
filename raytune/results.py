"""A sweep's results: the per-trial table (console, CSV, JSON) and the metric-vs-step plot."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

FINISHED = "finished"
EARLY_STOPPED = "early_stopped"
ERROR = "error"
UNFINISHED = "unfinished"

RESULTS_CSV = "results.csv"
RESULTS_JSON = "results.json"
PLOT_FILE = "metric_vs_step.png"


def trial_state(tune_status: str, last_result: dict[str, Any] | None) -> str:
    """A trial's state for people: ``finished``, ``early_stopped``, ``error`` or ``unfinished``.

    Tune marks both a trial that ran its budget and one its scheduler stopped as
    ``TERMINATED``; only a finished one has sent the run's final report.
    """
    if tune_status == "ERROR":
        return ERROR
    if tune_status == "TERMINATED":
        return FINISHED if (last_result or {}).get("final") else EARLY_STOPPED
    return UNFINISHED


def sort_rows(rows: list[dict[str, Any]], metric: str, mode: str) -> list[dict[str, Any]]:
    """Rows best first by ``metric`` (trials without a value last), each given its ``rank``."""

    def key(row: dict[str, Any]) -> tuple[int, float]:
        value = row.get(metric)
        if not isinstance(value, (int, float)) or math.isnan(value):
            return (1, 0.0)
        return (0, value if mode == "min" else -value)

    return [{**row, "rank": rank} for rank, row in enumerate(sorted(rows, key=key), start=1)]


def table_columns(rows: list[dict[str, Any]], params: list[str], metric: str) -> list[str]:
    """Column order of the results table: rank, trial, params, step, metric, state, adapter."""
    head = ["rank", "trial", *params, "step", metric, "state"]
    rest = [
        c
        for c in ("steps_total", f"best_{metric}", "run_id", "adapter", "trial_id")
        if any(c in r for r in rows)
    ]
    return head + rest


def format_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A plain-text table with aligned columns (for the console)."""
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


def write_tables(
    out_dir: Path, rows: list[dict[str, Any]], columns: list[str], about: dict[str, Any]
) -> tuple[Path, Path]:
    """Write ``results.csv`` (the table) and ``results.json`` (``about`` + the rows)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = out_dir / RESULTS_CSV, out_dir / RESULTS_JSON
    with open(csv_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({c: _csv_value(row.get(c)) for c in columns})
    json_path.write_text(
        json.dumps({**about, "columns": columns, "trials": rows}, indent=2, default=str)
    )
    return csv_path, json_path


def plot_curves(
    path: Path,
    curves: dict[str, list[tuple[int, float]]],
    states: dict[str, str],
    metric: str,
    title: str,
) -> Path:
    """Plot every trial's ``metric`` against optimizer steps into a PNG.

    Args:
        path: Where the PNG goes.
        curves: Trial label → ``[(step, value), ...]``.
        states: Trial label → state; early-stopped trials are dashed and end in a cross.
        metric: The y-axis label.
        title: The figure's title.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for label, points in curves.items():
        finite = [(s, v) for s, v in sorted(points) if math.isfinite(v)]
        if not finite:
            continue
        steps, values = zip(*finite, strict=True)
        stopped = states.get(label) == EARLY_STOPPED
        line = ax.plot(
            steps,
            values,
            linestyle="--" if stopped else "-",
            marker="o",
            markersize=3,
            label=f"{label} ({states.get(label, '?')})",
        )[0]
        if stopped:
            ax.plot(steps[-1], values[-1], marker="x", markersize=10, color=line.get_color())
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(metric)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return str(value)


def _csv_value(value: Any) -> Any:
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return "" if value is None else value
