"""Shared fixtures: an isolated RAYFT_HOME and the tiny test model."""

from __future__ import annotations

import os
import re
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import specs
from color_data import write_color_chats

# Ray Train's controller polls its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by
# default), so a finished tiny run is noticed up to that late, at start and at the end.
# Polling every 0.5 s takes about 3 s off each of the suite's training runs (a warm 2-step
# run: 19.4 s -> 16.4 s). Set before any Ray process starts; inherited by the CLIs and
# clusters the tests start, and propagated by Ray Train to its controller.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


@pytest.fixture(scope="session")
def rayft_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """``$RAYFT_HOME`` for the test session: a temporary directory unless already set."""
    preset = os.environ.get("RAYFT_HOME")
    if preset:
        yield Path(preset)
        return
    home = tmp_path_factory.mktemp("rayft_home")
    os.environ["RAYFT_HOME"] = str(home)
    try:
        yield home
    finally:
        os.environ.pop("RAYFT_HOME", None)


@pytest.fixture(scope="session")
def tiny_model_dir(rayft_home: Path) -> Path:
    """Directory of the builtin ``tiny-llama`` model and its ChatML tokenizer."""
    from rayft.trainers.models import pull_builtin
    from rayft.trainers.storage import StorageRoot

    return pull_builtin("tiny-llama", StorageRoot.resolve().models)


@pytest.fixture(scope="session")
def color_chats():
    """:func:`write_color_chats`, for modules that build their own training files."""
    return write_color_chats


@pytest.fixture(scope="session")
def small_chat_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 chat rows over three colours (red, blue, green), written once per session."""
    return write_color_chats(tmp_path_factory.mktemp("tiny-data") / "colors.jsonl", 40, colors=3)


@pytest.fixture(scope="session")
def tiny_spec(small_chat_file: Path):
    """:func:`specs.tiny_spec`, training on :func:`small_chat_file` unless given a file:
    ``tiny_spec(train=None, **sections)``."""

    def build(train: Path | str | None = None, **sections: object) -> dict:
        return specs.tiny_spec(small_chat_file if train is None else train, **sections)

    return build


@pytest.fixture(scope="session")
def published_adapters(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A registry root holding PEFT-made LoRA adapters for tiny-llama: ``a1``, ``a2``, ``a3``
    (seeds 1-3, see :func:`harness.make_peft_adapter`) and ``other-base`` (seed 4, made for
    ``smollm2-135m-instruct``). Shared by the whole session: tests that publish into or
    change a registry copy it first (:func:`harness.copy_registry`)."""
    from harness import make_peft_adapter

    root = tmp_path_factory.mktemp("published-adapters")
    for name, seed in (("a1", 1), ("a2", 2), ("a3", 3)):
        make_peft_adapter(root, name, seed)
    make_peft_adapter(root, "other-base", 4, base="smollm2-135m-instruct")
    return root


SHARED_CLUSTER = "ray_cluster"
"""The fixture of the embedded Ray cluster that modules share (:func:`ray_cluster`)."""


@pytest.fixture(scope="module")
def ray_cluster(rayft_home: Path, tiny_model_dir: Path) -> Iterator[None]:
    """The embedded local Ray cluster, shared by every module that asks for it.

    It starts on first use and stays up across modules; a module that starts a cluster
    of its own shape shuts it down first (:func:`_one_cluster_at_a_time`), and the session
    shuts it down at the end. The modules that share it run one after another
    (:func:`pytest_collection_modifyitems`), so it starts once for all of them.
    """
    import ray

    from rayft.cluster.connect import connect

    if not ray.is_initialized():
        connect(None)
    yield


def _shares_the_cluster(module: object, session: pytest.Session) -> bool:
    return any(
        getattr(item, "module", None) is module and SHARED_CLUSTER in item.fixturenames
        for item in session.items
    )


def _shut_ray_down() -> None:
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


@pytest.fixture(autouse=True, scope="module")
def _one_cluster_at_a_time(request: pytest.FixtureRequest) -> Iterator[None]:
    """Before a module that does not share the cluster, shut the shared one down: such a
    module starts a cluster of its own shape (or needs none, like the unit tier)."""
    if not _shares_the_cluster(request.module, request.session):
        _shut_ray_down()
    yield


@pytest.fixture(autouse=True, scope="session")
def _earlier_sessions_removed(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Remove earlier sessions' base folders (``pytest-<n>``) before this one writes.

    pytest prunes them only when a session exits; on a machine that runs the suite again
    and again, the ones it kept (models and checkpoints, GBs each) would take the disk this
    session needs. A folder that another live session holds (its lock is fresh) is kept.
    """
    from _pytest.pathlib import cleanup_numbered_dir  # pytest's own pruning, lock-aware

    base = tmp_path_factory.getbasetemp()
    if re.fullmatch(r"pytest-\d+", base.name):
        cleanup_numbered_dir(
            base.parent,
            "pytest-",
            keep=1,
            consider_lock_dead_if_created_before=time.time() - LOCK_DEAD_AFTER_S,
        )


LOCK_DEAD_AFTER_S = 3 * 24 * 3600.0
"""pytest's own age for a base folder's lock left by a session that died."""


@pytest.fixture(autouse=True, scope="module")
def _module_checkpoints_removed() -> Iterator[None]:
    """When a module ends, remove the checkpoints of the runs it made in the session's
    ``$RAYFT_HOME``: kept for the whole session, one full-weight SmolLM2 checkpoint with its
    optimizer state is 2.5 GB. The runs' records, manifests and published models stay."""
    runs_before = _session_runs()
    yield
    from rayft.trainers.checkpoints import CHECKPOINT_PREFIX

    for run in _session_runs() - runs_before:
        for folder in run.glob(f"{CHECKPOINT_PREFIX}*"):
            shutil.rmtree(folder, ignore_errors=True)


def _session_runs() -> set[Path]:
    home = os.environ.get("RAYFT_HOME")
    runs = Path(home) / "runs" if home else None
    return set(runs.iterdir()) if runs is not None and runs.is_dir() else set()


@pytest.fixture(autouse=True, scope="session")
def _ray_down_at_the_end() -> Iterator[None]:
    yield
    _shut_ray_down()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the modules that share the embedded cluster together, and the multi-node
    cluster tests last.

    The multi-node tests switch this process to Ray token authentication with a token of
    their own, which Ray caches per process; a local cluster started afterwards in the
    same process would be refused. Sorting is stable, so every other order is kept.
    """

    def group(item: pytest.Item) -> int:
        if "integration/test_cluster.py" in item.nodeid:
            return 2
        return 1 if SHARED_CLUSTER in getattr(item, "fixturenames", ()) else 0

    items.sort(key=group)


_SESSION: list[pytest.Session] = []


def pytest_sessionstart(session: pytest.Session) -> None:
    _SESSION.append(session)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """Leave with pytest's own exit status once every result is reported.

    Native threads that Ray's core worker, gRPC and torch leave in this process can crash
    while the interpreter tears itself down (a SIGSEGV after the summary line, seen on
    2-core machines), which would turn a finished run's status into 139. Every test stops
    the clusters and servers it started, so nothing is left for that teardown to do.
    """
    if not _SESSION:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(_SESSION[0].exitstatus))
