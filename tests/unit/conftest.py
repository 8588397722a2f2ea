"""The unit tier runs in this one process with no Ray: a test that leaves Ray initialised
fails at its teardown, naming it."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def _no_ray_cluster() -> Iterator[None]:
    yield
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
        pytest.fail(
            "this unit test initialised Ray; a test that needs Ray belongs in tests/integration"
        )
