"""The datasets of rayft's lm-evaluation-harness tasks: JSON lines files next to this one.

lm-eval calls these through ``custom_dataset: !function task_data.<name>`` in the task
YAML, so the files are found wherever the package is installed, whatever the working
directory (``data_files`` in a task YAML would be read relative to it). The JSON builder of
``datasets`` reads local files with ``HF_DATASETS_OFFLINE=1``; nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def _jsonl(name: str) -> Any:
    import datasets

    return datasets.load_dataset("json", data_files={"test": str(HERE / name)})


def capitals(**_: Any) -> Any:
    """``rayft_capitals``: country, four candidate capitals, the index of the right one."""
    return _jsonl("capitals.jsonl")


def arithmetic(**_: Any) -> Any:
    """``rayft_arithmetic``: two digits ``a`` and ``b`` and their sum as text."""
    return _jsonl("arithmetic.jsonl")
