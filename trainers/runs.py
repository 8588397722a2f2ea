"""One lifecycle for every training run: start it, watch it, cancel it, free what it held.

Every run starts through :func:`start_run`:

* ``rayft train`` and ``rayft.train`` run it in the calling process, so the console shows
  its progress and Ctrl-C interrupts it; ``start_run`` returns once the run ended.
* a submitted job's entrypoint is ``rayft train`` on the cluster: the same path;
* a fine-tuning job runs it inside the job's runner actor, the same way;
* a sweep trial runs it in a Ray actor of its own (``in_actor=True``), outside the trial's
  placement group, where Ray Data's tasks fit; the handle is returned at once.

Whatever starts a run, its Train controller records the placement group of each worker
group it starts in ``runs/<run_id>/placement_groups`` (one id per line). Ray Train's own
cleaner frees a dead controller's group only when Ray's state API (the dashboard) is up; a
cancelled job, a stopped trial or an interrupted run frees its CPUs through
:func:`free_run_groups` either way. That is the one placement-group clean-up.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from rayft.trainers.compat import (
    actor_is_dead,
    orphaned_placement_groups,
    placement_group_callback,
)
from rayft.trainers.config import JobSpec
from rayft.trainers.records import live_state, read_events, read_record
from rayft.trainers.storage import StorageRoot, run_relpath

PLACEMENT_GROUPS_FILE = "placement_groups"
CONTROLLERS_FILE = "controllers"
"""The run's Train controllers' actor ids, one per line (written beside its groups)."""
"""Per run: the id of every placement group its Train workers were given, one per line."""

STARTING = "starting"
"""A run's status before its driver wrote the first record."""

RUN_NAMESPACE = "rayft-runs"
"""Ray namespace of the actors that drive runs started with ``in_actor=True``."""
DRIVER_EXIT_S = 15.0
"""How long stopping a run waits for its driver actor to be gone."""

SETTLE_ROUNDS = 3
"""Rounds of one second with no group left to remove before a stopped run counts as freed."""
FREE_LIMIT_S = 30.0
"""How long a stopped run's groups are watched at most."""


@dataclass(frozen=True)
class RunOptions:
    """How a run starts (see ``trainers.driver.run_training`` for each field)."""

    resume: bool = False
    show_progress: bool = False
    loop_callbacks: tuple[Any, ...] = ()
    callbacks: tuple[Any, ...] = ()
    start_from: Any = None
    scanned: Any = None
    publish: bool = True
    project: str | None = None


def record_groups(root: StorageRoot, run_id: str) -> Any:
    """A Ray Train callback (run in the Train controller) appending the id of each worker
    group's placement group to the run's ``placement_groups`` file, and the controller's
    actor id to its ``controllers`` file (once)."""
    relpath = run_relpath(run_id, PLACEMENT_GROUPS_FILE)
    controllers = run_relpath(run_id, CONTROLLERS_FILE)

    def record(group_id: str) -> None:
        import ray

        known = (root.read(relpath) or b"").decode()
        root.write(relpath, known + group_id + "\n")
        me = ray.get_runtime_context().get_actor_id()
        seen = (root.read(controllers) or b"").decode()
        if me and me not in seen.split():
            root.write(controllers, seen + me + "\n")

    return placement_group_callback(record)


def free_run_groups(root: StorageRoot, run_id: str) -> int:
    """Remove every placement group ``run_id`` recorded that Ray still holds.

    Returns:
        How many groups were removed.
    """
    import ray

    raw = root.read(run_relpath(run_id, PLACEMENT_GROUPS_FILE))
    group_ids = {line.strip() for line in (raw or b"").decode().splitlines() if line.strip()}
    if not group_ids or not ray.is_initialized():
        return 0
    table = ray.util.placement_group_table()
    return _remove_groups(
        g for g in group_ids if table.get(g, {}).get("state") not in (None, "REMOVED")
    )


def _remove_groups(group_ids: Iterable[str]) -> int:
    """Remove placement groups by hex id; how many were removed (not already gone)."""
    import ray
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    removed = 0
    for group_id in group_ids:
        try:
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(group_id))))
        except Exception:  # noqa: BLE001 - removed meanwhile (the run ended, or Train cleaned it)
            continue
        removed += 1
    return removed


def free_orphaned_groups() -> int:
    """Remove this job's placement groups whose creator (a Train controller) has died.

    A controller killed while it starts a worker group (a trial stopped by its scheduler
    just as its run restarts its workers) has made a group it never recorded; nothing
    else would free it while the job lives (:func:`compat.orphaned_placement_groups`).

    Returns:
        How many groups were removed.
    """
    return _remove_groups(orphaned_placement_groups())


def _controllers_alive(root: StorageRoot, run_ids: Iterable[str]) -> bool:
    """Whether a Train controller of these runs is still alive (``CONTROLLERS_FILE``)."""
    for run_id in run_ids:
        raw = root.read(run_relpath(run_id, CONTROLLERS_FILE)) or b""
        if any(not actor_is_dead(line) for line in raw.decode().split()):
            return True
    return False


def driver_name(run_id: str) -> str:
    """The Ray actor name of the driver of a run started with ``in_actor=True``."""
    return f"rayft-run-{run_id}"


def stop_driver(run_id: str) -> bool:
    """Kill the actor driving ``run_id`` (if any is alive) and wait until it is gone.

    Its Train controller and workers are its children: they die with it. Whoever stops a
    run (a sweep stopping a trial, a trial starting again) kills the driver before it frees
    the run's placement groups, so no live controller sees its workers go and starts new
    ones. Returns whether a driver was found.
    """
    import ray

    if not ray.is_initialized():
        return False
    try:
        actor = ray.get_actor(driver_name(run_id), namespace=RUN_NAMESPACE)
    except ValueError:
        return False
    ray.kill(actor, no_restart=True)
    deadline = time.monotonic() + DRIVER_EXIT_S
    while time.monotonic() < deadline:
        try:
            ray.get_actor(driver_name(run_id), namespace=RUN_NAMESPACE)
        except ValueError:
            break
        time.sleep(0.2)
    return True


def free_stopped_runs(
    root: StorageRoot, run_ids: Iterable[str], background: bool = False
) -> threading.Thread | None:
    """Stop runs and free their placement groups, until nothing of them is left.

    Each run's driver actor (if it has one) is killed first (:func:`stop_driver`). Killing
    a driver reaches its Train controller a moment later; a controller that sees its
    workers gone first (their group was removed) starts a new worker group in a new
    placement group. So the groups are removed again each second, the new ones included,
    until ``SETTLE_ROUNDS`` rounds find none and every Train controller the runs recorded
    (``CONTROLLERS_FILE``) is dead (``FREE_LIMIT_S`` at most). A group such a
    controller made and died before recording is removed too (:func:`free_orphaned_groups`).

    Args:
        background: Watch from a daemon thread (returned) instead of blocking.
    """
    run_ids = sorted(set(run_ids))
    if not run_ids:
        return None

    def watch() -> None:
        for run_id in run_ids:
            stop_driver(run_id)
        quiet, deadline = 0, time.monotonic() + FREE_LIMIT_S
        while time.monotonic() < deadline:
            removed = sum(free_run_groups(root, run_id) for run_id in run_ids)
            removed += free_orphaned_groups()
            quiet = 0 if removed else quiet + 1
            # A controller still alive may yet start a new group: watch until it is gone.
            if quiet >= SETTLE_ROUNDS and not _controllers_alive(root, run_ids):
                break
            time.sleep(1.0)

    if not background:
        watch()
        return None
    thread = threading.Thread(target=watch, name="rayft-free-groups", daemon=True)
    thread.start()
    return thread


def drive(root: StorageRoot, spec: JobSpec, run_id: str, options: RunOptions) -> Any:
    """Run ``spec`` as ``run_id`` here (``root`` is its ``storage:``), recording its worker
    groups; the ``TrainOutcome``."""
    from rayft.trainers.driver import run_training

    return run_training(
        spec,
        run_id=run_id,
        resume=options.resume,
        show_progress=options.show_progress,
        loop_callbacks=list(options.loop_callbacks),
        callbacks=[*options.callbacks, record_groups(root, run_id)],
        start_from=options.start_from,
        scanned=options.scanned,
        publish=options.publish,
        project=options.project,
    )


class RunDriver:
    """The body of the Ray actor that drives a run started with ``in_actor=True``."""

    def run(self, root: StorageRoot, spec: JobSpec, run_id: str, options: RunOptions) -> Any:
        return drive(root, spec, run_id, options)


class RunHandle:
    """One run, however it was started: its status, events, result, and a way to stop it."""

    def __init__(
        self,
        root: StorageRoot,
        run_id: str,
        *,
        actor: Any = None,
        future: Any = None,
        outcome: Any = None,
    ) -> None:
        self.root = root
        self.run_id = run_id
        self.future = future
        self._actor = actor
        self._outcome = outcome

    def status(self) -> str:
        """``starting``, ``running``, ``finished``, ``failed`` or ``interrupted``."""
        record = read_record(self.root, self.run_id)
        return (live_state(record) if record else None) or STARTING

    def events(self) -> list[dict[str, Any]]:
        """The run's events so far (``runs/<run_id>/events.jsonl``)."""
        return read_events(self.root, self.run_id)

    def done(self) -> bool:
        """Whether the run ended (its result, or its error, is ready)."""
        if self.future is None:
            return True
        import ray

        ready, _ = ray.wait([self.future], timeout=0)
        return bool(ready)

    def result(self, timeout: float | None = None) -> Any:
        """The run's ``TrainOutcome``; raises what the run raised.

        Raises:
            ray.exceptions.GetTimeoutError: Not ended within ``timeout`` seconds.
        """
        if self.future is not None and self._outcome is None:
            import ray

            self._outcome = ray.get(self.future, timeout=timeout)
        return self._outcome

    def cancel(self) -> None:
        """Stop the run's driver (with it its Train controller and workers) and free the
        CPUs and GPUs its workers held. A run that ended is left as it is."""
        if self._actor is not None:
            import ray

            ray.kill(self._actor, no_restart=True)
        free_stopped_runs(self.root, [self.run_id])


def start_run(
    spec: JobSpec,
    run_id: str,
    *,
    in_actor: bool = False,
    actor_options: dict[str, Any] | None = None,
    **options: Any,
) -> RunHandle:
    """Start training ``spec`` as ``run_id`` on the connected Ray cluster.

    Args:
        spec: A validated job spec.
        run_id: The run's id (its directory under ``runs/``).
        in_actor: Drive the run from a new Ray actor and return at once; otherwise drive
            it here and return when it ended (an error it raises is raised here, after
            its placement groups were freed).
        actor_options: Extra ``.options()`` of that actor.
        **options: The fields of :class:`RunOptions`.

    Returns:
        The run's handle.
    """
    root = StorageRoot.resolve(spec.storage)
    run_options = RunOptions(**options)
    if not in_actor:
        try:
            outcome = drive(root, spec, run_id, run_options)
        except BaseException:
            free_run_groups(root, run_id)
            raise
        return RunHandle(root, run_id, outcome=outcome)
    import ray

    stop_driver(run_id)  # an earlier start's driver of this run, if one is still alive
    settings = {
        "num_cpus": 0,
        "max_restarts": 0,
        "scheduling_strategy": "DEFAULT",
        "name": driver_name(run_id),
        "namespace": RUN_NAMESPACE,
    }
    actor = ray.remote(RunDriver).options(**{**settings, **(actor_options or {})}).remote()
    return RunHandle(
        root, run_id, actor=actor, future=actor.run.remote(root, spec, run_id, run_options)
    )
