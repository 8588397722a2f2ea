"""Continued fine-tuning on a local Ray cluster: a published full model as ``model.name``,
a LoRA adapter trained on it, a child adapter continued from that one on new data
(``model.adapter``), their lineage, and the server's refusal once the base changes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from specs import merged, tiny_spec

from rayft.trainers.config import validate_spec
from rayft.trainers.driver import run_training
from rayft.trainers.storage import StorageRoot

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def files(tmp_path_factory, color_chats) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("continued")
    return {
        "a": color_chats(folder / "a.jsonl", 32, colors=4),
        "b": color_chats(folder / "b.jsonl", 32, colors=4, first=4),
        # One eval set for every run, so one run's final loss is the next one's start.
        "eval": color_chats(folder / "eval.jsonl", 16),
    }


def job(files: dict[str, Path], data: str, name: str, **sections) -> dict:
    spec = tiny_spec(
        files[data],
        model={"dtype": "float32"},
        data={"eval": str(files["eval"]), "format": "chat", "max_seq_len": 64},
        method="lora",
        lora={"r": 8, "alpha": 16, "dropout": 0.0},
        optim={"lr": 1e-2, "max_steps": 4, "batch_size": 4, "warmup_ratio": 0.0},
        scaling={"num_workers": 1},
        output={"name": name, "overwrite": True},
    )
    return merged(spec, sections)


def manifest(path: Path) -> dict:
    return json.loads((Path(path) / "rayft.json").read_text())


def evals(meta: dict) -> list[dict]:
    return [r for r in meta["history"] if r["kind"] == "eval"]


@pytest.fixture(scope="module")
def full_model(ray_cluster, files) -> Path:
    spec = job(files, "a", "ct-full", method="full", optim={"lr": 1e-3, "max_steps": 3})
    return run_training(validate_spec(spec), show_progress=False).artifact


@pytest.fixture(scope="module")
def parent(full_model, files) -> Path:
    spec = job(files, "a", "ct-parent", model={"name": "ct-full"})
    return run_training(validate_spec(spec), show_progress=False).artifact


def test_published_full_model_is_the_base_of_a_new_run(full_model, parent):
    meta = manifest(parent)
    assert meta["base_model"] == "ct-full" and meta["parent_adapter"] is None
    # The adapter run starts from the published weights: its untrained loss on the shared
    # eval set is the full run's final loss.
    first = evals(meta)[0]
    assert first["step"] == 0
    assert first["eval_loss"] == pytest.approx(
        evals(manifest(full_model))[-1]["eval_loss"], abs=1e-5
    )
    from rayft.trainers.servable import weights_fingerprint

    assert meta["base_fingerprint"] == weights_fingerprint(full_model)


def test_continued_adapter_starts_from_its_parent_and_records_it(
    parent, files, rayft_home, tmp_path, capsys
):
    from rayft.cluster.cli import main

    config = tmp_path / "child.yaml"
    # The spec asks for r=16; the parent's r=8 wins (its weights have that shape).
    spec = job(files, "b", "ct-child", model={"name": "ct-full"}, lora={"r": 16})
    config.write_text(yaml.safe_dump(spec))

    assert main(["train", str(config), "model.adapter=nope"]) == 2
    err = capsys.readouterr().err
    assert "model.adapter" in err and "no adapter named 'nope' is published" in err

    assert main(["train", str(config), "model.adapter=ct-parent"]) == 0
    out, err = capsys.readouterr()
    assert "continuing adapter ct-parent" in err and "lora.r=16 from the spec do not apply" in err
    child = Path(json.loads(out.strip().splitlines()[-1])["artifact"])

    mother, meta = manifest(parent), manifest(child)
    recorded = meta["parent_adapter"]
    assert recorded["name"] == "ct-parent" and recorded["version"] == mother["version"]
    assert recorded["dataset_sha256"] == mother["dataset_sha256"]
    assert len(meta["dataset_sha256"]) == 64 and meta["dataset_sha256"] != mother["dataset_sha256"]
    assert meta["spec"]["model"]["adapter"] == "ct-parent"
    assert json.loads((child / "adapter_config.json").read_text())["r"] == 8
    # The child's untrained evaluation is its parent's final one: same weights, same rows.
    child_evals = evals(meta)
    assert child_evals[0]["step"] == 0
    assert child_evals[0]["eval_loss"] == pytest.approx(evals(mother)[-1]["eval_loss"], abs=1e-5)
    assert child_evals[-1]["step"] == 4
    assert child_evals[-1]["eval_loss"] != pytest.approx(child_evals[0]["eval_loss"], abs=1e-4)

    assert main(["models", "lineage", "ct-child"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in lines] == [
        ["adapter", "ct-child"],
        ["adapter", "ct-parent"],
        ["full", "ct-full"],
        ["base", "tiny-llama"],
    ]
    assert f"data {mother['dataset_sha256'][:12]}" in lines[1]
    assert f"v {mother['version']}" in lines[1] and "eval_loss=" in lines[1]


def test_server_refuses_the_child_once_its_base_changed(parent, full_model, rayft_home, tmp_path):
    from safetensors.torch import load_file, save_file

    from rayft.serving.engine import ModelEngine
    from rayft.serving.errors import Conflict
    from rayft.trainers.registry import ArtifactManifest, publish_dir

    engine = ModelEngine("ct-full", storage=str(rayft_home), dtype="float32")
    assert engine.check_adapter("ct-parent") == parent

    # Republish ct-full under the same name with one weight changed.
    changed = tmp_path / "ct-full-v2"
    changed.mkdir()
    for item in Path(full_model).iterdir():
        if item.is_file() and not item.name.startswith("."):
            (changed / item.name).write_bytes(item.read_bytes())
    tensors = load_file(changed / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"] * 1.5
    save_file(tensors, changed / "model.safetensors", metadata={"format": "pt"})
    meta = ArtifactManifest.read(full_model)
    publish_dir(changed, "model", "ct-full", meta, True, StorageRoot.resolve(str(rayft_home)))

    fresh = ModelEngine("ct-full", storage=str(rayft_home), dtype="float32")
    with pytest.raises(Conflict) as err:
        fresh.check_adapter("ct-parent")
    assert err.value.status == 409 and err.value.code == "base_model_mismatch"
    assert manifest(parent)["base_fingerprint"][:12] in err.value.message
    assert fresh.weights_fingerprint[:12] in err.value.message
