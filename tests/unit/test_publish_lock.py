"""Writers racing on one name or one record: the lock lets one through at a time.

Threads stand in for runs on other machines: the local lock is an ``fcntl`` lock per
open file, so threads of one process exclude each other as processes do.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from publishing import artifact, race

from rayft.trainers.locks import LockTimeout, held
from rayft.trainers.registry import RegistryError, publish_dir, resolve_adapter
from rayft.trainers.storage import StorageRoot


def test_the_lock_lets_one_holder_in_at_a_time(tmp_path: Path) -> None:
    root = StorageRoot.resolve(str(tmp_path))
    inside, most = [0], [0]

    def hold(_: int) -> None:
        for _ in range(5):
            with held(root, "things/one.lock"):
                inside[0] += 1
                most[0] = max(most[0], inside[0])
                time.sleep(0.002)
                inside[0] -= 1

    assert race(4, hold) == [None] * 4
    assert most[0] == 1


def test_a_lock_held_too_long_is_a_timeout_naming_it(tmp_path: Path) -> None:
    root = StorageRoot.resolve(str(tmp_path))
    with held(root, "things/one.lock"):
        [outcome] = race(1, lambda _: held(root, "things/one.lock", wait_s=0.2).__enter__())
    assert isinstance(outcome, LockTimeout) and "one.lock" in str(outcome)


def test_two_runs_publishing_one_name_without_overwrite_one_wins(tmp_path: Path) -> None:
    root = StorageRoot.resolve(str(tmp_path / "root"))
    sources = [artifact(tmp_path, tag) for tag in ("a", "b", "c")]

    def publish(i: int) -> Path:
        return publish_dir(sources[i], "adapter", "shared", {"tag": str(i)}, False, root)

    results = race(3, publish)
    won = [r for r in results if isinstance(r, Path)]
    lost = [r for r in results if isinstance(r, RegistryError)]
    assert len(won) == 1 and len(lost) == 2, results
    assert all("another run published it" in str(err) for err in lost)
    winner = results.index(won[0])
    path = resolve_adapter("shared", root)
    assert json.loads((path / "rayft.json").read_text())["tag"] == str(winner)
    assert (path / "adapter_model.safetensors").read_bytes() == "abc"[winner].encode() * 1000
    assert len(list((root.adapters / ".versions" / "shared").iterdir())) == 1


def test_racing_overwrites_never_leave_the_name_on_a_missing_version(tmp_path: Path) -> None:
    root = StorageRoot.resolve(str(tmp_path / "root"))
    sources = [artifact(tmp_path, tag) for tag in "abcdef"]
    publish_dir(sources[0], "adapter", "shared", {"tag": "0"}, True, root)

    def publish(i: int) -> Path:
        path = publish_dir(sources[i], "adapter", "shared", {"tag": str(i)}, True, root)
        # Right after its own publish, the name still points at a whole version.
        assert (resolve_adapter("shared", root) / "adapter_model.safetensors").is_file()
        return path

    assert all(isinstance(r, Path) for r in race(6, publish))
    path = resolve_adapter("shared", root)
    tag = int(json.loads((path / "rayft.json").read_text())["tag"])
    assert (path / "adapter_model.safetensors").read_bytes() == "abcdef"[tag].encode() * 1000
    assert len(list((root.adapters / ".versions" / "shared").iterdir())) <= 2


@pytest.mark.parametrize("overwrite", [False, True])
def test_publishing_a_taken_name_says_what_to_change(tmp_path: Path, overwrite: bool) -> None:
    root = StorageRoot.resolve(str(tmp_path / "root"))
    publish_dir(artifact(tmp_path, "a"), "adapter", "taken", {"tag": "a"}, False, root)
    if overwrite:
        publish_dir(artifact(tmp_path, "b"), "adapter", "taken", {"tag": "b"}, True, root)
        return
    with pytest.raises(RegistryError, match="output.overwrite=true"):
        publish_dir(artifact(tmp_path, "b"), "adapter", "taken", {"tag": "b"}, False, root)


def test_a_resumed_run_replaces_only_what_its_own_run_published(tmp_path: Path) -> None:
    root = StorageRoot.resolve(str(tmp_path / "root"))
    publish_dir(artifact(tmp_path, "a"), "adapter", "mine", {"run_id": "run-1"}, False, root)
    # The same run, resumed after it published: it replaces its own artifact.
    path = publish_dir(artifact(tmp_path, "b"), "adapter", "mine", {"run_id": "run-1"}, False, root)
    assert (path / "adapter_model.safetensors").read_bytes() == b"b" * 1000
    # Another run that finished second, without output.overwrite: refused, nothing replaced.
    with pytest.raises(RegistryError, match="output.overwrite=true"):
        publish_dir(artifact(tmp_path, "c"), "adapter", "mine", {"run_id": "run-2"}, False, root)
    assert (resolve_adapter("mine", root) / "adapter_model.safetensors").read_bytes() == b"b" * 1000
