"""The training and serving paths on CUDA; skipped on machines without a GPU.

Whole runs (Ray Train, DeepSpeed): skipped where either is not installed (a GPU machine with
only torch, transformers and peft runs ``test_gpu_components.py`` instead).
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(
        not all(importlib.util.find_spec(name) for name in ("ray", "deepspeed")),
        reason="a training run needs ray and deepspeed",
    ),
]


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    from rayft.cluster.connect import connect

    connect(None)
    yield
    ray.shutdown()


def test_lora_zero2_on_gpu_uses_bf16_and_publishes(ray_cluster, tmp_path, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from rayft.trainers.config import validate_spec
    from rayft.trainers.driver import run_training

    data = tmp_path / "t.jsonl"
    data.write_text(
        "".join(
            json.dumps({"prompt": f"say {i}", "completion": f"number {i}"}) + "\n"
            for i in range(64)
        )
    )
    spec = validate_spec(
        {
            "model": {"name": "tiny-llama"},
            "data": {"train": str(data), "eval_fraction": 0.2, "max_seq_len": 64},
            "optim": {"max_steps": 6, "batch_size": 4, "lr": 3e-3},
            "scaling": {"num_workers": 1, "use_gpu": True},
            "output": {"name": "gpu-lora"},
        }
    )
    outcome = run_training(spec, show_progress=False)
    evals = outcome.evals()
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    config = json.loads((outcome.artifact / "rayft.json").read_text())
    assert config["spec"]["scaling"]["use_gpu"] is True
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), outcome.artifact
    )
    assert model.peft_config["default"].r == 16


def test_qlora_trains_and_publishes_a_plain_peft_adapter(ray_cluster, tmp_path, tiny_model_dir):
    pytest.importorskip("bitsandbytes", reason="method qlora needs the gpu extra")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from rayft.trainers.config import validate_spec
    from rayft.trainers.driver import run_training

    data = tmp_path / "t.jsonl"
    data.write_text(
        "".join(
            json.dumps({"prompt": f"say {i}", "completion": f"number {i}"}) + "\n"
            for i in range(64)
        )
    )
    spec = validate_spec(
        {
            "model": {"name": "tiny-llama"},
            "method": "qlora",
            "lora": {"r": 8},
            "data": {"train": str(data), "eval_fraction": 0.2, "max_seq_len": 64},
            "optim": {"max_steps": 6, "batch_size": 4, "lr": 3e-3},
            "scaling": {"num_workers": 1, "use_gpu": True},
            "output": {"name": "gpu-qlora"},
        }
    )
    outcome = run_training(spec, show_progress=False)
    evals = outcome.evals()
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    config = json.loads((outcome.artifact / "rayft.json").read_text())
    assert config["method"] == "qlora"
    # The adapter loads on the plain (unquantized) base with PEFT alone.
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = PeftModel.from_pretrained(base, outcome.artifact)
    assert model.peft_config["default"].r == 8
    ids = torch.tensor([[1, 2, 3]])
    assert torch.isfinite(model(input_ids=ids).logits).all()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="a 2-worker run needs 2 GPUs")
def test_two_workers_on_two_gpus_train_packed_rows_and_publish(
    ray_cluster, tmp_path, tiny_model_dir
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from rayft.trainers.config import validate_spec
    from rayft.trainers.driver import run_training

    data = tmp_path / "t.jsonl"
    data.write_text(
        "".join(
            json.dumps({"prompt": f"say {i}", "completion": f"number {i}"}) + "\n"
            for i in range(128)
        )
    )
    spec = validate_spec(
        {
            "model": {"name": "tiny-llama"},
            "data": {"train": str(data), "eval_fraction": 0.2, "max_seq_len": 64, "packing": True},
            "optim": {"max_steps": 6, "batch_size": 2, "grad_accum": 1, "lr": 3e-3},
            "scaling": {"num_workers": 2, "use_gpu": True},
            "output": {"name": "gpu-two-workers"},
        }
    )
    outcome = run_training(spec, show_progress=False)
    evals = outcome.evals()
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    config = json.loads((outcome.artifact / "rayft.json").read_text())
    assert config["spec"]["scaling"]["num_workers"] == 2
    assert config["spec"]["data"]["packing"] is True
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), outcome.artifact
    )
    assert torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3]])).logits).all()
