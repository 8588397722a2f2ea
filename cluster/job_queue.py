"""Fine-tuning jobs beyond the cluster's free capacity wait, in order, holding no actor.

A new job is recorded ``queued`` and *waiting* (``rayft.waiting``) until the CPUs (and
GPUs) it needs are free: its workers' share plus one CPU for data loading. Waiting jobs
are admitted strictly in creation order (a large job at the head is never overtaken by
smaller ones behind it, so it cannot starve); an admitted job gets its runner actor and
goes on as before (validation, ``queued`` for Ray Train's workers, ``running``). Nothing
of a waiting job lives on the cluster: no actor, no reservation.

Admission runs where the queue can move: when a job is created, when jobs are listed or
read, and when a runner ends (it frees what it held). One lock in the storage root keeps
replicas and runners from admitting a job twice.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rayft.trainers.locks import held
from rayft.trainers.storage import StorageRoot

QUEUE_LOCK = "fine_tuning/queue.lock"
DATA_CPUS = 1.0
"""CPUs a run needs besides its workers' (Ray Data's tasks, see ``trainers.startup``)."""
WAITING_STATUSES = ("validating_files", "queued")


def job_needs(spec: dict[str, Any]) -> dict[str, float]:
    """The CPUs and GPUs a job's run reserves: ``{"CPU": n, "GPU": m}``."""
    from rayft.trainers.config import JobSpec

    scaling = JobSpec.from_dict(spec).scaling
    workers = scaling.num_workers
    gpus = float(workers) if scaling.use_gpu is True else 0.0
    return {"CPU": workers * float(scaling.cpus_per_worker) + DATA_CPUS, "GPU": gpus}


def is_waiting(record: dict[str, Any]) -> bool:
    """Whether a job waits for capacity (recorded, not admitted, not ended)."""
    return bool(record.get("rayft", {}).get("waiting")) and record["status"] in WAITING_STATUSES


def waiting_in_order(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The waiting jobs, first created first."""
    return sorted(
        (r for r in records if is_waiting(r)), key=lambda r: (r.get("created_at", 0), r["id"])
    )


def queue_position(records: list[dict[str, Any]], job_id: str) -> int | None:
    """1 for the job admitted next, ``None`` for a job that is not waiting."""
    for index, record in enumerate(waiting_in_order(records), start=1):
        if record["id"] == job_id:
            return index
    return None


def _starting(record: dict[str, Any]) -> bool:
    """Admitted, not yet training: its workers may not hold their resources yet."""
    return not is_waiting(record) and record["status"] in WAITING_STATUSES


def admit(
    root: StorageRoot,
    records: Callable[[], list[dict[str, Any]]],
    mark_admitted: Callable[[str], bool],
    free: Callable[[], dict[str, float]],
    start: Callable[[str], None],
) -> list[str]:
    """Admit waiting jobs, first created first, while each fits in what is free.

    Args:
        root: The rayft root holding the job records (and the queue's lock).
        records: Reads every job record.
        mark_admitted: Records that a job no longer waits; ``False`` when it ended meanwhile.
        free: What the cluster has free now (``{"CPU": ..., "GPU": ...}``).
        start: Starts the runner of an admitted job (its id).

    Returns:
        The ids admitted, in order.
    """
    admitted: list[str] = []
    if not waiting_in_order(records()):
        return admitted  # nothing waits: no lock to take (the common case)
    with held(root, QUEUE_LOCK):
        found = records()
        waiting = waiting_in_order(found)
        if not waiting:
            return admitted
        room = dict(free())
        for record in found:  # admitted jobs whose workers may not have reserved yet
            if _starting(record):
                for kind, amount in job_needs(record["rayft"]["spec"]).items():
                    room[kind] = room.get(kind, 0.0) - amount
        for record in waiting:
            needs = job_needs(record["rayft"]["spec"])
            if any(amount > room.get(kind, 0.0) for kind, amount in needs.items() if amount):
                break  # in order: nothing behind the head overtakes it
            if not mark_admitted(record["id"]):
                continue  # cancelled meanwhile
            start(record["id"])
            admitted.append(record["id"])
            for kind, amount in needs.items():
                room[kind] = room.get(kind, 0.0) - amount
    return admitted


def free_resources() -> dict[str, float]:
    """The connected Ray cluster's free CPUs and GPUs; unbounded when this process is not
    connected (the runner's start then fails and says so)."""
    import ray

    if not ray.is_initialized():
        return {"CPU": float("inf"), "GPU": float("inf")}
    available = ray.available_resources()
    return {"CPU": float(available.get("CPU", 0.0)), "GPU": float(available.get("GPU", 0.0))}
