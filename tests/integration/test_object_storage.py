"""``storage: s3://...``: runs, checkpoints and published adapters live in object storage.

A real S3 API server (moto's standalone server) listens on 127.0.0.1; pyarrow, Ray
Train and rayft reach it through ``AWS_ENDPOINT_URL`` exactly as they would reach S3.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from harness import s3_server

from rayft.trainers.config import validate_spec

pytestmark = pytest.mark.slow

BUCKET = "rayft-test"
ROOT = f"s3://{BUCKET}/team"


@pytest.fixture(scope="module")
def s3_root(rayft_home: Path) -> Iterator[str]:
    """An S3 endpoint on loopback with an empty bucket, and a Ray cluster that can reach it."""
    import ray

    from rayft.cluster.connect import connect

    with s3_server(BUCKET):
        connect(None)  # Ray's processes inherit the endpoint and credentials
        try:
            yield ROOT
        finally:
            ray.shutdown()


def remote_files(prefix: str) -> dict[str, bytes]:
    """Every object under ``s3://BUCKET/<prefix>``, keyed by the path below the prefix."""
    from rayft.trainers.storage import StorageRoot

    local = Path(f"/tmp/rayft-s3-listing-{abs(hash(prefix))}")
    shutil.rmtree(local, ignore_errors=True)
    StorageRoot.resolve(ROOT).download_dir(prefix, local)
    out = {str(p.relative_to(local)): p.read_bytes() for p in local.rglob("*") if p.is_file()}
    shutil.rmtree(local, ignore_errors=True)
    return out


def test_run_checkpoints_and_adapter_live_in_object_storage(
    s3_root, rayft_home, tiny_model_dir, tiny_spec
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from rayft.cluster.jobs import read_run
    from rayft.trainers.driver import load_run_spec, run_training
    from rayft.trainers.registry import RegistryError, check_publishable, list_adapters
    from rayft.trainers.storage import StorageRoot

    spec = validate_spec(
        tiny_spec(
            data={"format": "chat", "max_seq_len": 64},
            method="lora",
            lora={"r": 4, "alpha": 8, "dropout": 0.0},
            optim={
                "lr": 3e-3,
                "max_steps": 4,
                "batch_size": 4,
                "scheduler": "constant",
                "warmup_ratio": 0.0,
            },
            scaling={"num_workers": 1},
            checkpoint={"every_steps": 2, "keep": 2},
            output={"name": "colors-s3"},
            storage=s3_root,
        )
    )
    outcome = run_training(spec, show_progress=False)

    # The run's record, spec and checkpoints are in the bucket, not under RAYFT_HOME.
    run_files = remote_files(f"runs/{outcome.run_id}")
    record = json.loads(run_files["rayft_run.json"])
    assert record["state"] == "finished"
    assert record["artifact"] == f"{s3_root}/adapters/colors-s3"
    assert "spec.yaml" in run_files
    assert any(
        name.startswith("checkpoint_") and name.endswith("trainer_state.json") for name in run_files
    )
    assert not (rayft_home / "runs" / outcome.run_id).exists()
    assert str(outcome.checkpoint_path).startswith(f"{BUCKET}/team/runs/{outcome.run_id}/")

    # The published adapter is in the bucket, manifest included: the manifest at
    # adapters/<name>/ names the version prefix holding the files.
    pointer = json.loads(remote_files("adapters/colors-s3")["rayft.json"])
    adapter_files = remote_files(f"adapters/.versions/colors-s3/{pointer['version']}")
    assert {"adapter_model.safetensors", "adapter_config.json", "rayft.json"} <= set(adapter_files)
    assert json.loads(adapter_files["rayft.json"])["run_id"] == outcome.run_id
    assert pointer["run_id"] == outcome.run_id

    # The run's events are in the bucket too.
    events = [json.loads(line) for line in run_files["events.jsonl"].decode().splitlines()]
    assert [e["state"] for e in events if e["type"] == "state"] == ["running", "finished"]
    assert [e["step"] for e in events if e["type"] == "checkpoint"] == [2, 4]

    # A machine that has never seen the run finds everything through the URI.
    root = StorageRoot.resolve(s3_root)
    shutil.rmtree(root.local)
    assert [a.name for a in list_adapters(root)] == ["colors-s3"]
    assert load_run_spec(outcome.run_id, root).optim.max_steps == 4
    status = read_run(root, outcome.run_id)
    assert status["record"]["state"] == "finished" and status["checkpoint_step"] == 4
    with pytest.raises(RegistryError, match=f"{s3_root}/adapters/colors-s3"):
        check_publishable("adapter", "colors-s3", overwrite=False, root=root)

    # The serving engine loads the adapter from the bucket and matches plain PEFT.
    from rayft.serving.engine import GenerationRequest, ModelEngine, SamplingParams
    from rayft.serving.errors import NotFound

    engine = ModelEngine("tiny-llama", storage=s3_root, max_loaded_adapters=2, dtype="float32")
    prompt = tuple(engine.tokenizer("name a red thing")["input_ids"])
    [served] = engine.generate(
        [GenerationRequest(prompt, "colors-s3", SamplingParams(max_tokens=6, temperature=0))]
    )
    mirror = root.adapters / "colors-s3"
    assert (mirror / "adapter_model.safetensors").is_file()
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), mirror)
    with torch.inference_mode():
        want = (
            peft.eval()
            .generate(
                torch.tensor([prompt]),
                max_new_tokens=6,
                do_sample=False,
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            )[0, len(prompt) :]
            .tolist()
        )
    assert served.token_ids == want[: len(served.token_ids)] and served.token_ids

    # Unpublished at the URI: the mirror's copy is not served any more.
    from rayft.trainers.registry import remove_artifact

    remove_artifact("adapter", "colors-s3", root)
    assert list_adapters(root) == []
    with pytest.raises(NotFound):
        engine.check_adapter("colors-s3")


def test_evaluation_datasets_are_read_from_object_storage(s3_root):
    from rayft.serving.errors import NotFound
    from rayft.serving.evaluation import dataset_path, read_rows
    from rayft.trainers.storage import StorageRoot

    root = StorageRoot.resolve(s3_root)
    rows = [{"prompt": "name a red thing", "completion": "the apple is red"}]
    root.upload("datasets/colors-eval.jsonl", json.dumps(rows[0]).encode() + b"\n")
    path = dataset_path("colors-eval", root)
    assert path == (root.files / "colors-eval.jsonl").resolve()
    assert read_rows(path) == rows

    # A changed dataset is read again; one removed from the bucket is gone.
    rows.append({"prompt": "name a blue thing", "completion": "the sky is blue"})
    root.upload(
        "datasets/colors-eval.jsonl",
        b"".join(json.dumps(r).encode() + b"\n" for r in rows),
    )
    assert read_rows(dataset_path("colors-eval", root)) == rows
    root.delete("datasets")
    with pytest.raises(NotFound, match="colors-eval"):
        dataset_path("colors-eval", root)
    assert not path.exists()


def test_sweep_records_results_and_adapters_live_in_object_storage(
    s3_root, tmp_path, tiny_spec, color_chats
):
    from rayft.cluster.jobs import read_sweep
    from rayft.raytune.sweep import read_trial_record, run_sweep
    from rayft.trainers.registry import ArtifactManifest, sync_artifact
    from rayft.trainers.storage import StorageRoot

    data = color_chats(tmp_path / "colors.jsonl", 36, colors=3)
    spec = validate_spec(
        tiny_spec(
            data,
            data={"format": "chat", "max_seq_len": 64, "eval_fraction": 0.2},
            lora={"r": 4, "alpha": 8, "dropout": 0.0},
            optim={
                "max_steps": 4,
                "batch_size": 4,
                "scheduler": "constant",
                "warmup_ratio": 0.0,
            },
            scaling={"num_workers": 1},
            eval={"every_steps": 2, "at_start": False},
            checkpoint={"every_steps": 2, "keep": 1},
            output={"name": "colors-sweep-s3"},
            storage=s3_root,
            tune={
                "search_space": {"optim.lr": {"grid": [3e-3, 1e-2]}},
                "scheduler": {"type": "none"},
                "max_concurrent_trials": 1,
            },
        )
    )
    outcome = run_sweep(spec, sweep_id="s3-sweep", show_progress=False)
    assert [r["state"] for r in outcome.rows] == ["finished", "finished"]

    # Results, the trials' records and their runs are in the bucket.
    files = remote_files("sweeps/s3-sweep")
    assert {"results.csv", "results.json", "metric_vs_step.png", "sweep.yaml"} <= set(files)
    for k in (0, 1):
        record = json.loads(files[f"trials/{k}.json"])
        assert record["run_id"] == f"s3-sweep-trial-{k}"
        # Trials publish nothing unless tune.publish_all: the best is published once.
        assert record["artifact"] is None
        [start] = files[f"trials/{k}.starts.jsonl"].decode().splitlines()
        assert json.loads(start)["run_id"] == f"s3-sweep-trial-{k}"
        run_files = remote_files(f"runs/s3-sweep-trial-{k}")
        # Each run records its workers' placement groups, for the one clean-up of runs.
        groups = run_files["placement_groups"].decode().split()
        assert groups and all(int(g, 16) for g in groups)
        assert "spec.yaml" in run_files

    published = {key.split("/")[0] for key in remote_files("adapters")}
    assert not {n for n in published if "-trial-" in n}, published

    # Another machine (no local mirror) reads the sweep and its best adapter from the URI.
    root = StorageRoot.resolve(s3_root)
    shutil.rmtree(root.local)
    assert read_sweep(root, "s3-sweep")["best"]["trial"] == outcome.best["trial"]
    assert read_trial_record(root, "s3-sweep", "1.starts.jsonl").count("\n") == 1
    best = sync_artifact("adapter", "colors-sweep-s3", root)
    assert ArtifactManifest.read(best).sweep.trial == outcome.best["trial"]
