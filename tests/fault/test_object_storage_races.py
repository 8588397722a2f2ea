"""Object storage (a real S3 API server, moto, on loopback): deletes, racing writers, crashed holders.

Threads stand in for writers on other machines; each writer's lock entry is an object
under the lock's prefix, as it would be from another host.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import s3_server
from publishing import artifact, race

from rayft.cluster.files_service import FileStore
from rayft.serving.errors import NotFound
from rayft.trainers import locks, registry
from rayft.trainers.registry import RegistryError, publish_dir, resolve_adapter
from rayft.trainers.storage import StorageRoot

pytestmark = pytest.mark.fault

ROWS = b'{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": "d"}\n'


@pytest.fixture(scope="module")
def bucket() -> Iterator[str]:
    with s3_server("races"):
        yield "s3://races"


@pytest.fixture
def root(bucket: str, request: pytest.FixtureRequest, tmp_path: Path, monkeypatch) -> StorageRoot:
    monkeypatch.setenv("RAYFT_CACHE", str(tmp_path / "cache"))
    return StorageRoot.resolve(f"{bucket}/{request.node.name.replace('[', '-').strip(']')}")


def remote_files(root: StorageRoot, relpath: str) -> list[str]:
    import pyarrow.fs as pafs

    fs, path = root.remote(relpath)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    return sorted(i.path[len(path) :] for i in infos if i.type == pafs.FileType.File)


def test_deleting_an_uploaded_file_removes_it_from_object_storage(root, tmp_path, monkeypatch):
    store = FileStore(root, max_bytes=1 << 20)
    record = store.create("train.jsonl", "fine-tune", io.BytesIO(ROWS))
    assert store.content(record["id"]).read_bytes() == ROWS
    assert store.delete(record["id"])["deleted"] is True
    # This machine and one that never saw the file: not listed, not readable.
    monkeypatch.setenv("RAYFT_CACHE", str(tmp_path / "other-machine"))
    for seen_by in (store, FileStore(StorageRoot.resolve(root.location), 1 << 20)):
        assert seen_by.list() == []
        with pytest.raises(NotFound):
            seen_by.content(record["id"])
    assert remote_files(root, "datasets") == []


def test_the_object_storage_lock_lets_one_holder_in_at_a_time(root):
    inside, most = [0], [0]

    def hold(_: int) -> None:
        for _ in range(3):
            with locks.held(root, "things/one.lock"):
                inside[0] += 1
                most[0] = max(most[0], inside[0])
                time.sleep(0.01)
                inside[0] -= 1

    assert race(3, hold) == [None] * 3
    assert most[0] == 1
    assert remote_files(root, "things/one.lock") == []  # every entry removed on release


def test_two_publishers_of_one_name_on_object_storage_one_wins(root, tmp_path):
    sources = [artifact(tmp_path, tag) for tag in "ab"]
    results = race(
        2, lambda i: publish_dir(sources[i], "adapter", "s", {"tag": str(i)}, False, root)
    )
    lost = [r for r in results if isinstance(r, RegistryError)]
    assert len(lost) == 1 and "another run published it" in str(lost[0]), results
    winner = next(i for i, r in enumerate(results) if isinstance(r, Path))
    registry._synced.clear()
    path = resolve_adapter("s", root)
    assert (path / "adapter_model.safetensors").read_bytes() == "ab"[winner].encode() * 1000
    assert len(root.list_dirs("adapters/.versions/s")) == 1


def test_racing_overwrites_on_object_storage_keep_the_pointed_version(root, tmp_path):
    sources = [artifact(tmp_path, tag) for tag in "abcd"]
    publish_dir(sources[0], "adapter", "s", {"tag": "0"}, True, root)
    results = race(
        4, lambda i: publish_dir(sources[i], "adapter", "s", {"tag": str(i)}, True, root)
    )
    assert all(isinstance(r, Path) for r in results), results
    pointer = json.loads(root.read("adapters/s/rayft.json"))
    versions = root.list_dirs("adapters/.versions/s")
    assert pointer["version"] in versions and len(versions) <= 2
    files = remote_files(root, f"adapters/.versions/s/{pointer['version']}")
    assert files == ["/adapter_config.json", "/adapter_model.safetensors", "/rayft.json"]


def test_a_lock_left_by_a_crashed_holder_is_taken_over(root, monkeypatch):
    fs, prefix = root.remote("things/crashed.lock")
    dead = {"host": "another-host", "pid": 1, "time": time.time() - locks.LEASE_S - 1}
    with fs.open_output_stream(f"{prefix}/00000000000000000001-dead") as out:
        out.write(json.dumps(dead).encode())
    started = time.monotonic()
    with locks.held(root, "things/crashed.lock", wait_s=5):
        assert time.monotonic() - started < 5
    assert remote_files(root, "things/crashed.lock") == []
    # A live holder elsewhere is waited for, then named.
    live = {"host": "another-host", "pid": 1, "time": time.time()}
    with fs.open_output_stream(f"{prefix}/00000000000000000002-live") as out:
        out.write(json.dumps(live).encode())
    with pytest.raises(locks.LockTimeout, match="crashed.lock"):
        with locks.held(root, "things/crashed.lock", wait_s=0.3):
            pass


def test_the_request_log_uploads_new_lines_only_in_the_background(root):
    from rayft.serving.request_log import RequestLog, RequestRecord

    def line(i: int) -> RequestRecord:
        return RequestRecord(f"r{i}", route="/v1/completions", model="m", status=200)

    quiet = RequestLog(root, "quiet", upload_every_s=3600)
    quiet.write(line(0))
    assert remote_files(root, "request_logs") == []  # a write never uploads
    quiet.close()
    assert len(remote_files(root, "request_logs")) == 1  # close uploads what is left

    log = RequestLog(root, "busy", upload_every_s=0.05)
    for batch in (range(0, 3), range(3, 5)):
        for i in batch:
            log.write(line(i))
        deadline = time.monotonic() + 10
        while uploaded_ids(root, "busy")[-1:] != [f"r{batch[-1]}"]:
            assert time.monotonic() < deadline, "the background upload did not come"
            time.sleep(0.05)
    log.close()
    assert uploaded_ids(root, "busy") == [f"r{i}" for i in range(5)]  # each line once, in order
    restarted = RequestLog(root, "busy", upload_every_s=3600)  # same name, same machine
    restarted.write(line(5))
    restarted.close()
    assert uploaded_ids(root, "busy") == [f"r{i}" for i in range(6)]
    parts = [p for p in remote_files(root, "request_logs") if "/busy.parts/" in p]
    assert len(parts) >= 2  # later lines went up as new objects, not the file again


def uploaded_ids(root: StorageRoot, writer: str) -> list[str]:
    parts = [p for p in remote_files(root, "request_logs") if f"/{writer}.parts/" in p]
    return [json.loads(line)["request_id"] for p in parts for line in _read(root, p)]


def _read(root: StorageRoot, path: str) -> list[bytes]:
    return root.read(f"request_logs{path}").splitlines()


def test_request_log_days_past_retention_are_deleted_from_object_storage(root):
    from rayft.serving.request_log import RequestLog

    for day in ("2026-01-01", "2026-11-30", "2026-12-01"):
        root.upload(f"request_logs/{day}/other.parts/000000000000000.jsonl", b"{}\n")
    log = RequestLog(root, "pruner", retention_days=2)
    now = time.mktime((2026, 12, 1, 12, 0, 0, 0, 0, 0))
    assert log.prune(now=now) == ["2026-01-01"]
    assert root.list_dirs("request_logs") == ["2026-11-30", "2026-12-01"]
