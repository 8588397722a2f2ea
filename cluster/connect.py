"""Connecting to Ray: an address (``--address`` / ``RAY_ADDRESS``) or an embedded local cluster."""

from __future__ import annotations

import os
from contextlib import contextmanager


def embedded_cpus() -> int:
    """Logical CPUs for the embedded cluster.

    Ray Data tasks, the Train controller and Serve's proxy need CPU slots besides the
    training workers; on a 2-core laptop exactly 2 logical CPUs starve them, so the
    embedded cluster advertises twice the cores (at least 4). Torch threads are sized
    from ``scaling.cpus_per_worker``, not from this number.
    """
    return max(4, 2 * (os.cpu_count() or 1))


def connect(address: str | None = None, quiet: bool = True) -> str:
    """Initialise Ray on ``address`` (or ``RAY_ADDRESS``); with neither, start a local cluster.

    Returns:
        ``"embedded"`` or the address connected to.
    """
    import ray

    if ray.is_initialized():
        return "existing"
    address = address or os.environ.get("RAY_ADDRESS")
    # Keep every socket on loopback unless the user points at a remote cluster.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    runtime_env = {"env_vars": _forwarded_env()}
    if address and address not in ("local", "embedded"):
        ray.init(
            address=address,
            log_to_driver=True,
            runtime_env=runtime_env,
            logging_level="ERROR" if quiet else "INFO",
        )
        return address
    ray.init(
        # "local" always starts a new cluster, never attaching to one `ray start` left running.
        address="local",
        num_cpus=embedded_cpus(),
        include_dashboard=False,
        log_to_driver=True,
        logging_level="ERROR" if quiet else "INFO",
        runtime_env=runtime_env,
    )
    return "embedded"


def _forwarded_env() -> dict[str, str]:
    keys = ("RAYFT_HOME", "RAYFT_MODEL_CACHE", "RAYFT_SMOLLM2_GGUF", "HF_HUB_OFFLINE")
    return {k: os.environ[k] for k in keys if k in os.environ}


@contextmanager
def connected(address: str | None = None):
    """Connect for the duration of a block; shut down only what this block started."""
    import ray

    started = not ray.is_initialized()
    kind = connect(address)
    try:
        yield kind
    finally:
        if started:
            ray.shutdown()
