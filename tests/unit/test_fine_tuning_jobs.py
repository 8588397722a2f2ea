"""The pure parts of the fine-tuning jobs API: body → job spec, records, events, files."""

from __future__ import annotations

import io
import json

import pytest

from rayft.cluster import fine_tuning as jobs
from rayft.cluster.files_service import FileStore
from rayft.serving.errors import BadRequest, TooLarge
from rayft.trainers.storage import StorageRoot

CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}


def spec_of(body: dict, **kw):
    request = jobs.parse_request({"model": "tiny-llama", "training_file": "file-a", **body})
    args = {
        "base_model": "tiny-llama",
        "parent_adapter": None,
        "train_url": "/data/train.jsonl",
        "eval_url": None,
        "storage": "/root",
        "output_name": "ft:tiny-llama:ftjob-1",
        **kw,
    }
    spec, reported = jobs.build_spec(request, **args)
    return jobs.validate_job_spec(spec, request), reported


def bad_param(body: dict) -> str:
    with pytest.raises(BadRequest) as caught:
        spec_of(body)
    assert caught.value.status == 400
    return caught.value.param


def test_openai_hyperparameters_map_onto_the_job_spec():
    body = {
        "seed": 7,
        "suffix": "colors",
        "method": {
            "type": "supervised",
            "supervised": {
                "hyperparameters": {"n_epochs": 3, "batch_size": 8, "learning_rate_multiplier": 2}
            },
        },
        "rayft": {"scaling": {"num_workers": 2}, "lora": {"r": 4}, "optim": {"lr": 1e-3}},
    }
    spec, reported = spec_of(body, eval_url="/data/eval.jsonl")
    assert spec.optim.epochs == 3
    assert spec.optim.batch_size == 4  # 8 examples per step over 2 workers
    assert spec.optim.lr == pytest.approx(2e-3)
    assert spec.optim.seed == 7 and spec.lora.r == 4
    assert (spec.data.train, spec.data.eval) == ("/data/train.jsonl", "/data/eval.jsonl")
    assert spec.output.name == "ft:tiny-llama:ftjob-1" and spec.storage == "/root"
    assert spec.model.name == "tiny-llama"
    assert reported == {"n_epochs": 3, "batch_size": 8, "learning_rate_multiplier": 2.0}


def test_dpo_jobs_map_onto_objective_dpo_with_beta_and_method():
    dpo = {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.25, "n_epochs": 2}}}
    spec, reported = spec_of({"method": dpo})
    assert (spec.objective, spec.method, spec.dpo.beta, spec.optim.epochs) == (
        "dpo",
        "lora",
        0.25,
        2,
    )
    assert reported["beta"] == 0.25 and reported["n_epochs"] == 2
    full, reported = spec_of({"method": {"type": "dpo"}, "rayft": {"method": "full"}})
    assert (full.objective, full.method) == ("dpo", "full")
    assert reported["beta"] == 0.1  # rayft's default, as "auto" would give
    # The older extension spellings still choose the weights.
    older, _ = spec_of(
        {"method": {"type": "dpo"}, "rayft": {"method": "dpo", "dpo": {"weights": "full"}}}
    )
    assert (older.objective, older.method) == ("dpo", "full")
    record = jobs.new_record(
        "ftjob-1",
        jobs.parse_request({"model": "tiny-llama", "training_file": "file-a", "method": dpo}),
        spec.to_dict(),
        reported,
        {},
    )
    assert record["method"] == {"type": "dpo", "dpo": {"hyperparameters": reported}}
    assert record["rayft"]["kind"] == "adapter"
    assert record["rayft"]["method"] == "dpo"  # what clients read before `objective` existed


EXACT = {
    "type": "string_check",
    "name": "exact",
    "input": "{{ sample.output_text }}",
    "reference": "{{ item.answer }}",
    "operation": "eq",
}


def test_reinforcement_jobs_map_onto_objective_grpo_with_the_grader():
    method = {
        "type": "reinforcement",
        "reinforcement": {
            "grader": EXACT,
            "hyperparameters": {
                "n_epochs": 2,
                "compute_multiplier": 2.0,
                "eval_interval": 3,
                "eval_samples": 2,
                "reasoning_effort": "low",
            },
        },
    }
    spec, reported = spec_of({"method": method, "rayft": {"grpo": {"beta": 0.02}}})
    assert (spec.objective, spec.method, spec.optim.epochs) == ("grpo", "lora", 2)
    assert spec.grpo.grader == EXACT and spec.grpo.beta == 0.02
    # eval_interval needs a validation file to evaluate; without one it is reported only.
    assert spec.grpo.num_generations == 8 and spec.eval.every_steps is None
    assert spec.optim.lr == 1e-5  # GRPO's LoRA default
    assert reported["compute_multiplier"] == 2.0 and reported["reasoning_effort"] == "low"
    record = jobs.new_record(
        "ftjob-1",
        jobs.parse_request({"model": "tiny-llama", "training_file": "file-a", "method": method}),
        spec.to_dict(),
        reported,
        {},
    )
    assert record["method"]["type"] == "reinforcement"
    assert record["method"]["reinforcement"]["grader"] == EXACT
    validated, _ = spec_of(
        {"method": method, "validation_file": "file-b"}, eval_url="/data/eval.jsonl"
    )
    assert validated.eval.every_steps == 3
    auto, reported = spec_of(
        {"method": {"type": "reinforcement", "reinforcement": {"grader": EXACT}}}
    )
    assert auto.grpo.num_generations == 4 and reported["eval_interval"] == "auto"


def test_auto_and_legacy_hyperparameters_keep_rayfts_defaults():
    auto = {"n_epochs": "auto", "batch_size": "auto", "learning_rate_multiplier": "auto"}
    spec, reported = spec_of({"hyperparameters": auto})
    # The effective batch of 8 split over the default 2 workers; LoRA's learning rate.
    assert (spec.optim.epochs, spec.optim.batch_size, spec.optim.lr) == (1, 4, 1e-3)
    assert reported == {"n_epochs": 1, "batch_size": 8, "learning_rate_multiplier": 1.0}
    legacy, _ = spec_of({"hyperparameters": {"n_epochs": 2}})
    assert legacy.optim.epochs == 2


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"training_file": 5}, "training_file"),
        ({"hyperparameter": {}}, "hyperparameter"),
        ({"hyperparameters": {"n_epochs": "3"}}, "hyperparameters.n_epochs"),
        ({"hyperparameters": {"n_epochs": 0}}, "hyperparameters.n_epochs"),
        ({"method": {"type": "reinforcement"}}, "method.reinforcement"),
        (
            {"method": {"type": "reinforcement", "reinforcement": {"grader": {"type": "x"}}}},
            "method.reinforcement.grader.type",
        ),
        (
            {
                "method": {
                    "type": "reinforcement",
                    "reinforcement": {
                        "grader": {"type": "string_check"},
                        "hyperparameters": {"reasoning_effort": "max"},
                    },
                }
            },
            "method.reinforcement.hyperparameters.reasoning_effort",
        ),
        (
            {"method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0}}}},
            "method.dpo.hyperparameters.beta",
        ),
        ({"method": {"type": "dpo"}, "rayft": {"method": "freeze"}}, "rayft.method"),
        ({"rayft": {"method": "dpo"}}, "rayft.method"),
        ({"rayft": {"objective": "dpo"}}, "rayft.objective"),
        ({"method": {"type": "dpo"}, "rayft": {"objective": "classification"}}, "rayft.objective"),
        ({"method": {"type": "dpo", "supervised": {}}}, "method.supervised"),
        ({"suffix": "x" * 41}, "suffix"),
        ({"metadata": {"k": 1}}, "metadata.k"),
        (
            {
                "hyperparameters": {"n_epochs": 1},
                "method": {"type": "supervised", "supervised": {"hyperparameters": {}}},
            },
            "hyperparameters",
        ),
        (
            {"hyperparameters": {"batch_size": 3}, "rayft": {"scaling": {"num_workers": 2}}},
            "hyperparameters.batch_size",
        ),
        ({"rayft": {"lora": {"r": 0}}}, "rayft.lora.r"),
        ({"rayft": {"optimm": {"lr": 1}}}, "rayft.optimm"),
        ({"rayft": {"method": "sgd"}}, "rayft.method"),
        ({"rayft": {"storage": "/elsewhere"}}, "rayft.storage"),
        ({"rayft": {"data": {"train": "/etc/passwd"}}}, "rayft.data.train"),
        (
            {"rayft": {"deepspeed": {"zero_stage": 2, "offload_params": True}}},
            "rayft.deepspeed.offload_params",
        ),
        (
            {"hyperparameters": {"learning_rate_multiplier": 1e9}, "rayft": {"optim": {"lr": -1}}},
            "rayft.optim.lr",
        ),
    ],
)
def test_bad_bodies_are_400_naming_the_field(body, param):
    assert bad_param(body) == param


def test_missing_fields_and_non_objects_are_named():
    with pytest.raises(BadRequest) as caught:
        jobs.parse_request({"model": "tiny-llama"})
    assert caught.value.param == "training_file"
    with pytest.raises(BadRequest):
        jobs.parse_request(["model"])


def test_fine_tuned_names_are_openai_shaped_and_path_safe():
    from rayft.trainers.config import valid_name
    from rayft.trainers.registry import RegistryError, checked_name

    name = jobs.fine_tuned_name("tiny-llama", "colors", "ftjob-abc")
    assert name == "ft:tiny-llama:colors:ftjob-abc"
    assert checked_name(name) == name
    assert jobs.fine_tuned_name("tiny-llama", None, "ftjob-abc") == "ft:tiny-llama:ftjob-abc"
    odd = jobs.fine_tuned_name("/models/Org/Smol LM 2", None, "ftjob-" + "a" * 24)
    assert odd.startswith("ft:Smol-LM-2:") and valid_name(odd)
    for unsafe in ("ft:../x", "a/b:c", ":x", "ft:..", "x" * 129):
        assert not valid_name(unsafe)
        with pytest.raises(RegistryError):
            checked_name(unsafe)


def _record(root: StorageRoot, job_id: str = "ftjob-0001") -> dict:
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
    record = jobs.new_record(job_id, request, spec, reported, {})
    jobs.save_job(root, record)
    return record


def test_records_round_trip_and_terminal_states_stick(tmp_path):
    from openai.types.fine_tuning import FineTuningJob

    root = StorageRoot.resolve(str(tmp_path))
    first = _record(root, "ftjob-0001")
    first["created_at"] -= 10
    jobs.save_job(root, first)
    _record(root, "ftjob-0002")
    assert [r["id"] for r in jobs.list_jobs(root)] == ["ftjob-0002", "ftjob-0001"]
    assert jobs.read_job(root, "ftjob-0001") == first
    jobs.transition(root, "ftjob-0001", jobs.QUEUED, "validated")
    jobs.fail(root, "ftjob-0001", "invalid_training_file", "t.jsonl:3: bad", "training_file")
    after = jobs.transition(root, "ftjob-0001", jobs.RUNNING, "too late")
    assert after["status"] == "failed"
    assert [h["status"] for h in after["history"]] == ["validating_files", "queued", "failed"]
    parsed = FineTuningJob.model_validate(jobs.job_object(after))
    assert parsed.error.param == "training_file" and parsed.status == "failed"
    with pytest.raises(Exception) as missing:
        jobs.read_job(root, "ftjob-nothere")
    assert getattr(missing.value, "status", None) == 404
    with pytest.raises(Exception) as unsafe:
        jobs.read_job(root, "../../etc/passwd")
    assert getattr(unsafe.value, "status", None) == 404


def test_events_and_checkpoints_come_from_the_run_log(tmp_path):
    from openai.types.fine_tuning import FineTuningJobEvent
    from openai.types.fine_tuning.jobs import FineTuningJobCheckpoint

    from rayft.trainers.records import RunLog

    root = StorageRoot.resolve(str(tmp_path))
    record = _record(root)
    log = RunLog(root, record["id"])
    log.state("running")
    for step, loss in ((1, 2.5), (2, 2.0)):
        log.progress({"kind": "train", "step": step, "total_steps": 2, "loss": loss})
    log.progress({"kind": "eval", "step": 2, "total_steps": 2, "eval_loss": 1.75})
    log.progress({"kind": "checkpoint", "step": 2, "path": "/ckpt/2"})
    events = jobs.job_events(root, record)
    for event in events:
        FineTuningJobEvent.model_validate(event)
    metrics = [e["data"] for e in events if e["type"] == "metrics"]
    assert [m.get("train_loss") for m in metrics if "train_loss" in m] == [2.0, 2.5]
    assert [m["valid_loss"] for m in metrics if "valid_loss" in m] == [1.75]
    assert events[-1]["data"]["status"] == "validating_files"
    assert len({e["id"] for e in events}) == len(events)
    page = jobs.listing(events, events[1]["id"], 2)
    assert page["data"] == events[2:4] and page["has_more"] == (len(events) > 4)
    (checkpoint,) = jobs.job_checkpoints(root, record)
    parsed = FineTuningJobCheckpoint.model_validate(checkpoint)
    assert parsed.step_number == 2 and parsed.metrics.train_loss == 2.0
    assert parsed.metrics.valid_loss == 1.75


def test_files_are_checked_on_upload_and_errors_name_the_line(tmp_path):
    from openai.types import FileObject

    store = FileStore(StorageRoot.resolve(str(tmp_path)), max_bytes=10_000)
    good = (json.dumps(CHAT) + "\n") * 3
    record = store.create("train.jsonl", "fine-tune", io.BytesIO(good.encode()))
    assert FileObject.model_validate(record).bytes == len(good)
    assert record["rayft"]["rows"] == 3 and record["rayft"]["format"] == "chat"
    assert store.content(record["id"]).read_text() == good
    assert [f["id"] for f in store.list()] == [record["id"]]
    bad = json.dumps(CHAT) + "\n" + '{"messages": [{"role": "user"}]}\n'
    with pytest.raises(BadRequest) as caught:
        store.create("bad.jsonl", "fine-tune", io.BytesIO(bad.encode()))
    assert caught.value.message.startswith("bad.jsonl:2: ") and caught.value.param == "file"
    with pytest.raises(BadRequest) as caught:
        store.create("t.jsonl", "assistants", io.BytesIO(good.encode()))
    assert caught.value.param == "purpose"
    with pytest.raises(TooLarge):
        store.create("big.jsonl", "fine-tune", io.BytesIO(good.encode() * 100))
    with pytest.raises(BadRequest):
        store.create("t.csv", "fine-tune", io.BytesIO(b"a,b\n"))
    assert [f["id"] for f in store.list()] == [record["id"]]  # refused files leave nothing
    assert store.delete(record["id"])["deleted"] is True
    assert store.list() == [] and list((tmp_path / "datasets").glob("file-*")) == []


def test_failures_name_the_file_as_the_body_does():
    from rayft.trainers.config import ConfigError
    from rayft.trainers.data import DataError

    labels = {"/r/datasets/file-1.jsonl": "training_file file-1 (t.jsonl)"}
    err = DataError(
        "/r/datasets/file-1.jsonl:4: row has no 'prompt' (data.format=prompt_completion)"
    )
    code, message, param = jobs.failure(err, labels, "ftjob-1")
    assert (code, param) == ("invalid_training_file", "training_file")
    assert message.startswith("training_file file-1 (t.jsonl):4: ")
    code, _, param = jobs.failure(ConfigError([("scaling.num_workers", "x")]), labels, "r")
    assert (code, param) == ("invalid_job_spec", "rayft.scaling.num_workers")
    code, message, _ = jobs.failure(RuntimeError("boom"), labels, "ftjob-1")
    assert code == "training_failed" and "runs/ftjob-1/events.jsonl" in message


def test_racing_cancel_finish_and_watchers_leave_one_consistent_record(tmp_path):
    import threading

    root = StorageRoot.resolve(str(tmp_path))
    writers = {
        "runner": lambda job: jobs.transition(
            root, job, jobs.SUCCEEDED, "published", fine_tuned_model="ft:x", finished_at=1
        ),
        "cancel": lambda job: jobs.transition(
            root, job, jobs.CANCELLED, "cancelled", finished_at=2
        ),
        "refresh": lambda job: jobs.fail(root, job, "runner_lost", "the runner stopped"),
        "watcher": lambda job: jobs.transition(root, job, jobs.RUNNING, "training started"),
    }
    for round_ in range(20):
        job = f"ftjob-{round_:04d}"
        _record(root, job)
        start = threading.Barrier(len(writers))
        answers: dict[str, dict] = {}

        def write(name: str, job: str = job, start=start, answers=answers) -> None:
            start.wait()
            answers[name] = writers[name](job)

        threads = [threading.Thread(target=write, args=(name,)) for name in writers]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        final = jobs.read_job(root, job)  # parses: never torn
        ends = [h["status"] for h in final["history"] if h["status"] in jobs.TERMINAL]
        # Exactly one end, the last entry, and the record's status and fields are its own.
        assert ends == [final["status"]] == [final["history"][-1]["status"]]
        assert final.get("fine_tuned_model") == ("ft:x" if ends == ["succeeded"] else None)
        # Every writer that ended the job was told the end the record keeps.
        for name in ("runner", "cancel", "refresh"):
            assert answers[name]["status"] == final["status"]


def test_learning_rate_multiplier_scales_the_methods_default_rate():
    from rayft.trainers import defaults

    times_two = {"learning_rate_multiplier": 2}
    lora, _ = spec_of({"hyperparameters": times_two})
    assert lora.optim.lr == pytest.approx(2 * defaults.LORA_LR)
    dpo = {"type": "dpo", "dpo": {"hyperparameters": times_two}}
    full, _ = spec_of({"method": dpo, "rayft": {"method": "full"}})
    assert full.optim.lr == pytest.approx(2 * defaults.DPO_FULL_LR)
    older, _ = spec_of({"method": dpo, "rayft": {"method": "dpo", "dpo": {"weights": "full"}}})
    assert older.optim.lr == pytest.approx(2 * defaults.DPO_FULL_LR)


def _refused(call, *args, **kw) -> tuple[int, str | None, str | None]:
    with pytest.raises(Exception) as caught:
        call(*args, **kw)
    return getattr(caught.value, "status", None), caught.value.code, caught.value.param


def test_pause_and_resume_follow_the_job_status_rules(tmp_path):
    from rayft.cluster import job_queue
    from rayft.trainers.records import pause_pending

    root = StorageRoot.resolve(str(tmp_path))
    job = _record(root)["id"]
    jobs.transition(root, job, jobs.QUEUED, "waiting for 3 CPUs")
    record = jobs.read_job(root, job)
    record["rayft"]["waiting"] = True  # in the queue, no runner yet
    jobs.save_job(root, record)
    paused = jobs.pause(root, job, "key-1", wait_s=5)
    assert paused["status"] == "paused" and not job_queue.is_waiting(paused)
    assert paused["history"][-1]["key_id"] == "key-1"
    assert jobs.mark_admitted(root, job) is None  # the queue never starts a paused job
    assert jobs.refresh(root, paused)["status"] == "paused"  # no runner, by design
    assert _refused(jobs.pause, root, job) == (409, "job_not_pausable", "job_id")

    resumed = jobs.resume(root, job, "key-2")
    assert resumed["status"] == "queued" and job_queue.is_waiting(resumed)
    assert "resumed with key key-2" in resumed["history"][-1]["message"]
    assert not pause_pending(root, job)
    assert _refused(jobs.resume, root, job) == (409, "job_not_resumable", "job_id")
    events = [e["message"] for e in jobs.job_events(root, jobs.read_job(root, job))]
    assert any("Job paused" in m for m in events) and any("resumed with key" in m for m in events)

    jobs.pause(root, job)
    cancelled = jobs.cancel(root, job, "key-3")  # a paused job can be cancelled
    assert cancelled["status"] == "cancelled"
    assert _refused(jobs.pause, root, job)[:2] == (409, "job_not_pausable")
    assert _refused(jobs.resume, root, job)[:2] == (409, "job_not_resumable")


def test_pausing_a_training_job_waits_for_its_checkpoint_then_stops_it(tmp_path):
    import threading
    import time

    from rayft.trainers.records import RunLog, pause_pending

    root = StorageRoot.resolve(str(tmp_path))
    job = _record(root, "ftjob-0001")["id"]
    jobs.transition(root, job, jobs.RUNNING, "training started")
    RunLog(root, job).state("running")  # its run's driver is up

    def runner() -> None:  # what a runner does when its run pauses at the next step
        while not pause_pending(root, job):
            threading.Event().wait(0.05)
        jobs.transition(root, job, jobs.PAUSED, "paused after step 3")

    answering = threading.Thread(target=runner)
    answering.start()
    paused = jobs.pause(root, job, "key-1", wait_s=30)
    answering.join(5)
    assert paused["status"] == "paused"
    assert [h["message"] for h in paused["history"][-2:]] == [
        "pause requested with key key-1: checkpointing at the next step",
        "paused after step 3",
    ]

    # A run that reaches no step within the wait is stopped; it resumes at its checkpoint.
    late = _record(root, "ftjob-0002")["id"]
    jobs.transition(root, late, jobs.RUNNING, "training started")
    RunLog(root, late).state("running")
    forced = jobs.pause(root, late, wait_s=0.2)
    assert forced["status"] == "paused"
    assert "no step within 0.2 s" in forced["history"][-1]["message"]
    assert "no checkpoint yet" in forced["history"][-1]["message"]

    # A job admitted but still checking its files has no run to wait for: stopped at once.
    early = _record(root, "ftjob-0003")["id"]
    started = time.monotonic()
    stopped = jobs.pause(root, early, wait_s=30)
    assert stopped["status"] == "paused" and time.monotonic() - started < 10
    assert "its run had not started" in stopped["history"][-1]["message"]
