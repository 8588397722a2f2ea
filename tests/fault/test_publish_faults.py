"""A publish killed at each of its steps: readers find the old adapter whole, or the new one.

Each fault is a real crash: a child process publishes a new version of an adapter and
is killed (``os._exit``, no cleanup runs) right before or after one step of the
publish. The parent then reads and loads the name as a user and the server would:
``resolve_adapter``/``list_adapters`` and ``peft.PeftModel.from_pretrained``. On an
object-storage root (a real S3 API server, moto, on loopback) the reader is also a
machine that has never seen the adapter (an empty mirror).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import s3_server

from rayft.trainers import registry
from rayft.trainers.registry import list_adapters, publish_dir, resolve_adapter
from rayft.trainers.storage import StorageRoot

pytestmark = pytest.mark.fault

NAME = "colors"
CRASHED = 17

# The child: patch one callable so the process dies before/after its n-th call, publish.
CHILD = f"""
import importlib, os, sys
from pathlib import Path
target, when, nth, src, root, tag = sys.argv[1:7]
module_name, attr_path = target.split(":")
owner = importlib.import_module(module_name)
*parents, attr = attr_path.split(".")
for part in parents:
    owner = getattr(owner, part)
original = getattr(owner, attr)
calls = [0]
def crashing(*args, **kwargs):
    calls[0] += 1
    if when == "before" and calls[0] == int(nth):
        os._exit({CRASHED})
    result = original(*args, **kwargs)
    if when == "after" and calls[0] == int(nth):
        os._exit({CRASHED})
    return result
setattr(owner, attr, crashing)
from rayft.trainers.registry import publish_dir
from rayft.trainers.storage import StorageRoot
publish_dir(Path(src), "adapter", "{NAME}", {{"tag": tag}}, True, StorageRoot.resolve(root))
"""


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_model_dir: Path) -> dict[str, Path]:
    """Two real LoRA adapters of tiny-llama with different weights, by tag."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = {}
    base_dir = tmp_path_factory.mktemp("adapters")
    for seed, tag in enumerate(("old", "new")):
        torch.manual_seed(seed)
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        config = LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)
        get_peft_model(base, config).save_pretrained(base_dir / tag)
        out[tag] = base_dir / tag
    return out


def _sha(path: Path) -> str:
    return hashlib.sha256((path / "adapter_model.safetensors").read_bytes()).hexdigest()


def crash_publish(target: str, when: str, nth: int, src: Path, root: str, tag: str) -> int:
    args = [sys.executable, "-c", CHILD, target, when, str(nth), str(src), root, tag]
    return subprocess.run(args, capture_output=True, text=True, timeout=300).returncode


def assert_serves(root: StorageRoot, adapters: dict[str, Path], tiny_model_dir: Path) -> str:
    """The name resolves, is listed and loads with plain PEFT as exactly one whole version."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    path = resolve_adapter(NAME, root)
    tag = json.loads((path / "rayft.json").read_text())["tag"]
    assert _sha(path) == _sha(adapters[tag])  # weights of the version the manifest names
    assert [(a.name, a.tag) for a in list_adapters(root)] == [(NAME, tag)]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), path)
    saved = load_file(adapters[tag] / "adapter_model.safetensors")
    key = next(k for k in saved if "lora_B" in k)
    loaded = {k: v for k, v in model.state_dict().items() if "lora_B" in k}
    assert any(torch.equal(v, saved[key]) for v in loaded.values())
    return tag


LOCAL_FAULTS = [
    # (what is patched, before/after, which call, what a reader must see)
    ("shutil:copy2", "after", 1, "old"),  # half the files copied
    ("rayft.trainers.manifest:atomic_write", "before", 1, "old"),  # no manifest yet
    ("rayft.trainers.registry:swap_dir", "before", 1, "old"),  # staged, not switched
    ("os:symlink", "after", 1, "old"),  # the new link exists, not swapped in
    ("rayft.trainers.storage:_prune_versions", "before", 1, "new"),  # switched
]


@pytest.mark.parametrize(("target", "when", "nth", "expect"), LOCAL_FAULTS)
def test_local_publish_killed_mid_way(
    target, when, nth, expect, adapters, tiny_model_dir, tmp_path
) -> None:
    root = StorageRoot.resolve(str(tmp_path / "root"))
    publish_dir(adapters["old"], "adapter", NAME, {"tag": "old"}, False, root)
    assert crash_publish(target, when, nth, adapters["new"], root.location, "new") == CRASHED
    assert assert_serves(root, adapters, tiny_model_dir) == expect
    # The next publish succeeds and leaves at most the current and the previous version.
    publish_dir(adapters["new"], "adapter", NAME, {"tag": "new"}, True, root)
    assert assert_serves(root, adapters, tiny_model_dir) == "new"
    assert len(list((root.adapters / ".versions" / NAME).iterdir())) <= 2


def test_local_publish_over_a_directory_published_before_versions(
    adapters, tiny_model_dir, tmp_path
) -> None:
    root = StorageRoot.resolve(str(tmp_path / "root"))
    legacy = root.adapters / NAME
    shutil.copytree(adapters["old"], legacy)
    (legacy / "rayft.json").write_text(json.dumps({"tag": "old"}))
    assert assert_serves(root, adapters, tiny_model_dir) == "old"
    publish_dir(adapters["new"], "adapter", NAME, {"tag": "new"}, True, root)
    assert assert_serves(root, adapters, tiny_model_dir) == "new"


@pytest.fixture(scope="module")
def s3_root() -> Iterator[str]:
    """A bucket on a real S3 API server on loopback (moto), reached through AWS_ENDPOINT_URL."""
    with s3_server("faults"):
        yield "s3://faults"


URI_FAULTS = [
    ("rayft.trainers.storage:StorageRoot.upload", "after", 2, "old"),  # version half uploaded
    ("rayft.trainers.registry:write_pointer", "before", 1, "old"),  # uploaded, no pointer
    ("rayft.trainers.registry:swap_dir", "before", 1, "new"),  # pointer written
    ("rayft.trainers.registry:retire_remote_versions", "before", 1, "new"),
]


@pytest.mark.parametrize(("target", "when", "nth", "expect"), URI_FAULTS)
def test_object_storage_publish_killed_mid_way(
    target, when, nth, expect, adapters, tiny_model_dir, s3_root, tmp_path, monkeypatch
) -> None:
    prefix = f"{s3_root}/{target.rsplit(':', 1)[1].replace('.', '-')}-{when}"
    monkeypatch.setenv("RAYFT_CACHE", str(tmp_path / "publisher"))
    root = StorageRoot.resolve(prefix)
    publish_dir(adapters["old"], "adapter", NAME, {"tag": "old"}, False, root)
    assert crash_publish(target, when, nth, adapters["new"], prefix, "new") == CRASHED
    registry._synced.clear()  # a reader asks the URI again, as after its TTL

    # The publishing machine (its mirror as the crash left it) and a machine with none.
    assert assert_serves(root, adapters, tiny_model_dir) == expect
    monkeypatch.setenv("RAYFT_CACHE", str(tmp_path / "fresh-reader"))
    registry._synced.clear()
    fresh = StorageRoot.resolve(prefix)
    assert fresh.local != root.local and not fresh.local.exists()
    assert assert_serves(fresh, adapters, tiny_model_dir) == expect

    # Publishing again completes and retires old versions at the URI.
    publish_dir(adapters["new"], "adapter", NAME, {"tag": "new"}, True, fresh)
    registry._synced.clear()
    assert assert_serves(fresh, adapters, tiny_model_dir) == "new"
    assert len(fresh.list_dirs(f"adapters/.versions/{NAME}")) <= 2


def test_a_corrupt_pointer_on_object_storage_hides_only_that_adapter(
    adapters, s3_root, tmp_path, monkeypatch
) -> None:
    from rayft.trainers.registry import ManifestError

    monkeypatch.setenv("RAYFT_CACHE", str(tmp_path / "cache"))
    root = StorageRoot.resolve(f"{s3_root}/corrupt")
    publish_dir(adapters["old"], "adapter", "good", {"tag": "old"}, False, root)
    publish_dir(adapters["new"], "adapter", "torn", {"tag": "new"}, False, root)
    root.upload("adapters/torn/rayft.json", b'{"kind": "adapter", "na')
    registry._synced.clear()
    assert [a.name for a in list_adapters(root)] == ["good"]
    with pytest.raises(ManifestError, match="torn"):
        resolve_adapter("torn", root)
    assert resolve_adapter("good", root).name == "good"
    assert os.path.exists(resolve_adapter("good", root) / "adapter_model.safetensors")
