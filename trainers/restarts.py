"""Telling the user about worker failures, restarts and refused checkpoints.

Ray Train restarts a failed worker group up to ``scaling.max_failures`` times; the new
workers continue from the newest verified checkpoint (``trainers.checkpoints``). Three
kinds of record reach the driver through the run's progress actor:

* ``worker_lost``: sent by :func:`failure_notices` (a Ray Train ``UserCallback``, run
  in the Train controller) when workers raised or died, with their ranks;
* ``worker_start``: sent by rank 0 each time a worker group has restored its state
  (the first one starts the run, every later one is a restart), with the step;
* ``checkpoint_refused``: sent by rank 0 for each checkpoint that failed verification.

:class:`Notices` turns them into one console line each on the driver, e.g.
``[rayft] worker 1 lost, restarting from step 4``.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from typing import Any

from rayft.trainers.compat import health_check_cause, is_health_check_timeout

WORKER_LOST = "worker_lost"
WORKER_START = "worker_start"
CHECKPOINT_REFUSED = "checkpoint_refused"
NOTICE_KINDS = (WORKER_LOST, WORKER_START, CHECKPOINT_REFUSED)
_MESSAGE_CHARS = 160
# What a surviving worker raises when a peer of its collectives disappears.
_PEER_GONE = re.compile(
    r"connection (closed|reset) by peer|broken pipe|gloo|nccl|process ?group", re.IGNORECASE
)


def lost_ranks(errors: dict[int, BaseException], world_size: int, died: set[int]) -> list[int]:
    """The ranks that were lost, from the errors one poll of the worker group found.

    Args:
        errors: World rank to the error that rank's worker reported.
        world_size: Workers in the group.
        died: Ranks whose worker process is known dead (``RayActorError``).

    A worker whose process died is lost. When the controller sees the survivors' errors
    first (their collectives lost a peer) before it notices the death, the ranks that
    reported nothing are the lost ones.
    """
    if died:
        return sorted(died)
    if errors and all(_PEER_GONE.search(str(err)) for err in errors.values()):
        return [rank for rank in range(world_size) if rank not in errors]
    return []


def failure_notices(sink: str) -> Any:
    """A Ray Train ``UserCallback`` that sends a ``worker_lost`` record on worker errors.

    Args:
        sink: Name of the run's ``ProgressSink`` actor.
    """
    from ray.exceptions import RayActorError
    from ray.train import UserCallback

    class FailureNotices(UserCallback):
        def after_exception(self, run_context, worker_exceptions: dict[int, Exception]) -> None:
            import ray

            died = {r for r, e in worker_exceptions.items() if _process_gone(e, RayActorError)}
            world = run_context.scaling_config.num_workers
            lost = lost_ranks(worker_exceptions, world, died)
            failed = {
                int(rank): f"{type(err).__name__}: {err}"[:_MESSAGE_CHARS]
                for rank, err in worker_exceptions.items()
                if rank not in lost
            }
            record = {"kind": WORKER_LOST, "lost": lost, "failed": failed}
            try:
                ray.get_actor(sink).push.remote(record)
            except ValueError:
                pass  # the driver has gone: nobody is left to tell

    return FailureNotices()


def _process_gone(error: BaseException, actor_error: type) -> bool:
    """Whether a worker's error says its process died or stopped answering."""
    # Ray Train wraps a dead actor's RayActorError in its health-check error.
    return isinstance(health_check_cause(error), actor_error) or is_health_check_timeout(error)


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class Notices:
    """Driver side: prints a line per restart and per refused checkpoint.

    Printed whether or not progress is shown: a restart is something to know about.
    """

    def __init__(self, say: Callable[[str], None] = _stderr) -> None:
        self.say = say
        self.starts = 0
        self.restarts = 0
        self._last_failure: dict[str, Any] | None = None

    def take(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Print the notices among ``records``; the other records, in order."""
        rest = []
        for record in records:
            kind = record.get("kind")
            if kind == WORKER_LOST:
                self._last_failure = record
            elif kind == WORKER_START:
                self._started(record)
            elif kind == CHECKPOINT_REFUSED:
                self.say(refusal_line(record))
            else:
                rest.append(record)
        return rest

    def _started(self, record: dict[str, Any]) -> None:
        self.starts += 1
        if self.starts == 1:
            return  # the run's first worker group
        self.restarts += 1
        self.say(restart_line(self._last_failure, record.get("step", 0)))
        self._last_failure = None


def restart_line(failure: dict[str, Any] | None, step: int) -> str:
    """``[rayft] worker 1 lost, restarting from step 4`` (or what failed, if none died)."""
    what = "the worker group failed"
    if failure and failure.get("lost"):
        lost = failure["lost"]
        what = f"worker{'s' if len(lost) > 1 else ''} {', '.join(map(str, lost))} lost"
    elif failure and failure.get("failed"):
        rank, message = next(iter(sorted(failure["failed"].items())))
        what = f"worker {rank} failed ({message})"
    return f"[rayft] {what}, restarting from step {step}"


def refusal_line(record: dict[str, Any]) -> str:
    """``[rayft] checkpoint checkpoint_X refused: <why>; resuming from an older one``."""
    problems = list(record.get("problems", []))
    shown = "; ".join(problems[:3]) + (f" (+{len(problems) - 3} more)" if len(problems) > 3 else "")
    return (
        f"[rayft] checkpoint {record.get('checkpoint')} refused: {shown}; "
        "resuming from the previous complete one"
    )
