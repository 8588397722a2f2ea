"""Pieces of the publishing race tests (imported as ``publishing``)."""

from __future__ import annotations

import json
import threading
from pathlib import Path


def artifact(tmp_path: Path, tag: str) -> Path:
    """A small adapter directory whose weights file is ``tag`` repeated."""
    src = tmp_path / f"src-{tag}"
    src.mkdir()
    (src / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2}))
    (src / "adapter_model.safetensors").write_bytes(tag.encode() * 1000)
    return src


def race(count: int, body) -> list[object]:
    """Run ``body(i)`` on ``count`` threads released at once; their results or errors."""
    start = threading.Barrier(count)
    results: list[object] = [None] * count

    def run(i: int) -> None:
        start.wait()
        try:
            results[i] = body(i)
        except Exception as err:  # noqa: BLE001 - the outcome under test
            results[i] = err

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return results
