"""What a training run waits for on the cluster before it trains, each wait bounded by
``scaling.start_timeout_s``.

Two waits can otherwise last forever: Ray Data's tokenize tasks need a free CPU (a
cluster whose head has none and whose workers are busy never gives one), and Ray Train's
worker group waits for its placement group (``num_workers`` × the per-worker resources).
Ray Train bounds the second with ``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S`` but, by
default, retries a timed-out start without end (``FailureConfig.controller_failure_limit``
is -1); the driver sets both so the run fails once, with a message that names the setting.

It also sets how often Ray Train's controller polls the workers (:func:`prompt_polling`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rayft.trainers.config import JobSpec

WORKER_GROUP_START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
"""Ray Train's documented bound on a worker group's resource wait; the driver propagates it
to the Train controller (Ray Train V2 forwards it from the driver's environment)."""
CONTROLLER_FAILURE_LIMIT = 0
"""``FailureConfig.controller_failure_limit``: a worker group that cannot start within
the timeout fails the run instead of being retried without end."""
POLL_S = 1.0
SAY_AFTER_S = 5.0


class StartTimeoutError(RuntimeError):
    """The cluster did not provide what the run needs within ``scaling.start_timeout_s``."""

    explains_cause = True
    """Its message names the resources and what to change; Ray's error, chained as its
    cause, only says that a wait timed out (see :func:`rayft.cluster.errors.root_cause`)."""


def wait_for_data_cpu(
    timeout_s: float, say: Callable[[str], None], clock: Callable[[], float] = time.monotonic
) -> None:
    """Wait until the connected Ray cluster has a free CPU for Ray Data's tasks.

    Args:
        timeout_s: ``scaling.start_timeout_s``.
        say: Prints one line when the wait is noticeable.
        clock: Seconds, monotonic (tests pass their own).

    Raises:
        StartTimeoutError: No CPU was free for ``timeout_s`` seconds.
    """
    import ray

    start = clock()
    said = False
    while ray.available_resources().get("CPU", 0.0) < 1.0:
        waited = clock() - start
        total = ray.cluster_resources().get("CPU", 0.0)
        if waited >= timeout_s:
            raise StartTimeoutError(
                f"no CPU became free for Ray Data's tokenize tasks in {timeout_s:g} s "
                f"(scaling.start_timeout_s); the cluster has {total:g} CPU(s), none free: "
                "add a node with CPUs, free some, or raise scaling.start_timeout_s"
            )
        if waited >= SAY_AFTER_S and not said:
            say(
                f"[rayft] waiting for a free CPU for Ray Data's tokenize tasks (the cluster "
                f"has {total:g}, none free); giving up after {timeout_s:g} s "
                "(scaling.start_timeout_s)"
            )
            said = True
        time.sleep(POLL_S)


@contextmanager
def bounded_worker_start(spec: JobSpec) -> Iterator[None]:
    """Bound Ray Train's worker-group start by ``scaling.start_timeout_s`` around ``fit()``.

    Pair it with ``FailureConfig(controller_failure_limit=CONTROLLER_FAILURE_LIMIT)``.

    Raises:
        StartTimeoutError: The worker group did not get its resources in time (the
            message names the resources and the setting); Ray's error is its cause.
    """
    try:
        with _environ(WORKER_GROUP_START_TIMEOUT_ENV, str(spec.scaling.start_timeout_s)):
            yield
    except Exception as err:
        if not is_start_timeout(err):
            raise
        scaling = spec.scaling
        need = {"CPU": scaling.cpus_per_worker, **scaling.resources_per_worker}
        raise StartTimeoutError(
            f"the {scaling.num_workers} training workers did not get their resources "
            f"({', '.join(f'{k}: {v:g}' for k, v in need.items())} each, plus a GPU each "
            f"when training on GPUs) within {scaling.start_timeout_s:g} s "
            "(scaling.start_timeout_s): lower scaling.num_workers or "
            "scaling.cpus_per_worker, add nodes, or raise scaling.start_timeout_s"
        ) from err


POLL_INTERVAL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
"""Ray Train's interval between the controller's polls of the workers (propagated to the
controller from the driver's environment, as the start timeout)."""
POLL_INTERVAL_S = 0.5
"""rayft's interval. A poll collects the workers' reports and notices that the training
function returned: at Ray's default (2 s) a run ends up to 2 s after its last checkpoint,
and a sweep's scheduler hears of each evaluation that much later. A poll is one small call
per worker; one that does not answer in time is awaited again, not failed (the
health-check timeout, 10 minutes, is separate)."""


@contextmanager
def prompt_polling() -> Iterator[None]:
    """Around ``fit()``: the controller polls every :data:`POLL_INTERVAL_S`, unless the
    user's environment sets ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``."""
    if POLL_INTERVAL_ENV in os.environ:
        yield
        return
    with _environ(POLL_INTERVAL_ENV, str(POLL_INTERVAL_S)):
        yield


@contextmanager
def _environ(name: str, value: str) -> Iterator[None]:
    """``name=value`` in this process's environment (which Ray Train propagates to the
    controller it starts), and the previous value, or none, again afterwards."""
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


def is_start_timeout(err: BaseException) -> bool:
    """Whether ``fit()`` failed because the worker group's start timed out.

    Ray Train raises a ``ControllerError`` whose ``controller_failure`` is its
    ``WorkerGroupStartupTimeoutError`` (a class of a private module, so it is matched
    by name here rather than imported).
    """
    failure: Any = getattr(err, "controller_failure", None)
    return type(failure).__name__ == "WorkerGroupStartupTimeoutError"
