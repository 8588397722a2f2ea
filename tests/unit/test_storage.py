"""The storage root, versioned publishing and run records, on local disk."""

from __future__ import annotations

import json
import logging
import os
import pickle
import socket
import time
from pathlib import Path

import pytest

from rayft.trainers.records import (
    INTERRUPTED,
    RUNNING,
    STALE_AFTER_S,
    RunLog,
    live_state,
    read_events,
    read_record,
    summarize,
)
from rayft.trainers.registry import (
    ArtifactManifest,
    ManifestError,
    RegistryError,
    adapter_path,
    artifact_location,
    list_adapters,
    publish_dir,
    remove_artifact,
    resolve_adapter,
)
from rayft.trainers.storage import StorageRoot, filesystem, is_storage_full, is_uri, swap_dir


def unused_pid() -> int:
    """A pid no process holds now, as a driver's pid reads once the driver has exited."""
    pid = int(Path("/proc/sys/kernel/pid_max").read_text()) - 1
    while pid > 1:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            pass
        pid -= 1
    raise RuntimeError("every pid is in use")


def _adapter_files(tmp: Path, tag: str) -> Path:
    src = tmp / f"src-{tag}"
    src.mkdir()
    (src / "adapter_config.json").write_text(json.dumps({"tag": tag}))
    (src / "adapter_model.safetensors").write_bytes(tag.encode() * 10)
    return src


def test_root_resolves_once_and_names_its_places(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("RAYFT_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("RAYFT_MODEL_CACHE", raising=False)
    monkeypatch.delenv("RAYFT_CACHE", raising=False)
    default = StorageRoot.resolve()
    assert default.location == str((tmp_path / "home").resolve()) and not default.is_remote
    assert default.adapters == default.local / "adapters"
    assert default.runs == f"{default.location}/runs" and default.models == default.local / "models"
    assert StorageRoot.resolve(default) is default
    assert StorageRoot.resolve(f"file://{tmp_path}/x").location == str((tmp_path / "x").resolve())

    remote = StorageRoot.resolve("s3://bucket/team/")
    assert remote.uri == "s3://bucket/team" and remote.runs == "s3://bucket/team/runs"
    # A URI root is mirrored under the local cache; base models are cached locally.
    assert remote.local.is_relative_to(tmp_path / "home" / "mirror")
    assert remote.models == (tmp_path / "home" / "models")
    assert remote.url("adapters/a") == "s3://bucket/team/adapters/a"


def test_root_pickles_as_its_location_and_rebuilds_its_mirror(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("RAYFT_HOME", str(tmp_path / "a"))
    root = StorageRoot.resolve("s3://bucket/team")
    data = pickle.dumps(root)
    assert len(data) < 200
    # Another machine (another cache) gets its own mirror of the same URI.
    monkeypatch.setenv("RAYFT_HOME", str(tmp_path / "b"))
    again = pickle.loads(data)
    assert again.location == root.location and again.local.is_relative_to(tmp_path / "b")


def test_one_uri_and_filesystem_primitive(tmp_path: Path) -> None:
    assert is_uri("s3://b/k") and is_uri("gs://b") and not is_uri(f"file://{tmp_path}")
    fs, inner = filesystem(f"file://{tmp_path}/a.jsonl")
    assert inner == f"{tmp_path}/a.jsonl" and type(fs).__name__ == "LocalFileSystem"


def test_swap_dir_switches_a_link_and_keeps_one_previous_version(tmp_path: Path) -> None:
    target = tmp_path / "adapters" / "name"
    versions = tmp_path / "adapters" / ".versions" / "name"
    for tag in ("v1", "v2", "v3"):
        version = versions / tag
        version.mkdir(parents=True)
        (version / "file").write_text(tag)
        swap_dir(version, target)
        assert (target / "file").read_text() == tag and target.is_symlink()
    assert sorted(p.name for p in versions.iterdir()) == ["v2", "v3"]


def test_publish_is_versioned_and_plain_paths_keep_working(tmp_path: Path) -> None:
    root = StorageRoot.resolve(str(tmp_path / "root"))
    first = publish_dir(_adapter_files(tmp_path, "one"), "adapter", "demo", {"m": 1}, False, root)
    assert first == adapter_path("demo", root) and first.is_symlink()
    assert json.loads((first / "adapter_config.json").read_text()) == {"tag": "one"}
    manifest = ArtifactManifest.read(first)
    assert manifest.m == 1 and manifest.name == "demo" and manifest.version
    with pytest.raises(RegistryError, match="already published"):
        publish_dir(_adapter_files(tmp_path, "two"), "adapter", "demo", {}, False, root)
    publish_dir(_adapter_files(tmp_path, "three"), "adapter", "demo", {"m": 3}, True, root)
    assert json.loads((first / "adapter_config.json").read_text()) == {"tag": "three"}
    assert [a.name for a in list_adapters(root)] == ["demo"]
    assert artifact_location("adapter", "demo", root, first) == str(first)
    remove_artifact("adapter", "demo", root)
    assert not first.exists() and not first.is_symlink() and list_adapters(root) == []
    assert not (root.adapters / ".versions" / "demo").exists()


def test_a_corrupt_manifest_hides_only_its_adapter(tmp_path: Path, caplog) -> None:
    root = StorageRoot.resolve(str(tmp_path / "root"))
    for name in ("good", "torn"):
        publish_dir(_adapter_files(tmp_path, name), "adapter", name, {}, False, root)
    manifest = adapter_path("torn", root) / "rayft.json"
    manifest.write_text(manifest.read_text()[:25])  # half-written
    with caplog.at_level(logging.WARNING, logger="rayft.registry"):
        assert [a.name for a in list_adapters(root)] == ["good"]
        assert [a.name for a in list_adapters(root)] == ["good"]
    assert sum("torn" in r.getMessage() for r in caplog.records) == 1  # logged once
    with pytest.raises(ManifestError, match="torn.*rayft.json is corrupt"):
        resolve_adapter("torn", root)
    assert issubclass(ManifestError, RegistryError)
    assert resolve_adapter("good", root) == adapter_path("good", root)


def test_run_log_writes_record_and_events(tmp_path: Path) -> None:
    root = StorageRoot.resolve(str(tmp_path / "root"))
    log = RunLog(root, "r1")
    log.start(run_id="r1", total_steps=4)
    log.progress({"kind": "train", "step": 2, "total_steps": 4, "loss": 1.5})
    log.progress({"kind": "eval", "step": 2, "total_steps": 4, "eval_loss": 1.25})
    log.event("checkpoint", step=2, path="/x/checkpoint_0")
    log.state("finished", metrics={"step": 4})
    events = read_events(root, "r1")
    assert all("time" in e and "type" in e for e in events)
    assert [e["type"] for e in events] == ["state", "train", "eval", "checkpoint", "state"]
    summary = summarize(events)
    assert summary["state"] == "finished" and summary["checkpoint_step"] == 2
    assert summary["metrics"] == {"loss": 1.5, "eval_loss": 1.25} and summary["step"] == 2
    record = read_record(root, "r1")
    assert record["state"] == "finished" and record["pid"] == os.getpid()


def test_a_dead_or_silent_driver_reads_as_interrupted() -> None:
    here = socket.gethostname()
    dead_pid = unused_pid()
    now = time.time()
    alive = {"state": RUNNING, "host": here, "pid": os.getpid(), "heartbeat_at": now}
    assert live_state(alive) == RUNNING
    assert live_state({**alive, "pid": dead_pid}) == INTERRUPTED
    elsewhere = {"state": RUNNING, "host": "other-host", "pid": 1, "heartbeat_at": now}
    assert live_state(elsewhere) == RUNNING
    assert live_state(elsewhere, now=now + STALE_AFTER_S + 1) == INTERRUPTED
    assert live_state({"state": "finished", "pid": dead_pid, "host": here}) == "finished"


def test_jobs_status_and_logs_of_a_run_read_its_storage(tmp_path: Path) -> None:
    from rayft.cluster.jobs import format_view, run_logs, run_view
    from rayft.cluster.submit import SubmitError

    root = StorageRoot.resolve(str(tmp_path / "root"))
    log = RunLog(root, "r2")
    log.start(run_id="r2", total_steps=8)
    log.progress({"kind": "train", "step": 3, "total_steps": 8, "loss": 2.0})
    dead_pid = unused_pid()
    log.update(pid=dead_pid)  # the driver that wrote this record is gone
    view = run_view(root, "r2")
    assert view.state == INTERRUPTED and view.step == 3 and view.total_steps == 8
    text = format_view(view)
    assert "state     interrupted" in text and "rayft train --resume r2" in text
    lines = run_logs(root, "r2").splitlines()
    assert [line.split()[1] for line in lines] == ["state", "train"]
    assert "loss 2" in lines[1]
    with pytest.raises(SubmitError, match="no run 'nope'"):
        run_view(root, "nope")


def test_newest_checkpoint_is_the_newest_with_every_ranks_manifest(tmp_path: Path) -> None:
    from rayft.trainers.checkpoints import manifest_name
    from rayft.trainers.records import newest_checkpoint

    root = StorageRoot.resolve(str(tmp_path / "root"))
    run = root.run("r3")
    for name, step, ranks in (("checkpoint_a", 4, (0, 1)), ("checkpoint_b", 6, (0,))):
        (run / name).mkdir(parents=True)
        (run / name / "trainer_state.json").write_text(json.dumps({"step": step}))
        for rank in ranks:
            manifest = {"rank": rank, "world_size": 2, "step": step, "files": {}}
            (run / name / manifest_name(rank)).write_text(json.dumps(manifest))
    # checkpoint_b misses rank 1's manifest: it was still being written.
    assert newest_checkpoint(root, "r3") == (f"{root.location}/runs/r3/checkpoint_a", 4)
    (run / "checkpoint_b" / manifest_name(1)).write_text(json.dumps({"world_size": 2}))
    assert newest_checkpoint(root, "r3") == (f"{root.location}/runs/r3/checkpoint_b", 6)


def test_a_full_disk_is_told_apart_from_other_errors_here_and_in_a_workers_text() -> None:
    import errno

    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert is_storage_full(full)
    try:
        try:
            raise full
        except OSError as err:
            raise RuntimeError("the checkpoint could not be saved") from err
    except RuntimeError as chained:
        assert is_storage_full(chained)
    # Ray Train's WorkerGroupError carries the worker's traceback as text.
    assert is_storage_full(RuntimeError("SafetensorError: I/O error: No space left on device"))
    assert not is_storage_full(OSError(errno.EACCES, "Permission denied"))
    assert not is_storage_full(RuntimeError("worker 0 lost"))
