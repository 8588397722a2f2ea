"""Per-project quotas: the request-rate buckets, file and job counts, checkpoint retention."""

from __future__ import annotations

import io
import json
import time

import pytest

from rayft.cluster import fine_tuning as jobs
from rayft.cluster.files_service import FileStore
from rayft.cluster.quotas import (
    CheckpointSweeper,
    FileUsage,
    Usage,
    check_file_quota,
    check_job_quota,
)
from rayft.serving.app import parse_args
from rayft.serving.auth import OPEN, Principal
from rayft.serving.errors import QuotaExceeded
from rayft.serving.rate_limit import ProjectRates
from rayft.trainers.config import ConfigError
from rayft.trainers.job_limits import ProjectQuotas
from rayft.trainers.storage import StorageRoot

ROW = json.dumps(
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
)
HOUR = 3600.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def member(project: str) -> Principal:
    return Principal(f"key-{project}", project, "member")


# ------------------------------------------------------------- request rate


def test_a_project_past_its_burst_waits_and_others_do_not():
    clock = Clock()
    rates = ProjectRates(requests_per_s=2, burst=3, clock=clock)
    for _ in range(3):
        rates.check(member("alpha"))
    with pytest.raises(QuotaExceeded) as caught:
        rates.check(member("alpha"))
    err = caught.value
    assert (err.status, err.code, err.param) == (429, "quota_exceeded", "requests_per_s")
    assert err.retry_after_s == 1 and "'alpha'" in err.message
    rates.check(member("beta"))  # another project has its own bucket
    clock.now += 0.5  # one token back at 2 per second
    rates.check(member("alpha"))
    with pytest.raises(QuotaExceeded):
        rates.check(member("alpha"))


def test_retry_after_is_whole_seconds_until_a_token_is_back():
    rates = ProjectRates(requests_per_s=0.25, burst=1, clock=Clock())
    assert rates.take("p") is None
    assert rates.take("p") == 4


def test_admins_and_the_keyless_default_share_the_default_bucket():
    rates = ProjectRates(requests_per_s=1, burst=1, clock=Clock())
    rates.check(OPEN)
    with pytest.raises(QuotaExceeded, match="'default'"):
        rates.check(Principal("k", "ops", "admin"))
    rates.check(member("ops"))  # a member of ops counts as ops


def test_the_bucket_table_is_bounded_and_idle_buckets_go_first():
    clock = Clock()
    rates = ProjectRates(requests_per_s=1, burst=2, max_projects=3, clock=clock)
    rates.take("a"), rates.take("b")
    clock.now += 5  # a and b have refilled: the same as no bucket
    assert rates.take("c") is None and rates.take("c") is None
    assert rates.take("d") is None  # room made by dropping the idle a and b
    assert rates.take("c") == 1  # c, in use, kept its empty bucket
    for name in (f"p{i}" for i in range(50)):
        rates.take(name)
    assert len(rates) <= 3


def test_no_rate_quota_takes_every_request():
    rates = ProjectRates(requests_per_s=0, burst=1, clock=Clock())
    assert all(rates.take("p") is None for _ in range(1000))
    assert len(rates) == 0


# ---------------------------------------------------------------------- files


def test_file_quotas_name_the_quota_and_the_use():
    quotas = ProjectQuotas(max_files=2, max_file_bytes_total=100)
    check_file_quota(Usage(1, 50), quotas, "alpha", adding=50)
    with pytest.raises(QuotaExceeded) as caught:
        check_file_quota(Usage(2, 10), quotas, "alpha")
    assert caught.value.param == "max_files" and "2 files stored" in caught.value.message
    assert caught.value.retry_after_s is None and "delete files" in caught.value.message
    with pytest.raises(QuotaExceeded) as caught:
        check_file_quota(Usage(1, 50), quotas, "alpha", adding=51)
    assert caught.value.param == "max_file_bytes_total" and "50 bytes" in caught.value.message
    with pytest.raises(QuotaExceeded):  # full: refused before the upload is read
        check_file_quota(Usage(1, 100), quotas, "alpha")


def test_file_usage_counts_each_projects_records(tmp_path):
    root = StorageRoot.resolve(str(tmp_path))
    usage = FileUsage(root)
    stores = {p: FileStore(root, 10_000, member(p)) for p in ("alpha", "beta")}
    body = (ROW + "\n").encode()
    made = [stores["alpha"].create("a.jsonl", "fine-tune", io.BytesIO(body)) for _ in range(2)]
    stores["beta"].create("b.jsonl", "fine-tune", io.BytesIO(body * 3))
    assert usage.of("alpha") == Usage(2, 2 * len(body))
    assert usage.of("beta") == Usage(1, 3 * len(body))
    stores["alpha"].delete(made[0]["id"])
    assert usage.of("alpha") == Usage(1, len(body))
    assert usage.of("gamma") == Usage(0, 0)


# ----------------------------------------------------------------------- jobs


def job(root: StorageRoot, job_id: str, project: str, status: str, ended: float | None = None):
    request = jobs.parse_request({"model": "tiny-llama", "training_file": "file-a"})
    spec, reported = jobs.build_spec(
        request,
        base_model="tiny-llama",
        parent_adapter=None,
        train_url="/t.jsonl",
        eval_url=None,
        storage=root.location,
        output_name=f"ft:tiny-llama:{job_id}",
    )
    record = jobs.new_record(job_id, request, spec, reported, {}, project=project)
    record["status"] = status
    record["finished_at"] = ended
    jobs.save_job(root, record)
    return record


def test_a_project_at_its_active_jobs_quota_is_refused(tmp_path):
    root = StorageRoot.resolve(str(tmp_path))
    quotas = ProjectQuotas(max_active_jobs=2)
    job(root, "ftjob-a1", "alpha", jobs.RUNNING)
    job(root, "ftjob-a2", "alpha", jobs.QUEUED)
    job(root, "ftjob-a3", "alpha", jobs.SUCCEEDED, ended=time.time())
    records = jobs.list_jobs(root)
    with pytest.raises(QuotaExceeded) as caught:
        check_job_quota(root, records, quotas, "alpha")
    err = caught.value
    assert (err.status, err.param, err.retry_after_s) == (429, "max_active_jobs", 60)
    assert "ftjob-a1 (running)" in err.message and "ftjob-a3" not in err.message
    check_job_quota(root, records, quotas, "beta")

    def lost(root, record):  # the runner of a1 is gone: it ends when looked at
        if record["id"] == "ftjob-a1":
            return jobs.fail(root, "ftjob-a1", "runner_lost", "gone")
        return record

    check_job_quota(root, records, quotas, "alpha", refresh=lost)
    assert jobs.read_job(root, "ftjob-a1")["status"] == jobs.FAILED


# ---------------------------------------------------------------- checkpoints


def run_with_checkpoints(root: StorageRoot, run_id: str) -> None:
    run = root.run(run_id)
    for step in (2, 4):
        ckpt = run / f"checkpoint_2026-12-01_10-00-0{step}.000000"
        (ckpt / "state").mkdir(parents=True)
        (ckpt / "state" / "weights.bin").write_bytes(b"\0" * 64)
    (run / "events.jsonl").write_text('{"type": "train", "step": 4}\n')


def test_finished_jobs_checkpoints_go_after_retention_and_the_rest_stays(tmp_path):
    root = StorageRoot.resolve(str(tmp_path))
    ended = 1_800_000_000.0
    done = job(root, "ftjob-done", "alpha", jobs.SUCCEEDED, ended=ended)
    job(root, "ftjob-live", "alpha", jobs.RUNNING)
    cancelled = job(root, "ftjob-stop", "beta", jobs.CANCELLED, ended=ended + 10 * HOUR)
    for record in jobs.list_jobs(root):
        run_with_checkpoints(root, record["rayft"]["run_id"])
    artifact = root.adapter_dir(done["rayft"]["output_name"])
    artifact.mkdir(parents=True)
    (artifact / "adapter_model.safetensors").write_bytes(b"w")
    sweeper = CheckpointSweeper(retention_hours=72)

    assert sweeper.sweep(root, jobs.list_jobs(root), now=ended + 71 * HOUR) == []
    removed = sweeper.sweep(root, jobs.list_jobs(root), now=ended + 73 * HOUR)

    assert [p.split("/")[1] for p in removed] == ["ftjob-done", "ftjob-done"]
    assert not list(root.run("ftjob-done").glob("checkpoint_*"))
    assert (root.run("ftjob-done") / "events.jsonl").is_file()
    assert (artifact / "adapter_model.safetensors").read_bytes() == b"w"
    assert jobs.read_job(root, "ftjob-done")["status"] == jobs.SUCCEEDED
    assert len(list(root.run("ftjob-live").glob("checkpoint_*"))) == 2  # running: kept
    assert len(list(root.run(cancelled["id"]).glob("checkpoint_*"))) == 2  # not yet due
    later = sweeper.sweep(root, jobs.list_jobs(root), now=ended + 100 * HOUR)
    assert len(later) == 2 and not list(root.run(cancelled["id"]).glob("checkpoint_*"))


def test_sweeps_are_bounded_per_call_and_zero_retention_keeps_everything(tmp_path):
    root = StorageRoot.resolve(str(tmp_path))
    for i in range(5):
        job(root, f"ftjob-f{i}", "alpha", jobs.FAILED, ended=1000.0)
        run_with_checkpoints(root, f"ftjob-f{i}")
    records = jobs.list_jobs(root)
    assert CheckpointSweeper(0).sweep(root, records, now=1e12) == []
    assert len(list(root.path("runs").glob("*/checkpoint_*"))) == 10
    sweeper = CheckpointSweeper(1, per_call=2)
    assert len(sweeper.sweep(root, records, now=1e12)) == 4
    assert len(list(root.path("runs").glob("*/checkpoint_*"))) == 6
    while sweeper.sweep(root, records, now=1e12):
        pass
    assert not list(root.path("runs").glob("*/checkpoint_*"))


# ---------------------------------------------------------------- settings


def test_serve_arguments_carry_project_quotas_and_name_a_bad_one():
    args = parse_args({"project_quotas": {"max_files": 10, "requests_per_s": 5}})
    assert args.project_quotas.max_files == 10 and args.project_quotas.burst == 100
    assert parse_args({}).project_quotas == ProjectQuotas()
    with pytest.raises(ConfigError, match="project_quotas.max_active_jobs"):
        parse_args({"project_quotas": {"max_active_jobs": 0}})
