"""Checkpoint manifests: written last, and a checkpoint verifies only when intact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rayft.trainers.checkpoints import (
    Refusal,
    file_sha256,
    manifest_name,
    verify_checkpoint,
    write_manifest,
)


def two_rank_checkpoint(root: Path) -> Path:
    """What two workers write into one checkpoint: shared names, per-rank optimizer shards."""
    ckpt = root / "checkpoint_2026-12-01_10-00-00.000000"
    (ckpt / "state").mkdir(parents=True)
    (ckpt / "state" / "mp_rank_00_model_states.pt").write_bytes(b"model" * 100)
    (ckpt / "state" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"opt0" * 50)
    (ckpt / "trainer_state.json").write_text('{"step": 4}')
    write_manifest(ckpt, rank=0, world_size=2, step=4)
    # Rank 1 writes its own directory; Ray Train merges both into one in storage.
    other = root / "rank1"
    (other / "state").mkdir(parents=True)
    (other / "state" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"opt1" * 50)
    write_manifest(other, rank=1, world_size=2, step=4)
    for path in other.rglob("*"):
        if path.is_file():
            target = ckpt / path.relative_to(other)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    return ckpt


def test_manifest_lists_every_file_of_its_rank_with_size_and_sha256(tmp_path):
    ckpt = two_rank_checkpoint(tmp_path)
    manifest = json.loads((ckpt / manifest_name(0)).read_text())
    assert manifest["rank"] == 0 and manifest["world_size"] == 2 and manifest["step"] == 4
    model = ckpt / "state" / "mp_rank_00_model_states.pt"
    assert manifest["files"]["state/mp_rank_00_model_states.pt"] == {
        "size": 500,
        "sha256": file_sha256(model),
    }
    assert sorted(manifest["files"]) == [
        "state/mp_rank_00_model_states.pt",
        "state/zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "trainer_state.json",
    ]
    assert verify_checkpoint(ckpt) == []


def test_truncated_file_is_refused_with_its_name_and_sizes(tmp_path):
    ckpt = two_rank_checkpoint(tmp_path)
    shard = ckpt / "state" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    shard.write_bytes(shard.read_bytes()[:37])
    assert verify_checkpoint(ckpt) == [
        "state/zero_pp_rank_1_mp_rank_00_optim_states.pt has 37 bytes, 200 were written"
    ]


def test_flipped_byte_is_refused(tmp_path):
    ckpt = two_rank_checkpoint(tmp_path)
    model = ckpt / "state" / "mp_rank_00_model_states.pt"
    data = bytearray(model.read_bytes())
    data[123] ^= 0x01
    model.write_bytes(bytes(data))
    assert verify_checkpoint(ckpt) == [
        "state/mp_rank_00_model_states.pt has a different sha256 than was written"
    ]


def test_missing_rank_manifest_missing_file_and_stray_file_are_refused(tmp_path):
    ckpt = two_rank_checkpoint(tmp_path)
    (ckpt / manifest_name(1)).unlink()
    (ckpt / "trainer_state.json").unlink()
    (ckpt / "state" / "extra.pkl").write_bytes(b"not written by the run")
    problems = verify_checkpoint(ckpt)
    assert "the manifest of rank(s) [1] is missing (an incomplete save)" in problems
    assert "trainer_state.json is missing" in problems
    assert "state/extra.pkl is in no manifest" in problems
    # Rank 1's shard is now listed by no manifest either.
    assert "state/zero_pp_rank_1_mp_rank_00_optim_states.pt is in no manifest" in problems


def test_checkpoint_without_manifest_or_with_a_torn_one_is_refused(tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "trainer_state.json").write_text("{}")
    assert verify_checkpoint(bare) == [
        "it has no manifest (written before verification existed, or incomplete)"
    ]
    ckpt = two_rank_checkpoint(tmp_path / "torn")
    (ckpt / manifest_name(0)).write_text('{"files": {"state/mp_')
    problems = verify_checkpoint(ckpt)
    assert problems[0] == f"{manifest_name(0)} is unreadable (JSONDecodeError)"
    assert verify_checkpoint(tmp_path / "nowhere") == [f"{tmp_path / 'nowhere'} is not a directory"]


def test_refusal_names_the_checkpoint_and_the_first_problems():
    refusal = Refusal("checkpoint_x", ("a", "b", "c", "d", "e"))
    assert str(refusal) == "checkpoint checkpoint_x refused: a; b; c (+2 more)"


@pytest.mark.parametrize(
    ("failure", "line"),
    [
        ({"lost": [1], "failed": {0: "RuntimeError: gloo"}}, "worker 1 lost"),
        ({"lost": [0, 1], "failed": {}}, "workers 0, 1 lost"),
        ({"lost": [], "failed": {1: "ValueError: boom"}}, "worker 1 failed (ValueError: boom)"),
        (None, "the worker group failed"),
    ],
)
def test_restart_notice_is_one_line_per_restart(failure, line):
    from rayft.trainers.restarts import Notices

    printed: list[str] = []
    notices = Notices(printed.append)
    records = [
        {"kind": "worker_start", "step": 0},
        {"kind": "train", "step": 1},
        *([{"kind": "worker_lost", **failure}] if failure else []),
        {"kind": "worker_start", "step": 4},
        {"kind": "checkpoint_refused", "checkpoint": "checkpoint_b", "problems": ["x is missing"]},
    ]
    assert notices.take(records) == [{"kind": "train", "step": 1}]
    assert printed == [
        f"[rayft] {line}, restarting from step 4",
        "[rayft] checkpoint checkpoint_b refused: x is missing; "
        "resuming from the previous complete one",
    ]
    assert notices.restarts == 1


def test_lost_ranks_from_a_dead_worker_or_from_its_peers_errors():
    from rayft.trainers.restarts import lost_ranks

    gloo = RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]")
    assert lost_ranks({0: gloo, 1: OSError("gone")}, 2, died={1}) == [1]
    # The survivor's collective failed before the controller saw the death.
    assert lost_ranks({0: gloo}, 2, died=set()) == [1]
    assert lost_ranks({0: gloo, 2: gloo}, 4, died=set()) == [1, 3]
    # A bug in the training code loses no worker.
    assert lost_ranks({1: ValueError("bad batch")}, 2, died=set()) == []
