"""DoRA and rsLoRA adapters: what PEFT builds from the spec, and serving a DoRA adapter.

PEFT's mixed-adapter batches refuse DoRA, so the engine runs a DoRA adapter's rows in a
pass of their own; here a DoRA adapter answers next to a plain LoRA adapter and the
base model in one batch, each row as it would alone and as plain PEFT generates.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from rayft.serving.engine import BASE_ADAPTER, GenerationRequest, ModelEngine, SamplingParams
from rayft.trainers.config import LoraSpec
from rayft.trainers.manifest import ArtifactManifest
from rayft.trainers.methods import apply_lora, load_lora


def tiny_model(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def publish(home: Path, name: str, seed: int, use_dora: bool, model_dir: Path) -> Path:
    """A tiny-llama adapter with random B matrices (and, for DoRA, random magnitudes)."""
    model = apply_lora(tiny_model(model_dir), LoraSpec(r=4, alpha=8, use_dora=use_dora))
    generator = torch.Generator().manual_seed(seed)
    for param_name, param in model.named_parameters():
        if "lora_B" in param_name:
            param.data = torch.randn(param.shape, generator=generator) * 0.5
        elif "lora_magnitude_vector" in param_name:
            param.data = param.data * (1 + 0.3 * torch.rand(param.shape, generator=generator))
    out = home / "adapters" / name
    model.save_pretrained(out)
    ArtifactManifest(kind="adapter", base_model="tiny-llama").write(out)
    return out


class Parent:
    """A published adapter as ``trainers.lineage.ParentAdapter`` hands it to ``load_lora``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def local_dir(self) -> Path:
        return self.path


def test_dora_adds_magnitude_vectors_and_trains_them(tiny_model_dir):
    model = apply_lora(tiny_model(tiny_model_dir), LoraSpec(r=4, use_dora=True))
    magnitudes = [n for n, p in model.named_parameters() if "lora_magnitude_vector" in n]
    assert magnitudes, "DoRA adds a magnitude vector to every adapted layer"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(magnitudes) <= trainable
    plain = apply_lora(tiny_model(tiny_model_dir), LoraSpec(r=4))
    assert not [n for n, _ in plain.named_parameters() if "lora_magnitude_vector" in n]


def test_rslora_scales_by_alpha_over_sqrt_r(tiny_model_dir):
    from peft.tuners.lora import LoraLayer

    for use_rslora, expected in ((True, 32 / math.sqrt(16)), (False, 32 / 16)):
        model = apply_lora(
            tiny_model(tiny_model_dir), LoraSpec(r=16, alpha=32, use_rslora=use_rslora)
        )
        layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
        assert layers
        assert [m.scaling["default"] for m in layers] == [pytest.approx(expected)] * len(layers)


def test_continued_adapter_keeps_its_parents_dora_and_rslora(tiny_model_dir, tmp_path):
    model = apply_lora(
        tiny_model(tiny_model_dir), LoraSpec(r=4, alpha=8, use_dora=True, use_rslora=True)
    )
    model.save_pretrained(tmp_path / "parent")
    # The spec asks for neither; the parent's weights and scale win.
    child = load_lora(tiny_model(tiny_model_dir), Parent(tmp_path / "parent"), LoraSpec())
    config = child.peft_config["default"]
    assert config.use_dora and config.use_rslora and config.r == 4
    assert any(
        "lora_magnitude_vector" in n and p.requires_grad for n, p in child.named_parameters()
    )


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model_dir):
    home = tmp_path_factory.mktemp("rayft-dora")
    publish(home, "dora", 1, True, tiny_model_dir)
    publish(home, "plain", 2, False, tiny_model_dir)
    engine = ModelEngine("tiny-llama", storage=str(home), max_loaded_adapters=2, dtype="float32")
    return home, engine


def peft_greedy(home: Path, model_dir: Path, adapter: str, ids: list[int], n: int) -> list[int]:
    from peft import PeftModel

    model = PeftModel.from_pretrained(tiny_model(model_dir), str(home / "adapters" / adapter))
    model.eval()
    x = torch.tensor([ids])
    out = model.generate(
        input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False
    )
    return out[0, x.shape[1] :].tolist()


def test_dora_adapter_answers_next_to_plain_lora_in_one_batch(served, tiny_model_dir):
    home, engine = served
    params = SamplingParams(max_tokens=8, temperature=0.0)
    prompts = ["hello world", "the quick brown fox jumps", "paris is the capital of"]
    requests = [
        GenerationRequest(tuple(engine.tokenizer(p)["input_ids"]), a, params)
        for p in prompts
        for a in ("dora", "plain", BASE_ADAPTER)
    ]
    together = [c.token_ids for c in engine.generate(requests)]
    alone = [engine.generate([r])[0].token_ids for r in requests]
    assert together == alone
    assert engine._dora == {"dora"}
    # The DoRA rows are the DoRA adapter's answers (plain PEFT) and differ from the base.
    dora_rows = [i for i, r in enumerate(requests) if r.adapter == "dora"]
    for i in dora_rows:
        expected = peft_greedy(home, tiny_model_dir, "dora", list(requests[i].prompt_ids), 8)
        assert together[i] == expected[: len(together[i])]
    assert [together[i] for i in dora_rows] != [together[i + 2] for i in dora_rows]
