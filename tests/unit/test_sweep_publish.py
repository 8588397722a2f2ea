"""A sweep publishes its best trial once, from the export the trial's run left behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rayft.raytune import sweep
from rayft.trainers.config import validate_spec
from rayft.trainers.registry import ArtifactManifest, RegistryError, adapter_path
from rayft.trainers.storage import StorageRoot, run_relpath

SWEEP = "sw"
CHECKPOINT = "checkpoint_000002"


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    from rayft.trainers.models import pull_builtin

    return pull_builtin("tiny-llama", tmp_path_factory.mktemp("models"))


def _export(base_dir: Path, out: Path, seed: int) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_dir),
        LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"),
    )
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=generator)
    model.save_pretrained(out)
    return out


def _finished_trials(root: StorageRoot, spec, base_dir: Path) -> list[dict]:
    """Two trials whose runs exported without publishing, as ``run_training(publish=False)``
    leaves them: the export in the final checkpoint, the manifest next to the run."""
    rows = []
    for index, loss in ((1, 0.5), (0, 0.9)):
        run_id = sweep.trial_run_id(SWEEP, index)
        _export(base_dir, root.path(run_relpath(run_id, CHECKPOINT, "export")), seed=index)
        draft = ArtifactManifest(
            kind="adapter",
            name=sweep.trial_artifact_name("best", index),
            base_model="tiny-llama",
            method="lora",
            run_id=run_id,
            spec=spec.to_dict(),
            metrics={"eval_loss": loss},
        )
        root.write(run_relpath(run_id, "rayft.json"), draft.to_json())
        record = {"index": index, "run_id": run_id, "artifact": None, "checkpoint": CHECKPOINT}
        sweep.write_trial_record(root, SWEEP, f"{index}.json", json.dumps(record))
        rows.append(
            {
                "trial": index,
                "trial_id": f"t_{index}",
                "run_id": run_id,
                "optim.lr": 0.1 * (index + 1),
            }
            | {"eval_loss": loss}
        )
    return rows


def test_the_best_trial_is_published_once_from_its_export(base_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("RAYFT_MODEL_CACHE", str(base_dir.parent))
    root = StorageRoot.resolve(str(tmp_path / "home"))
    spec = validate_spec(
        {
            "model": {"name": "tiny-llama"},
            "data": {"train": "unused.jsonl"},
            "output": {"name": "best"},
            "storage": root.location,
            "tune": {"search_space": {"optim.lr": {"grid": [0.1, 0.2]}}},
        }
    )
    rows = _finished_trials(root, spec, base_dir)

    artifact, kept = sweep._publish(spec, root, SWEEP, "adapter", "best", rows[0], rows)

    assert artifact == adapter_path("best", root) and kept == []
    export = root.path(run_relpath(rows[0]["run_id"], CHECKPOINT, "export"))
    weights = "adapter_model.safetensors"
    assert (artifact / weights).read_bytes() == (export / weights).read_bytes()
    manifest = ArtifactManifest.read(artifact)
    assert manifest.name == "best" and manifest.run_id == rows[0]["run_id"]
    assert manifest.sweep.id == SWEEP and manifest.sweep.trial == 1
    assert manifest.sweep.params == {"optim.lr": 0.2} and manifest.sweep.best_trial == 1
    assert len(manifest.base_fingerprint) == 64  # checked on the base before publishing
    # No trial was published, and a second finish (a resumed sweep) publishes nothing new.
    assert not any(adapter_path(f"best-trial-{k}", root).exists() for k in (0, 1))
    versions = root.adapters / ".versions" / "best"
    assert len(list(versions.iterdir())) == 1
    assert sweep._publish(spec, root, SWEEP, "adapter", "best", rows[0], rows)[0] == artifact
    assert [p.name for p in versions.iterdir()] == [manifest.version]

    # A best trial whose run left no manifest cannot be published, and says where it looked.
    (root.path(run_relpath(rows[1]["run_id"], "rayft.json"))).unlink()
    with pytest.raises(RegistryError, match=r"best trial 0 of sweep sw .*sw-trial-0/rayft\.json"):
        sweep._publish(spec, root, SWEEP, "adapter", "best", rows[1], rows)
