"""Jobs beyond the cluster's free capacity wait in order and hold nothing
(``cluster.job_queue``), with real job records on disk."""

from __future__ import annotations

import time

from rayft.cluster import fine_tuning as jobs
from rayft.cluster import job_queue
from rayft.trainers.storage import StorageRoot


def _waiting(root: StorageRoot, job_id: str, created: int, workers: int, cpus: float) -> None:
    spec = {
        "model": {"name": "tiny-llama"},
        "data": {"train": "train.jsonl"},
        "scaling": {"num_workers": workers, "cpus_per_worker": cpus},
    }
    record = {
        "id": job_id,
        "created_at": created,
        "status": jobs.QUEUED,
        "finished_at": None,
        "rayft": {"spec": spec, "waiting": True, "output_name": job_id, "kind": "adapter"},
        "history": [],
    }
    jobs.save_job(root, record)


def _admit(root: StorageRoot, free: dict[str, float]) -> tuple[list[str], list[str]]:
    started: list[str] = []
    admitted = job_queue.admit(
        root,
        lambda: jobs.list_jobs(root),
        lambda job_id: jobs.mark_admitted(root, job_id) is not None,
        lambda: free,
        started.append,
    )
    return admitted, started


def test_waiting_jobs_start_in_order_and_none_overtakes_the_head(tmp_path):
    root = StorageRoot.resolve(str(tmp_path))
    _waiting(root, "ftjob-a", 1, workers=1, cpus=2)  # needs 3 CPUs (2 + 1 for data)
    _waiting(root, "ftjob-b", 2, workers=2, cpus=1)  # needs 3
    _waiting(root, "ftjob-c", 3, workers=1, cpus=0.5)  # needs 1.5: fits, but waits its turn

    admitted, started = _admit(root, {"CPU": 4.0, "GPU": 0.0})
    assert admitted == started == ["ftjob-a"]
    records = jobs.list_jobs(root)
    positions = {
        r["id"]: r["rayft"].get("queue_position") for r in jobs.with_queue_positions(records)
    }
    assert positions == {"ftjob-a": None, "ftjob-b": 1, "ftjob-c": 2}
    admitted_record = jobs.read_job(root, "ftjob-a")
    assert not admitted_record["rayft"]["waiting"]
    assert admitted_record["status"] == jobs.VALIDATING  # its runner checks the files first

    # ftjob-a is admitted but not training yet: its CPUs count as taken.
    assert _admit(root, {"CPU": 4.0, "GPU": 0.0}) == ([], [])
    # Once it trains, the cluster reports what it holds; freed CPUs admit the next two.
    jobs.transition(root, "ftjob-a", jobs.RUNNING, "training started")
    assert _admit(root, {"CPU": 4.5, "GPU": 0.0})[1] == ["ftjob-b", "ftjob-c"]
    assert job_queue.waiting_in_order(jobs.list_jobs(root)) == []


def test_a_job_cancelled_while_waiting_is_never_started(tmp_path):
    root = StorageRoot.resolve(str(tmp_path))
    _waiting(root, "ftjob-a", 1, workers=1, cpus=1)
    _waiting(root, "ftjob-b", 2, workers=1, cpus=1)
    jobs.cancel(root, "ftjob-a")  # no runner exists: nothing to stop on the cluster
    assert jobs.read_job(root, "ftjob-a")["status"] == jobs.CANCELLED

    admitted, started = _admit(root, {"CPU": 8.0})
    assert started == ["ftjob-b"] and "ftjob-a" not in admitted
    assert jobs.read_job(root, "ftjob-a")["status"] == jobs.CANCELLED


def test_a_waiting_job_is_not_taken_for_one_whose_runner_was_lost(tmp_path):
    root = StorageRoot.resolve(str(tmp_path))
    _waiting(root, "ftjob-a", int(time.time()), workers=1, cpus=1)
    record = jobs.refresh(root, jobs.read_job(root, "ftjob-a"))
    assert record["status"] == jobs.QUEUED and record.get("error") is None


def test_a_job_asks_for_its_workers_cpus_and_gpus_plus_one_cpu_for_data():
    spec = {
        "model": {"name": "tiny-llama"},
        "data": {"train": "train.jsonl"},
        "scaling": {"num_workers": 3, "cpus_per_worker": 2, "use_gpu": True},
    }
    assert job_queue.job_needs(spec) == {"CPU": 7.0, "GPU": 3.0}


def test_a_shared_job_publishes_for_every_project_and_a_bad_value_is_400():
    import pytest

    from rayft.serving.errors import BadRequest

    def request(rayft: dict) -> jobs.JobRequest:
        return jobs.parse_request(
            {"model": "tiny-llama", "training_file": "file-abc", "rayft": rayft}
        )

    shared = request({"shared": True, "lora": {"r": 4}})
    assert jobs.take_shared(shared) is True and shared.rayft == {"lora": {"r": 4}}
    assert jobs.take_shared(request({"lora": {"r": 4}})) is False
    with pytest.raises(BadRequest) as refused:
        jobs.take_shared(request({"shared": "yes"}))
    assert refused.value.param == "rayft.shared"

    record = {"rayft": {"project": "search", "shared": True}}
    assert jobs.artifact_project(record) is None
    assert jobs.artifact_project({"rayft": {"project": "search"}}) == "search"
