"""``rayft.json`` as one typed model, and the storage layout's named paths."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rayft.trainers.registry import (
    ArtifactManifest,
    ManifestError,
    ParentRecord,
    RegistryError,
    SweepNote,
    publish_dir,
)
from rayft.trainers.storage import (
    StorageRoot,
    artifact_manifest_relpath,
    artifact_relpath,
    artifact_version_relpath,
    artifact_versions_relpath,
    dataset_relpath,
    file_record_relpath,
    job_dataset_relpath,
    job_relpath,
    registry_folder,
    request_log_relpath,
    run_relpath,
    sweep_relpath,
)

# What a DPO adapter's rayft.json held before versions, fingerprints and objective:
# publish_dir wrote kind/name/published_at around the driver's fields, and the
# objective was spelled ``method: dpo``.
OLD_DPO_ADAPTER = {
    "kind": "adapter",
    "name": "prefs",
    "published_at": 1718000000.5,
    "base_model": "tiny-llama",
    "base_model_path": "/home/u/.rayft/models/tiny-llama",
    "method": "dpo",
    "run_id": "prefs-20240610-101010-ab12",
    "spec": {"model": {"name": "tiny-llama"}, "method": "dpo", "dpo": {"weights": "lora"}},
    "dataset_sha256": "d" * 64,
    "datasets": [{"source": "prefs.jsonl", "rows": 12}],
    "metrics": {"eval_loss": 0.69, "step": 6},
    "steps": 6,
    "stopped_early": False,
    "history": [{"kind": "train", "step": 1, "loss": 0.7}],
    "parent_adapter": None,
}


def _artifact(tmp_path: Path, manifest: dict | bytes, files: tuple[str, ...] = ()) -> Path:
    folder = tmp_path / "artifact"
    folder.mkdir()
    for name in files:
        (folder / name).write_text("{}")
    raw = manifest if isinstance(manifest, bytes) else json.dumps(manifest).encode()
    (folder / "rayft.json").write_bytes(raw)
    return folder


def test_an_artifact_published_in_the_old_shape_still_loads(tmp_path: Path) -> None:
    manifest = ArtifactManifest.read(_artifact(tmp_path, OLD_DPO_ADAPTER))
    assert manifest.kind == "adapter" and manifest.name == "prefs"
    assert manifest.version is None and manifest.stamp == 1718000000.5
    # ``method: dpo`` was the objective; the weights it trained are dpo.weights.
    assert manifest.objective == "dpo" and manifest.method == "lora"
    assert manifest.base_model == "tiny-llama" and manifest.base_fingerprint is None
    assert manifest.parent_adapter is None and manifest.metrics["eval_loss"] == 0.69
    assert manifest.is_classifier is False


@pytest.mark.parametrize(
    ("fields", "objective"),
    [
        ({"spec": {"objective": "classification", "method": "lora"}}, "classification"),
        ({"task": "classification", "method": "full"}, "classification"),
        ({"method": "lora", "task": "causal_lm"}, "sft"),
        ({"spec": {"method": "dpo", "dpo": {"weights": "full"}}}, "dpo"),
        ({"base_model": "tiny-llama"}, None),  # nothing says how it was trained
    ],
)
def test_objective_comes_from_the_spec_else_from_older_fields(fields, objective) -> None:
    assert ArtifactManifest(kind="adapter", **fields).objective == objective


def test_write_and_read_round_trip(tmp_path: Path) -> None:
    grand = ParentRecord(name="g", version="0001-aa", metrics={"eval_loss": 2.0})
    manifest = ArtifactManifest(
        kind="adapter",
        name="child",
        version="0002-bb",
        published_at=1.5,
        base_model="tiny-llama",
        base_fingerprint="f" * 64,
        objective="classification",
        method="lora",
        labels=["neg", "pos"],
        parent_adapter=ParentRecord(name="p", version="0001-cc", parent_adapter=grand),
        spec={"optim": {"lr": 0.001}},
        dataset_sha256="a" * 64,
        metrics={"eval_loss": 1.25, "final": True},
        sweep=SweepNote(id="s1", trial=3, params={"optim.lr": 0.001}, value=1.25),
    )
    path = manifest.write(tmp_path)
    assert path == tmp_path / "rayft.json"
    on_disk = json.loads(path.read_text())
    assert on_disk["parent_adapter"]["parent_adapter"]["name"] == "g"
    assert "general" not in on_disk  # unset fields are left out, as before
    again = ArtifactManifest.read(tmp_path)
    assert again == manifest
    assert ArtifactManifest.read(path) == manifest  # the file itself works too
    assert again.parent_adapter.parent_adapter.version == "0001-aa"
    assert again.sweep.trial == 3 and again.is_classifier is True


def test_unknown_fields_are_kept_through_a_rewrite(tmp_path: Path) -> None:
    old = {**OLD_DPO_ADAPTER, "tag": "old", "trained_by": {"host": "gpu-7"}}
    manifest = ArtifactManifest.read(_artifact(tmp_path, old))
    assert manifest.tag == "old"
    manifest.sweep = SweepNote(id="s", trial=0)
    manifest.write(tmp_path / "artifact")
    rewritten = json.loads((tmp_path / "artifact" / "rayft.json").read_text())
    assert rewritten["tag"] == "old" and rewritten["trained_by"] == {"host": "gpu-7"}
    assert rewritten["sweep"]["id"] == "s"


def test_a_missing_kind_is_taken_from_the_files_else_refused_naming_the_file(
    tmp_path: Path,
) -> None:
    hand_made = _artifact(tmp_path, {"tag": "old"}, files=("adapter_config.json",))
    assert ArtifactManifest.read(hand_made).kind == "adapter"
    (hand_made / "adapter_config.json").unlink()
    with pytest.raises(RegistryError, match=r"artifact/rayft\.json .*kind: field required"):
        ArtifactManifest.read(hand_made)


def test_wrong_types_and_torn_files_are_manifest_errors_naming_the_file(tmp_path: Path) -> None:
    folder = _artifact(tmp_path, {"kind": "adapter", "steps": "many"})
    with pytest.raises(ManifestError, match=r"artifact/rayft\.json .*steps"):
        ArtifactManifest.read(folder)
    (folder / "rayft.json").write_bytes(b'{"kind": "adap')
    with pytest.raises(ManifestError, match=r"artifact/rayft\.json is corrupt"):
        ArtifactManifest.read(folder)
    (folder / "rayft.json").unlink()
    assert ArtifactManifest.find(folder) is None
    with pytest.raises(ManifestError, match=r"artifact/rayft\.json is missing"):
        ArtifactManifest.read(folder)


def test_publish_takes_a_typed_manifest_and_sets_what_publishing_decides(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "adapter_config.json").write_text("{}")
    (src / "rayft.json").write_text('{"kind": "adapter", "name": "stale"}')
    draft = ArtifactManifest(kind="adapter", name="trial-3", method="lora", base_model="b")
    path = publish_dir(
        src, "adapter", "best", draft, False, StorageRoot.resolve(str(tmp_path / "root"))
    )
    published = ArtifactManifest.read(path)
    assert published.name == "best" and published.version and published.published_at
    assert published.method == "lora" and published.objective == "sft"
    assert draft.name == "trial-3" and draft.version is None  # the draft is not changed


def test_storage_paths_have_one_spelling(tmp_path: Path) -> None:
    assert registry_folder("adapter") == "adapters" and registry_folder("model") == "models"
    assert artifact_relpath("adapter", "a") == "adapters/a"
    assert artifact_relpath("model", "m") == "models/m"
    assert artifact_manifest_relpath("adapter", "a") == "adapters/a/rayft.json"
    assert artifact_versions_relpath("model", "m") == "models/.versions/m"
    assert artifact_version_relpath("adapter", "a", "v1") == "adapters/.versions/a/v1"
    assert run_relpath("r1") == "runs/r1"
    assert run_relpath("r1", "checkpoint_000001", "export") == "runs/r1/checkpoint_000001/export"
    assert sweep_relpath("s1", "trials", "0.json") == "sweeps/s1/trials/0.json"
    assert dataset_relpath("file-1.jsonl") == "datasets/file-1.jsonl"
    assert file_record_relpath("file-1") == "datasets/.files/file-1.json"
    assert job_dataset_relpath("k", "d.jsonl") == "datasets/jobs/k/d.jsonl"
    assert job_relpath("ftjob-1") == "fine_tuning/jobs/ftjob-1.json"
    assert job_relpath("ftjob-1", ".placement_group") == "fine_tuning/jobs/ftjob-1.placement_group"
    assert request_log_relpath("2026-01-02", "w") == "request_logs/2026-01-02/w.jsonl"

    root = StorageRoot.resolve(str(tmp_path / "root"))
    local = root.local
    assert root.adapter_dir("a") == local / "adapters" / "a" == root.artifact_dir("adapter", "a")
    assert root.artifact_dir("model", "m") == root.models / "m"
    assert root.run_dir("r1") == local / "runs" / "r1" == root.run("r1")
    assert root.sweep_dir("s1") == local / "sweeps" / "s1"
    assert root.url(run_relpath("r1", "events.jsonl")) == f"{local}/runs/r1/events.jsonl"
    remote = StorageRoot.resolve("s3://bucket/team")
    assert remote.url(artifact_manifest_relpath("adapter", "a")) == (
        "s3://bucket/team/adapters/a/rayft.json"
    )
