"""Fixtures for the serving tests: adapters (trained and PEFT-made) and a running Serve app.

Imported by ``test_serving.py`` (``from conftest_serving import *``-style) rather than
living in ``tests/conftest.py``, so other modules do not pay for them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from harness import make_peft_adapter  # noqa: F401 - re-exported to the serving tests
from specs import tiny_spec

COLORS = [("red", "apple"), ("blue", "sky"), ("green", "grass"), ("white", "snow")]


def train_adapter(data: Path, name: str, seed: int) -> Path:
    """Fine-tune tiny-llama with the real driver (1 worker, a few steps) and publish it."""
    from rayft.trainers.config import validate_spec
    from rayft.trainers.driver import run_training

    spec = validate_spec(
        tiny_spec(
            data,
            model={"dtype": "float32"},
            data={"format": "chat", "max_seq_len": 64},
            method="lora",
            lora={"r": 8, "alpha": 16, "dropout": 0.0},
            optim={
                "lr": 3e-2,
                "max_steps": 4,
                "batch_size": 4,
                "warmup_ratio": 0.0,
                "scheduler": "constant",
                "seed": seed,
            },
            scaling={"num_workers": 1},
            eval={"at_start": False},
            output={"name": name},
        )
    )
    outcome = run_training(spec, show_progress=False)
    return Path(outcome.artifact)


@pytest.fixture(scope="module")
def serving_home(ray_cluster, rayft_home: Path, tmp_path_factory) -> Path:
    """RAYFT_HOME holding two trained adapters (t1, t2) and PEFT-made ones for
    properties a short training run cannot guarantee; trained on the shared cluster."""
    data = tmp_path_factory.mktemp("serving-data") / "colors.jsonl"
    with open(data, "w") as handle:
        for i in range(32):
            color, thing = COLORS[i % len(COLORS)]
            row = {
                "messages": [
                    {"role": "user", "content": f"name a {color} thing"},
                    {"role": "assistant", "content": f"the {thing} is {color}"},
                ]
            }
            handle.write(json.dumps(row) + "\n")
    for name, seed in (("t1", 1), ("t2", 2)):
        if not (rayft_home / "adapters" / name).is_dir():
            train_adapter(data, name, seed)
    for name, seed in (("p1", 11), ("p2", 12)):
        make_peft_adapter(rayft_home, name, seed)
    make_peft_adapter(rayft_home, "for-smollm", 13, base="smollm2-135m-instruct")
    return rayft_home


@pytest.fixture(scope="module")
def serve_url(serving_home: Path):
    """One rayft Serve application for the module, HTTP on 127.0.0.1 and a free port.

    It runs on the shared cluster, which outlives the module: only Serve is shut down."""
    from ray import serve

    from rayft.serving.client import run_app

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    args = {
        "model": "tiny-llama",
        "storage": str(serving_home),
        "max_loaded_adapters": 2,
        "dtype": "float32",
        "max_tokens_limit": 64,
        "max_prompt_tokens": 48,
        "num_cpus": 1,
    }
    try:
        yield run_app(args)
    finally:
        serve.shutdown()
