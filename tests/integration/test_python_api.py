"""The Python API end to end: ``import rayft`` stays light, and ``rayft.train`` on rows
given in Python publishes an adapter that ``rayft.load_adapter`` loads on its base."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

import rayft

HEAVY = ("torch", "ray", "transformers", "deepspeed", "peft")


def test_import_rayft_loads_no_heavy_library_and_takes_under_a_second(tmp_path):
    probe = (
        "import json, sys, time\n"
        "t = time.perf_counter()\n"
        "import rayft\n"
        "elapsed = time.perf_counter() - t\n"
        f"print(json.dumps({{'elapsed': elapsed, 'heavy': [m for m in {HEAVY!r} "
        "if m in sys.modules], 'version': rayft.__version__}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["heavy"] == [] and seen["version"] == "0.1.0"
    assert seen["elapsed"] < 1.0, seen


def color_rows(count: int, offset: int = 0) -> list[dict]:
    from color_data import color_chat_rows

    return color_chat_rows(count, offset=offset)


@pytest.mark.slow
def test_train_on_python_rows_publishes_an_adapter_that_load_adapter_loads(
    rayft_home, tiny_model_dir
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    train_rows, eval_rows = color_rows(64), color_rows(8, offset=3)
    spec = {
        "model": {"name": "tiny-llama"},
        "data": {"format": "chat", "max_seq_len": 64},
        "method": "lora",
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "optim": {"lr": 3e-3, "max_steps": 6, "batch_size": 4, "warmup_ratio": 0.0},
        "scaling": {"num_workers": 1},
        "eval": {"every_steps": 3},
        "output": {"name": "api-colors", "overwrite": True},
    }
    result = rayft.train(
        spec,
        overrides=["optim.scheduler=constant"],
        data=train_rows,
        eval_data=eval_rows,
        show_progress=False,
    )

    assert result.run_id.startswith("api-colors-")
    run_data = rayft_home / "runs" / result.run_id / "data"
    assert [json.loads(x) for x in (run_data / "train.jsonl").read_text().splitlines()] == (
        train_rows
    )
    assert len((run_data / "eval.jsonl").read_text().splitlines()) == len(eval_rows)
    assert [e["step"] for e in result.evals] == [0, 3, 6]
    assert result.evals[-1]["eval_loss"] < result.evals[0]["eval_loss"]

    artifact = result.artifact
    assert artifact.name == "api-colors" and artifact.kind == "adapter"
    assert artifact.path.parent.resolve() == (rayft_home / "adapters").resolve()
    assert (artifact.path / "adapter_model.safetensors").is_file()
    manifest = artifact.manifest
    assert isinstance(manifest, rayft.ArtifactManifest)
    assert manifest.base_model == "tiny-llama" and manifest.run_id == result.run_id
    assert manifest.steps == 6 and manifest.spec["optim"]["scheduler"] == "constant"
    assert manifest.metrics and all(math.isfinite(v) for v in manifest.metrics.values())
    assert manifest.metrics["eval_loss"] == pytest.approx(result.evals[-1]["eval_loss"])

    model = rayft.load_adapter(artifact.name)
    assert isinstance(model, PeftModel) and not model.training
    inputs = torch.tensor([[5, 17, 42, 99, 120, 7, 3]])
    with torch.no_grad():
        logits = model(inputs).logits
        # The same adapter through plain PEFT on the base directory, and the base alone.
        plain = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(tiny_model_dir), artifact.path
        ).eval()
        want = plain(inputs).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)(inputs).logits
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits, want, rtol=0, atol=1e-5)
    assert not torch.allclose(logits, base, atol=1e-3)  # the trained adapter changes the model
