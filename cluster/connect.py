"""Connecting to Ray: an address (``--address`` / ``RAY_ADDRESS``) or an embedded local cluster."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from rayft.cluster.console import is_verbose, quiet_ray_libraries
from rayft.cluster.errors import UserError
from rayft.cluster.job_start import COPY_ENV, WORKER_SETUP_HOOK
from rayft.trainers.compat import loopback_node, metrics_export_port_option

EMBEDDED_BIND_ADDRESS = "127.0.0.1"
BIND_ADDRESS_ENV = "RAYFT_BIND_ADDRESS"
"""Names another address for the embedded cluster to bind (its default is loopback)."""
PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"


def embedded_cpus() -> int:
    """Logical CPUs for the embedded cluster.

    Ray Data tasks, the Train controller and Serve's proxy need CPU slots besides the
    training workers; on a 2-core laptop exactly 2 logical CPUs starve them, so the
    embedded cluster advertises twice the cores (at least 4). Torch threads are sized
    from ``scaling.cpus_per_worker``, not from this number.
    """
    return max(4, 2 * (os.cpu_count() or 1))


def connect(
    address: str | None = None,
    quiet: bool | None = None,
    metrics_export_port: int | None = None,
    dashboard_port: int | None = None,
    bind_address: str | None = None,
) -> str:
    """Initialise Ray on ``address`` (or ``RAY_ADDRESS``); with neither, start a local cluster.

    Args:
        address: A Ray address; ``None``, ``"local"`` or ``"embedded"`` start a local cluster.
        quiet: Keep the output of Ray's workers and actors off this console (it stays in
            Ray's log files). Default: quiet unless ``--verbose`` / ``RAYFT_LOG_LEVEL``.
        metrics_export_port: Port of the embedded cluster's Prometheus endpoint (on
            127.0.0.1); ``None`` lets Ray pick a free one.
        dashboard_port: Start the embedded cluster's Ray dashboard on 127.0.0.1 at this
            port; ``None`` starts no dashboard.
        bind_address: The address every server of the embedded cluster binds to
            (default ``$RAYFT_BIND_ADDRESS``, else 127.0.0.1: nothing beyond loopback).

    Returns:
        ``"embedded"``, ``"existing"`` (Ray was already initialised) or the address.

    Raises:
        UserError: nothing answers at ``address``.
    """
    import ray

    if ray.is_initialized():
        return "existing"
    quiet = not is_verbose() if quiet is None else quiet
    address = address or os.environ.get("RAY_ADDRESS")
    bind_address = bind_address or os.environ.get(BIND_ADDRESS_ENV)
    embedded = not address or address in ("local", "embedded")
    options = {
        "runtime_env": _job_runtime_env(embedded),
        "log_to_driver": not quiet,
        "logging_level": "ERROR" if quiet else "INFO",
    }
    if not embedded:
        try:
            ray.init(address=address, **options)
        except ConnectionError as err:
            raise UserError(
                f"--address {address}: no Ray cluster answers there ({err}); check the "
                "address (or RAY_ADDRESS), or leave it out to start an embedded local cluster"
            ) from None
        quiet_ray_libraries()
        return address
    # A one-node cluster has no node that can be drained, so Ray Train's preemption
    # watcher (an actor per run) has nothing to watch.
    os.environ.setdefault(PREEMPTION_WATCHER_ENV, "0")
    # Every socket of the embedded cluster (GCS, raylet, workers, agents, metrics) stays
    # on loopback unless the user names another bind address.
    with loopback_node(bind_address or EMBEDDED_BIND_ADDRESS) as node:
        ray.init(
            # "local" always starts a new cluster, never attaching to one `ray start` left.
            address="local",
            num_cpus=embedded_cpus(),
            include_dashboard=dashboard_port is not None,
            **node,
            **_embedded_ports(metrics_export_port, dashboard_port),
            **options,
        )
    quiet_ray_libraries()
    return "embedded"


def _embedded_ports(metrics_port: int | None, dashboard_port: int | None) -> dict[str, object]:
    ports: dict[str, object] = {}
    if metrics_port is not None:
        ports.update(metrics_export_port_option(metrics_port))
    if dashboard_port is not None:
        # Loopback only: the dashboard serves the Jobs API, which runs arbitrary code.
        ports.update(dashboard_host="127.0.0.1", dashboard_port=dashboard_port)
    return ports


def _job_runtime_env(embedded: bool) -> dict[str, object] | None:
    """The runtime environment every worker of this driver's job starts in.

    An embedded cluster's workers inherit this process's environment, so forwarding it
    again would only cost each new worker process Ray's runtime-environment set-up (about
    half a second and twice the start-up CPU of a plain worker, paid by every actor of
    every run). A cluster at an address gets the variables that find models and data.
    """
    runtime_env: dict[str, object] = {} if embedded else {"env_vars": _forwarded_env()}
    if os.environ.get(COPY_ENV):  # a submitted job's driver: its workers leave Ray's dir too
        runtime_env["worker_process_setup_hook"] = WORKER_SETUP_HOOK
    return runtime_env or None


def _forwarded_env() -> dict[str, str]:
    keys = ("RAYFT_HOME", "RAYFT_MODEL_CACHE", "RAYFT_SMOLLM2_GGUF", "HF_HUB_OFFLINE")
    return {k: os.environ[k] for k in keys if k in os.environ}


@contextmanager
def connected(address: str | None = None) -> Iterator[str]:
    """Connect for the duration of a block; shut down only what this block started."""
    import ray

    started = not ray.is_initialized()
    kind = connect(address)
    try:
        yield kind
    finally:
        if started:
            ray.shutdown()
