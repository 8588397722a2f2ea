"""Every use of a dependency's private API (Ray, DeepSpeed, torch), each behind one name.

Nothing else in rayft touches a private module, class member or keyword of a dependency:
it calls the function here that says what it needs. Each entry's docstring names the
private symbol it uses and why no public API does the job. ``PRIVATE_SYMBOLS`` lists
every such symbol as ``(module, attribute)``; ``tests/unit/test_compat.py`` checks each
one against the installed versions, so an upgrade that removes one fails there, naming
it, rather than deep inside a training run or a served request.

``attribute`` is a top-level name of ``module``, or ``Owner.member``: a method, a field or
an attribute a method sets on ``self`` when ``Owner`` is a class; a parameter or a
``**kwargs`` key the function reads when ``Owner`` is a function.

Heavy libraries are imported inside the functions that use them, as everywhere in rayft.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

_TRAIN_CALLBACK = "ray.train.v2._internal.execution.callback"
_TRAIN_WORKER_GROUP = "ray.train.v2._internal.execution.worker_group"
_TRAIN_ERRORS = "ray.train.v2._internal.exceptions"

SDPA_KERNELS = (
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_attention_math",
)
"""ATen's scaled-dot-product-attention kernels, one per backend (CPU flash, CUDA flash,
memory-efficient, cuDNN, the math fallback)."""

HEAD_NODE_RESOURCE = "node:__internal_head__"

PRIVATE_SYMBOLS: list[tuple[str, str]] = [
    ("deepspeed.runtime.engine", "DeepSpeedEngine._zero3_consolidated_16bit_state_dict"),
    ("torch.optim.lr_scheduler", "LRScheduler._last_lr"),
    ("deepspeed.comm.torch", "build_shm_op"),
    ("ray.serve._private.replica", "add_port_to_grpc_server"),
    *[("torch.ops.aten", name) for name in SDPA_KERNELS],
    (_TRAIN_CALLBACK, "WorkerGroupCallback"),
    (_TRAIN_CALLBACK, "WorkerGroupCallback.after_worker_group_start"),
    (f"{_TRAIN_WORKER_GROUP}.worker_group", "WorkerGroup.get_worker_group_state"),
    (f"{_TRAIN_WORKER_GROUP}.state", "WorkerGroupState.placement_group_handle"),
    (f"{_TRAIN_WORKER_GROUP}.placement_group_handle", "PlacementGroupHandle.placement_group"),
    (_TRAIN_ERRORS, "WorkerHealthCheckFailedError.health_check_failure"),
    (_TRAIN_ERRORS, "WorkerHealthCheckTimeoutError"),
    (_TRAIN_ERRORS, "WorkerGroupStartupTimeoutError"),
    ("ray.train.v2._internal.constants", "WORKER_GROUP_START_TIMEOUT_S_ENV_VAR"),
    ("ray.tune.result_grid", "ResultGrid._experiment_analysis"),
    ("ray._private.worker", "init._metrics_export_port"),
    ("ray._private.worker", "init._node_ip_address"),
    ("ray._private.ray_constants", "ENABLE_RAY_CLUSTER"),
    ("ray._private.ray_constants", "ENABLE_RAY_CLUSTERS_ENV_VAR"),
    ("ray._common.constants", "HEAD_NODE_RESOURCE_NAME"),
    ("ray._private.state", "GlobalState._connect_and_get_accessor"),
    ("ray._raylet", "GlobalStateAccessor.get_placement_group_table"),
    ("ray.core.generated.gcs_pb2", "PlacementGroupTableData.creator_actor_id"),
    ("ray.core.generated.gcs_pb2", "PlacementGroupTableData.creator_actor_dead"),
    ("ray.core.generated.gcs_pb2", "PlacementGroupTableData.creator_job_id"),
    ("ray.core.generated.gcs_pb2", "PlacementGroupTableData.is_detached"),
    ("ray.core.generated.gcs_pb2", "PlacementGroupTableData.state"),
    ("ray.core.generated.gcs_pb2", "PlacementGroupTableData.REMOVED"),
    ("ray._raylet", "GlobalStateAccessor.get_actor_info"),
    ("ray.core.generated.gcs_pb2", "ActorTableData.state"),
    ("ray.core.generated.gcs_pb2", "ActorTableData.DEAD"),
    ("ray.serve.context", "_get_global_client"),
    ("ray.serve._private.client", "ServeControllerClient.http_config"),
    ("ray.serve.context", "_get_serve_request_context"),
    ("ray.serve.deployment", "Deployment._version"),
    ("ray.serve.context", "_RequestContext.request_id"),
]
"""Every private symbol this module relies on, as ``(module, attribute)``."""


# ------------------------------------------------------------------ DeepSpeed


def zero3_full_state_dict(engine: Any) -> dict[str, Any] | None:
    """The full 16-bit state dict of a ZeRO-3 engine, gathered from every rank's shards.

    Collective: every rank must call it. Rank 0 gets the state dict, the others ``None``.

    Uses ``DeepSpeedEngine._zero3_consolidated_16bit_state_dict``, which gathers one
    module's parameters at a time and keeps copies on rank 0 only. The public
    ``save_16bit_model`` does the same gather but writes a file through ``torch.save`` (a
    pickle) where the export needs tensors for the safetensors writers of PEFT and
    Hugging Face; gathering through the public ``deepspeed.zero.GatheredParameters``
    would hold the whole model on every rank at once.
    """
    return engine._zero3_consolidated_16bit_state_dict()


# ---------------------------------------------------------------------- torch


def skip_deepspeed_shm_op() -> None:
    """Keep DeepSpeed from building or loading its shared-memory collective op.

    ``deepspeed.comm.torch.build_shm_op`` JIT-compiles (first use on a machine: about a
    minute of C++ on two cores) and then loads a C++ extension every time a process
    initialises DeepSpeed's communication on CPU; only ``inference_all_reduce`` (DeepSpeed
    inference with tensor parallelism) uses it, never training, whose collectives go
    through ``torch.distributed``. No public setting turns the build off.
    """
    import importlib

    # ``import deepspeed.comm.torch as m`` would bind torch itself: ``deepspeed.comm``
    # has an attribute ``torch`` (the torch package) that shadows the submodule.
    ds_torch_comm = importlib.import_module("deepspeed.comm.torch")
    ds_torch_comm.build_shm_op = lambda: None


def set_scheduler_last_lr(scheduler: Any, lrs: list[float]) -> None:
    """Make ``scheduler.get_last_lr()`` report ``lrs`` (after its optimizer's rates were set).

    Uses ``LRScheduler._last_lr``, the value ``get_last_lr`` returns. torch has no setter:
    a scheduler updates it only in ``step()``, which would also advance the schedule.
    """
    scheduler._last_lr = list(lrs)


def sdpa_kernel_ops() -> set[Any]:
    """The ATen overloads of every scaled-dot-product-attention kernel this torch has.

    Uses the private ATen ops named in ``SDPA_KERNELS``. A selective-checkpointing policy
    sees the kernel ops that ``F.scaled_dot_product_attention`` dispatches to, never the
    public function itself, so naming the kernels is the only way to keep their outputs.
    """
    import torch

    aten = torch.ops.aten
    return {getattr(aten, name).default for name in SDPA_KERNELS if hasattr(aten, name)}


# ------------------------------------------------------------------ Ray Train


def placement_group_callback(on_start: Callable[[str], None]) -> Any:
    """A Ray Train ``RunConfig`` callback calling ``on_start(group_id_hex)`` whenever Train
    starts a worker group, with the id of the group's placement group.

    Runs in the Train controller. Uses ``WorkerGroupCallback`` (Train V2's internal
    callback base, kept in ``RunConfig.callbacks`` next to ``UserCallback``s) and the
    worker group's state (``get_worker_group_state().placement_group_handle
    .placement_group``). Train's public callbacks never see the worker group, and its own
    cleaner frees a dead controller's placement group only when Ray's state API (the
    dashboard) is up; a cancelled job or a stopped trial must free its CPUs either way.
    """
    from ray.train.v2._internal.execution.callback import WorkerGroupCallback

    class PlacementGroupCallback(WorkerGroupCallback):
        def after_worker_group_start(self, worker_group: Any) -> None:
            handle = worker_group.get_worker_group_state().placement_group_handle
            group = getattr(handle, "placement_group", None)
            if group is not None:
                on_start(group.id.hex())

    return PlacementGroupCallback()


def health_check_cause(error: BaseException) -> BaseException:
    """The error inside Ray Train's worker health-check failure, else ``error`` itself.

    Uses ``WorkerHealthCheckFailedError.health_check_failure``: Train wraps a dead worker
    actor's ``RayActorError`` in that (internal) error type, and no public API unwraps it
    (it is not chained as ``__cause__``).
    """
    return getattr(error, "health_check_failure", error)


def is_health_check_timeout(error: BaseException) -> bool:
    """Whether ``error`` is Ray Train's timeout of a worker that stopped answering.

    Uses the name of ``WorkerHealthCheckTimeoutError`` (an internal error type, compared
    by name so that checking it imports nothing of Train's internals).
    """
    return type(error).__name__ == "WorkerHealthCheckTimeoutError"


# ------------------------------------------------------------------- Ray Tune


def trials_of_this_run(grid: Any) -> list[Any]:
    """The ``Trial`` objects of the Tune run that produced ``grid`` (a ``ResultGrid``).

    Uses ``ResultGrid._experiment_analysis``: the controller's own view of how each trial
    ended. The public ``ResultGrid`` rows come from the experiment state on disk, which can
    still read ERROR for a trial a resumed run retried and finished.
    """
    analysis = getattr(grid, "_experiment_analysis", None)
    return list(analysis.trials) if analysis is not None else []


# ------------------------------------------------------------------------ Ray


def metrics_export_port_option(port: int) -> dict[str, int]:
    """The ``ray.init`` keyword that fixes the metrics agent's Prometheus port.

    Uses ``ray.init(_metrics_export_port=...)``: a local cluster started by ``ray.init``
    has no public keyword for it (``ray start --metrics-export-port`` is the public way,
    and starts a separate cluster).
    """
    return {"_metrics_export_port": port}


@contextmanager
def loopback_node(node_ip_address: str = "127.0.0.1") -> Iterator[dict[str, str]]:
    """While ``ray.init`` starts a local cluster in this block, bind it to ``node_ip_address``.

    Ray binds every server of a node (GCS, raylet, workers, agents, the metrics endpoint)
    to loopback only when the node's address is loopback, and ``ray.init`` turns a
    loopback ``_node_ip_address`` into the machine's address unless
    ``ray._private.ray_constants.ENABLE_RAY_CLUSTER`` is false. Ray reads that constant
    from ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` at import, so the block sets the variable
    (for the processes the cluster starts, which inherit it) and this process's
    already-imported constant, and restores both after. No public ``ray.init`` keyword
    names the node's bind address.

    Yields:
        The ``ray.init`` keyword that names the node's address.
    """
    import os

    from ray._private import ray_constants

    name = ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR
    saved = os.environ.get(name), ray_constants.ENABLE_RAY_CLUSTER
    loopback = node_ip_address in ("127.0.0.1", "localhost", "::1")
    if loopback:
        os.environ[name] = "0"
        ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield {"_node_ip_address": node_ip_address}
    finally:
        if loopback:
            if saved[0] is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = saved[0]
            ray_constants.ENABLE_RAY_CLUSTER = saved[1]


def replica_grpc_on_loopback() -> None:
    """In a Serve replica on a loopback node, bind its inter-deployment gRPC server there.

    ``ray.serve._private.replica`` starts that server on ``[::]:0`` (every interface)
    whatever the node's address; this process's later binds of ``[::]`` become
    ``127.0.0.1`` while the node itself is on loopback, so nothing of an embedded
    cluster answers beyond the machine. A node on a real address keeps Serve's bind
    (replicas on other nodes must reach it). No public setting names that address.
    """
    import ray
    import ray.serve._private.replica as serve_replica

    if not ray.is_initialized() or ray.util.get_node_ip_address() not in ("127.0.0.1", "::1"):
        return
    bind = serve_replica.add_port_to_grpc_server
    if getattr(bind, "rayft_loopback", False):
        return

    def on_loopback(server: Any, address: str) -> int:
        if address.startswith("[::]:"):
            address = "127.0.0.1:" + address.rsplit(":", 1)[1]
        return bind(server, address)

    on_loopback.rayft_loopback = True  # type: ignore[attr-defined]
    serve_replica.add_port_to_grpc_server = on_loopback


def orphaned_placement_groups() -> list[str]:
    """Ids of this job's live placement groups whose creator actor has died.

    Such a group belongs to no running code: the Train controller that made it was killed
    (a stopped trial or run) before it could use, record or remove it, for instance while
    it was starting a new worker group. Ray frees a group only once both its creator actor
    and the creator's job are dead, so in a long-lived job (a sweep, a server) it would
    hold its CPUs until the job ends. Groups of other jobs, detached groups and groups made
    by a driver (no creator actor) are never listed.

    Uses ``GlobalState._connect_and_get_accessor`` and the raw GCS table
    (``PlacementGroupTableData``): ``ray.util.placement_group_table()`` leaves out the
    creator fields, and no public API says whether a group's creator is alive.
    """
    import ray
    from ray._private.state import state
    from ray.core.generated.gcs_pb2 import PlacementGroupTableData

    if not ray.is_initialized():
        return []
    job = ray.get_runtime_context().get_job_id()
    groups = []
    for raw in state._connect_and_get_accessor().get_placement_group_table():
        data = PlacementGroupTableData.FromString(raw)
        if (
            data.state != PlacementGroupTableData.REMOVED
            and data.creator_actor_dead
            and not ray.ActorID(data.creator_actor_id).is_nil()
            and not data.is_detached
            and data.creator_job_id.hex() == job
        ):
            groups.append(data.placement_group_id.hex())
    return groups


def actor_is_dead(actor_id: str) -> bool:
    """Whether the actor with this hex id is dead (or unknown to the cluster).

    Uses ``GlobalState._connect_and_get_accessor().get_actor_info`` and the raw GCS
    ``ActorTableData``: the public state API (``ray.util.state.get_actor``) needs the
    dashboard, which an embedded cluster runs without, and an actor handle cannot be had
    for an unnamed actor of another process (a Train controller).
    """
    import ray
    from ray._private.state import state
    from ray.core.generated.gcs_pb2 import ActorTableData

    if not ray.is_initialized():
        return True
    info = state._connect_and_get_accessor().get_actor_info(ray.ActorID(bytes.fromhex(actor_id)))
    return info is None or ActorTableData.FromString(info).state == ActorTableData.DEAD


def is_head_node(resources: dict[str, float]) -> bool:
    """Whether a node with these resources (a ``ray.nodes()`` entry's) is the head node.

    Uses the resource Ray gives only the head node (``HEAD_NODE_RESOURCE_NAME``,
    ``node:__internal_head__``); ``ray.nodes()`` has no public head flag.
    """
    return HEAD_NODE_RESOURCE in resources


# ------------------------------------------------------------------ Ray Serve


def serve_proxy_address() -> tuple[str, int]:
    """Host and port of the running Ray Serve HTTP proxy.

    Uses ``ray.serve.context._get_global_client().http_config``: once Serve runs, a
    later ``serve.start`` keeps the first proxy's options, and no public API reads them.

    Raises:
        Exception: Serve does not run (or its client changed).
    """
    from ray.serve.context import _get_global_client

    options = _get_global_client().http_config
    return options.host, options.port


def with_serve_version(deployment: Any, version: str) -> Any:
    """``deployment`` with a fixed code version, so a redeploy can reconfigure in place.

    Uses ``Deployment.options(_internal=True, version=...)``, stored as
    ``Deployment._version``: ``serve.run`` gives every deploy without one a random
    version and so replaces every replica, even when only ``user_config`` changed; the
    public ``version`` option was removed, and only Serve config files keep versions.
    """
    return deployment.options(_internal=True, version=version)


def serve_request_id() -> str:
    """Ray Serve's id of the request being handled ("" outside one).

    Uses ``ray.serve.context._get_serve_request_context().request_id``, the id Serve puts
    in the ``X-Request-Id`` answer header; no public API reads it inside a replica.
    """
    from ray.serve.context import _get_serve_request_context

    return str(_get_serve_request_context().request_id or "")
