"""Continued fine-tuning without Ray: the ``model.adapter`` checks, weights fingerprints,
the servability check at publish, lineage, and the server's refusal of another base."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path

import httpx
import pytest
import torch

from rayft.cluster.cli import main
from rayft.trainers.config import ConfigError, validate_spec
from rayft.trainers.lineage import LineageError, format_lineage, lineage, resolve_parent
from rayft.trainers.registry import publish_dir
from rayft.trainers.servable import (
    FINGERPRINT_FILE,
    UnservableError,
    base_fingerprint,
    check_servable,
    weights_fingerprint,
)
from rayft.trainers.storage import StorageRoot


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("rayft-lineage")


@pytest.fixture(scope="module")
def base_dir(home: Path) -> Path:
    from rayft.trainers.models import pull_builtin

    return pull_builtin("tiny-llama", home / "models")


def peft_files(base_dir: Path, out: Path, seed: int, r: int = 4, poison: bool = False) -> Path:
    """PEFT adapter files for tiny-llama with random B matrices (NaN ones with ``poison``)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_dir),
        LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=generator) * 0.5
            if poison:
                param.data[0, 0] = float("nan")
    model.save_pretrained(out)
    return out


def spec_for(home: Path, **model) -> object:
    return validate_spec(
        {
            "model": {"name": "tiny-llama", **model},
            "data": {"train": "unused.jsonl"},
            "lora": {"r": 16},
            "storage": str(home),
        }
    )


# ------------------------------------------------------------------ fingerprints


def test_fingerprint_follows_the_weights_not_the_files(base_dir: Path, tmp_path: Path):
    from transformers import AutoModelForCausalLM

    first = weights_fingerprint(base_dir)
    assert len(first) == 64
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    assert weights_fingerprint(tmp_path / "sharded") == first
    with torch.no_grad():
        model.model.norm.weight[0] += 1e-3
    model.save_pretrained(tmp_path / "changed")
    assert weights_fingerprint(tmp_path / "changed") != first


def test_base_fingerprint_is_cached_next_to_the_model_and_follows_changes(
    base_dir: Path, home: Path, tmp_path: Path
):
    assert base_fingerprint(base_dir, home / "models") == weights_fingerprint(base_dir)
    cached = json.loads((base_dir / FINGERPRINT_FILE).read_text())
    assert cached["sha256"] == weights_fingerprint(base_dir)
    # A directory outside rayft's cache is left untouched; its value is cached in the cache.
    outside = Path(shutil.copytree(base_dir, tmp_path / "user-model"))
    (outside / FINGERPRINT_FILE).unlink()
    assert base_fingerprint(outside, home / "models") == cached["sha256"]
    assert not (outside / FINGERPRINT_FILE).exists()
    assert list((home / "models" / ".fingerprints").glob("user-model-*.json"))
    # New weights under the same files: the stale cached value is not used.
    from safetensors.torch import load_file, save_file

    weights = outside / "model.safetensors"
    tensors = load_file(weights)
    key = sorted(tensors)[0]
    tensors[key] = tensors[key] + 1.0
    save_file(tensors, weights, metadata={"format": "pt"})
    os.utime(weights, ns=(1, 1))
    assert base_fingerprint(outside, home / "models") == weights_fingerprint(outside)
    assert weights_fingerprint(outside) != cached["sha256"]


# ------------------------------------------------------------------ servability at publish


def test_publish_checks_an_adapter_serves_and_records_the_base_fingerprint(
    base_dir: Path, home: Path, tmp_path: Path
):
    src = peft_files(base_dir, tmp_path / "good", seed=1)
    path = publish_dir(
        src,
        "adapter",
        "good",
        {"base_model": "tiny-llama"},
        False,
        StorageRoot.resolve(str(home)),
        base_dir=base_dir,
    )
    manifest = json.loads((path / "rayft.json").read_text())
    assert manifest["base_fingerprint"] == weights_fingerprint(base_dir)


def test_publish_refuses_an_adapter_with_nan_weights_and_publishes_nothing(
    base_dir: Path, home: Path, tmp_path: Path
):
    src = peft_files(base_dir, tmp_path / "nan", seed=2, poison=True)
    with pytest.raises(UnservableError, match="non-finite logits"):
        publish_dir(
            src,
            "adapter",
            "nan",
            {"base_model": "tiny-llama"},
            False,
            StorageRoot.resolve(str(home)),
            base_dir,
        )
    assert not (home / "adapters" / "nan").exists()


def test_the_check_at_export_notes_its_outcome_and_publishing_reads_the_note(
    base_dir: Path, home: Path, tmp_path: Path
):
    from rayft.trainers.config import validate_spec
    from rayft.trainers.loop import SERVABLE_FILE, check_export
    from rayft.trainers.servable import export_was_checked

    spec = validate_spec({"model": {"name": "tiny-llama"}, "data": {"train": "t.jsonl"}})
    good = peft_files(base_dir, tmp_path / "ckpt-good" / "export", seed=1)
    check_export(good, spec, base_dir)
    assert export_was_checked((good.parent / SERVABLE_FILE).read_bytes()) is True

    poisoned = peft_files(base_dir, tmp_path / "ckpt-nan" / "export", seed=2, poison=True)
    check_export(poisoned, spec, base_dir)
    note = (poisoned.parent / SERVABLE_FILE).read_bytes()
    with pytest.raises(UnservableError, match="non-finite logits"):
        export_was_checked(note)
    assert export_was_checked(None) is False  # no note: publishing checks the files itself

    # A checked export is published without loading it again; the fingerprint is recorded.
    path = publish_dir(
        good,
        "adapter",
        "noted",
        {"base_model": "tiny-llama"},
        False,
        StorageRoot.resolve(str(home)),
        base_dir,
        True,
    )
    assert json.loads((path / "rayft.json").read_text())["base_fingerprint"] == (
        weights_fingerprint(base_dir)
    )


def test_servability_check_refuses_truncated_and_misshapen_weights(base_dir: Path, tmp_path: Path):
    src = peft_files(base_dir, tmp_path / "torn", seed=3)
    weights = src / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(UnservableError, match="does not load"):
        check_servable(src, "adapter", base_dir)
    # An adapter made for another model's shapes (hidden size 64 vs 96).
    from transformers import LlamaConfig, LlamaForCausalLM

    other = tmp_path / "other-base"
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=96,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    ).save_pretrained(other)
    wrong = peft_files(other, tmp_path / "wrong", seed=4)
    with pytest.raises(UnservableError, match="does not load on its base"):
        check_servable(wrong, "adapter", base_dir)


def test_servability_check_refuses_a_full_model_with_nan_weights(base_dir: Path, tmp_path: Path):
    from transformers import AutoModelForCausalLM

    check_servable(base_dir, "model")
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    with torch.no_grad():
        model.lm_head.weight[3, 3] = float("inf")
    model.save_pretrained(tmp_path / "inf-model")
    with pytest.raises(UnservableError, match="non-finite"):
        check_servable(tmp_path / "inf-model", "model")


# ------------------------------------------------------------------ model.adapter checks


def parent_of(spec, model_dir: Path | None = None):
    """``resolve_parent`` in the spec's own storage root, as a run's driver calls it."""
    return resolve_parent(spec, StorageRoot.resolve(spec.storage), model_dir)


def test_model_adapter_needs_method_lora_and_a_safe_name(home: Path):
    with pytest.raises(ConfigError) as err:
        validate_spec({"data": {"train": "x.jsonl"}, "method": "full", "model": {"adapter": "a"}})
    assert err.value.problems[0][0] == "model.adapter" and "method lora" in str(err.value)
    with pytest.raises(ConfigError, match="model.adapter"):
        validate_spec({"data": {"train": "x.jsonl"}, "model": {"adapter": "../up"}})
    assert parent_of(spec_for(home)) is None


def test_model_adapter_must_be_published_for_model_name(base_dir: Path, home: Path, tmp_path):
    with pytest.raises(ConfigError) as err:
        parent_of(spec_for(home, adapter="nowhere"))
    ((key, message),) = err.value.problems
    assert key == "model.adapter" and "no adapter named 'nowhere' is published" in message
    src = peft_files(base_dir, tmp_path / "smol", seed=5)
    publish_dir(
        src,
        "adapter",
        "for-smollm",
        {"base_model": "smollm2-135m-instruct"},
        True,
        StorageRoot.resolve(str(home)),
    )
    with pytest.raises(ConfigError, match="model.name=smollm2-135m-instruct"):
        parent_of(spec_for(home, adapter="for-smollm"))


def test_parent_is_described_and_its_lora_shape_wins(base_dir: Path, home: Path, tmp_path):
    src = peft_files(base_dir, tmp_path / "p", seed=6, r=4)
    manifest = {"base_model": "tiny-llama", "dataset_sha256": "ab" * 32, "method": "lora"}
    manifest["metrics"] = {"eval_loss": 1.5, "step": 3, "final": True}
    publish_dir(
        src, "adapter", "parent", manifest, True, StorageRoot.resolve(str(home)), base_dir=base_dir
    )
    parent = parent_of(spec_for(home, adapter="parent"), model_dir=base_dir)
    assert parent.lora["r"] == 4 and parent.lora["alpha"] == 8
    record = parent.record()
    assert record.name == "parent" and record.dataset_sha256 == "ab" * 32
    assert (
        record.version == json.loads((home / "adapters/parent/rayft.json").read_text())["version"]
    )
    assert record.metrics == {"eval_loss": 1.5}
    [note] = parent.lora_notes(spec_for(home, adapter="parent"))
    assert "r=4" in note and "lora.r=16" in note and "do not apply" in note
    assert parent.local_dir() == home / "adapters" / "parent"


def test_a_parent_trained_on_other_base_weights_is_refused(base_dir: Path, home: Path, tmp_path):
    src = peft_files(base_dir, tmp_path / "p", seed=7)
    manifest = {"base_model": "tiny-llama", "base_fingerprint": "0" * 64}
    publish_dir(src, "adapter", "stale-base", manifest, True, StorageRoot.resolve(str(home)))
    with pytest.raises(ConfigError, match="with weights 000000000000, but 'tiny-llama' now has"):
        parent_of(spec_for(home, adapter="stale-base"), model_dir=base_dir)


# ------------------------------------------------------------------ lineage


def _fake(tmp_path: Path, tag: str, kind: str = "adapter") -> Path:
    src = tmp_path / f"src-{tag}"
    src.mkdir()
    name = "adapter_config.json" if kind == "adapter" else "config.json"
    (src / name).write_text("{}")
    return src


def test_lineage_follows_parents_and_published_models_to_the_base(home: Path, tmp_path, capsys):
    root = tmp_path / "root"
    full = {"base_model": "tiny-llama", "method": "full", "dataset_sha256": "f" * 64}
    publish_dir(
        _fake(tmp_path, "m", "model"),
        "model",
        "ft-full",
        full,
        False,
        StorageRoot.resolve(str(root)),
    )
    grand = {
        "name": "g",
        "version": "0001-aa",
        "dataset_sha256": "1" * 64,
        "published_at": 0.0,
        "metrics": {"eval_loss": 2.0},
        "parent_adapter": None,
        "base_model": "ft-full",
    }
    parent = {**grand, "name": "p", "version": "0002-bb", "dataset_sha256": "2" * 64}
    parent["parent_adapter"] = grand
    child = {
        "base_model": "ft-full",
        "dataset_sha256": "3" * 64,
        "metrics": {"eval_loss": 1.25, "eval_perplexity": 3.49, "step": 4},
        "steps": 4,
        "parent_adapter": parent,
    }
    publish_dir(_fake(tmp_path, "c"), "adapter", "c", child, False, StorageRoot.resolve(str(root)))

    chain = lineage("c", StorageRoot.resolve(str(root)))
    assert [(e["kind"], e["name"]) for e in chain] == [
        ("adapter", "c"),
        ("adapter", "p"),
        ("adapter", "g"),
        ("model", "ft-full"),
        ("base", "tiny-llama"),
    ]
    lines = format_lineage(chain)
    assert len(lines) == 5
    assert "data 333333333333" in lines[0] and "eval_loss=1.2500" in lines[0]
    assert (
        "steps=4" in lines[0] and "v 0002-bb" in lines[1] and "1970-01-01 00:00:00 UTC" in lines[2]
    )
    assert lines[3].startswith("full") and lines[4].startswith("base")

    assert main(["models", "lineage", "c", "--storage", str(root), "--json"]) == 0
    assert [e["name"] for e in json.loads(capsys.readouterr().out)][-1] == "tiny-llama"
    assert main(["models", "lineage", "c", "--storage", str(root)]) == 0
    assert capsys.readouterr().out.splitlines() == lines
    with pytest.raises(LineageError, match="no published adapter or model named 'nope'"):
        lineage("nope", StorageRoot.resolve(str(root)))
    assert main(["models", "lineage", "nope", "--storage", str(root)]) == 2
    assert "no published adapter or model named 'nope'" in capsys.readouterr().err


# ------------------------------------------------------------------ serving


def test_server_refuses_an_adapter_trained_on_other_base_weights(base_dir: Path, home, tmp_path):
    from rayft.serving.engine import ModelEngine
    from rayft.serving.errors import Conflict
    from rayft.serving.openai_api import create_api
    from rayft.serving.service import ModelService

    ours = weights_fingerprint(base_dir)
    for name, fingerprint in (("same-base", ours), ("other-base", "e" * 64), ("legacy", None)):
        manifest = {"base_model": "tiny-llama"}
        if fingerprint:
            manifest["base_fingerprint"] = fingerprint
        src = peft_files(base_dir, tmp_path / name, seed=8)
        publish_dir(src, "adapter", name, manifest, True, StorageRoot.resolve(str(home)))
    engine = ModelEngine("tiny-llama", storage=str(home), dtype="float32")
    assert engine.weights_fingerprint == ours
    engine.check_adapter("same-base")
    engine.check_adapter("legacy")  # published before fingerprints: still served
    with pytest.raises(Conflict) as err:
        engine.check_adapter("other-base")
    assert err.value.status == 409 and err.value.code == "base_model_mismatch"
    assert ours[:12] in err.value.message and "eeeeeeeeeeee" in err.value.message

    service = ModelService(engine)

    async def post() -> httpx.Response:
        transport = httpx.ASGITransport(app=create_api(service))
        async with httpx.AsyncClient(transport=transport, base_url="http://rayft") as client:
            body = {"model": "other-base", "prompt": "hello", "max_tokens": 2}
            return await client.post("/v1/completions", json=body)

    try:
        response = asyncio.run(post())
    finally:
        service.close()
    assert response.status_code == 409
    error = response.json()["error"]
    assert error["code"] == "base_model_mismatch" and error["type"] == "invalid_request_error"
    assert "other-base" in error["message"] and ours[:12] in error["message"]


def test_a_parent_in_an_object_storage_root_is_checked_and_fetched(
    base_dir: Path, tmp_path: Path, monkeypatch
):
    from harness import s3_server

    monkeypatch.setenv("RAYFT_CACHE", str(tmp_path / "cache"))
    with s3_server("lineage"):
        uri = "s3://lineage/rayft"
        src = peft_files(base_dir, tmp_path / "s3-parent", seed=9, r=4)
        meta = {"base_model": "tiny-llama", "dataset_sha256": "cd" * 32}
        publish_dir(
            src, "adapter", "s3-parent", meta, False, StorageRoot.resolve(uri), base_dir=base_dir
        )
        mirror = tmp_path / "cache" / "mirror"
        shutil.rmtree(mirror)  # another machine: nothing mirrored yet
        spec = validate_spec(
            {
                "model": {"adapter": "s3-parent", "name": "tiny-llama"},
                "data": {"train": "x.jsonl"},
                "storage": uri,
            }
        )
        parent = parent_of(spec, model_dir=base_dir)
        assert parent.root.location == uri and parent.record().dataset_sha256 == "cd" * 32
        shutil.rmtree(mirror)
        local = parent.local_dir()
        assert local.is_relative_to(mirror) and (local / "adapter_model.safetensors").is_file()
        assert [e["name"] for e in lineage("s3-parent", StorageRoot.resolve(uri))] == [
            "s3-parent",
            "tiny-llama",
        ]
        gone = {**spec.to_dict(), "model": {"name": "tiny-llama", "adapter": "gone"}}
        with pytest.raises(ConfigError, match="no adapter named 'gone' is published in s3://"):
            parent_of(validate_spec(gone))
