"""OpenAI's files and fine-tuning jobs API on a local Ray Serve app, driven by the official
``openai`` client: upload, train (a real rayft run on the serving cluster), serve the
result, cancel, fail on bad data, and survive a restart of the app."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest
from harness import FUZZY_GRADER

pytestmark = pytest.mark.slow

RUN_OPTIONS = {
    "scaling": {"num_workers": 1},
    "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
    "optim": {"max_steps": 4, "scheduler": "constant", "warmup_ratio": 0.0},
    "data": {"format": "chat", "max_seq_len": 64},
    "eval": {"at_start": False, "every_steps": 2},
    "checkpoint": {"every_steps": 2},
}
# For jobs without a validation_file.
NO_EVAL = {**RUN_OPTIONS, "eval": {"at_start": False}}
SERVE_ARGS = {
    "model": "tiny-llama",
    "max_loaded_adapters": 2,
    "dtype": "float32",
    "max_tokens_limit": 64,
    "max_prompt_tokens": 48,
    "num_cpus": 1,
    "max_file_bytes": 64_000,
}


@pytest.fixture(scope="module")
def server(ray_cluster, rayft_home: Path):
    """The Serve app with the jobs API on the shared cluster (which outlives the module:
    only Serve is shut down)."""
    from ray import serve

    from rayft.cluster.service_app import ROUTERS
    from rayft.serving.client import run_app

    args = {**SERVE_ARGS, "storage": str(rayft_home)}
    try:
        yield {"url": run_app(args, routers=ROUTERS), "args": args, "home": rayft_home}
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{server['url']}/v1", api_key="unused", max_retries=0, timeout=120
    )


@pytest.fixture(scope="module")
def colors(tmp_path_factory, color_chats) -> Path:
    return color_chats(tmp_path_factory.mktemp("ft-data") / "colors.jsonl", 32, colors=4)


@pytest.fixture(scope="module")
def uploaded(client, colors) -> str:
    with open(colors, "rb") as handle:
        return client.files.create(file=handle, purpose="fine-tune").id


def wait_for(client: openai.OpenAI, job_id: str, statuses: set[str], timeout_s: float = 420):
    deadline = time.monotonic() + timeout_s
    while True:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in statuses or time.monotonic() > deadline:
            return job
        time.sleep(1.0)


@pytest.fixture(scope="module")
def trained(client, uploaded):
    job = client.fine_tuning.jobs.create(
        model="tiny-llama",
        training_file=uploaded,
        validation_file=uploaded,
        suffix="colors",
        seed=3,
        metadata={"team": "colors"},
        method={
            "type": "supervised",
            "supervised": {"hyperparameters": {"batch_size": 4, "learning_rate_multiplier": 150}},
        },
        extra_body={"rayft": RUN_OPTIONS},
    )
    assert job.status == "validating_files" and job.fine_tuned_model is None
    return wait_for(client, job.id, {"succeeded", "failed", "cancelled"})


def test_files_upload_list_read_and_delete(client, server, colors, uploaded):
    stored = client.files.retrieve(uploaded)
    assert (stored.object, stored.purpose, stored.filename) == ("file", "fine-tune", "colors.jsonl")
    assert stored.bytes == colors.stat().st_size
    assert uploaded in [f.id for f in client.files.list().data]
    assert client.files.content(uploaded).content == colors.read_bytes()

    lines = colors.read_text().splitlines()
    broken = "\n".join([lines[0], lines[1], '{"messages": "not a list"}']) + "\n"
    with pytest.raises(openai.BadRequestError) as refused:
        client.files.create(file=("broken.jsonl", broken.encode()), purpose="fine-tune")
    error = refused.value.body
    assert error["param"] == "file" and error["message"].startswith("broken.jsonl:3: ")
    with pytest.raises(openai.APIStatusError) as too_big:
        client.files.create(file=("big.jsonl", b"x" * 70_000), purpose="fine-tune")
    assert too_big.value.status_code == 413 and "max_file_bytes" in too_big.value.body["message"]

    spare = client.files.create(file=("spare.jsonl", colors.read_bytes()), purpose="fine-tune")
    assert client.files.delete(spare.id).deleted is True
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(spare.id)


def test_a_job_trains_publishes_and_serves_at_once(client, server, uploaded, trained):
    job = trained
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model == f"ft:tiny-llama:colors:{job.id}"
    assert job.trained_tokens and job.trained_tokens > 0 and job.finished_at
    assert (job.seed, job.metadata, job.hyperparameters.batch_size) == (3, {"team": "colors"}, 4)

    events = list(client.fine_tuning.jobs.list_events(job.id, limit=100))
    statuses = [e.data["status"] for e in reversed(events) if e.data and "status" in e.data]
    assert statuses == ["validating_files", "queued", "running", "succeeded"]
    train_steps = sorted(e.data["step"] for e in events if "train_loss" in (e.data or {}))
    assert train_steps == [1, 2, 3, 4]
    assert sorted(e.data["step"] for e in events if "valid_loss" in (e.data or {})) == [2, 4]
    first_page = client.fine_tuning.jobs.list_events(job.id, limit=3)
    assert len(first_page.data) == 3 and first_page.has_more
    assert first_page.data == events[:3]

    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.step_number for c in checkpoints] == [4, 2]
    assert all(c.metrics.train_loss > 0 and c.metrics.valid_loss > 0 for c in checkpoints)
    assert all(c.fine_tuning_job_id == job.id for c in checkpoints)

    assert job.fine_tuned_model in [m.id for m in client.models.list().data]
    chat = client.chat.completions.create(
        model=job.fine_tuned_model,
        messages=[{"role": "user", "content": "name a red thing"}],
        max_tokens=8,
        temperature=0,
    )
    assert chat.model == job.fine_tuned_model and chat.choices[0].message.content
    # The uploaded file is also a registry dataset: the adapter fits it better than the base.
    losses = {}
    for model in ("tiny-llama", job.fine_tuned_model):
        body = {"model": model, "dataset": uploaded, "metrics": ["loss"]}
        answer = httpx.post(f"{server['url']}/v1/evaluations", json=body, timeout=120)
        assert answer.status_code == 200, answer.text
        losses[model] = answer.json()["metrics"]["loss"]
    assert losses[job.fine_tuned_model] < losses["tiny-llama"]


def test_a_dpo_job_on_openai_preference_rows_trains_and_publishes(client, server):
    import json

    from rayft.trainers.registry import ArtifactManifest, resolve_adapter
    from rayft.trainers.storage import StorageRoot

    pairs = [("red", "apple", "sky"), ("blue", "sky", "grass"), ("green", "grass", "snow")]
    rows = [
        {
            "input": {"messages": [{"role": "user", "content": f"name a {color} thing"}]},
            "preferred_output": [{"role": "assistant", "content": f"the {good} is {color}"}],
            "non_preferred_output": [{"role": "assistant", "content": f"the {bad} is {color}"}],
        }
        for color, good, bad in pairs * 4
    ]
    data = "".join(json.dumps(row) + "\n" for row in rows).encode()
    file_id = client.files.create(file=("prefs.jsonl", data), purpose="fine-tune").id
    options = {**NO_EVAL, "data": {"max_seq_len": 64}, "optim": {"max_steps": 2}}
    job = client.fine_tuning.jobs.create(
        model="tiny-llama",
        training_file=file_id,
        suffix="prefs",
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2, "batch_size": 4}}},
        extra_body={"rayft": options},
    )
    assert job.method.type == "dpo" and job.method.dpo.hyperparameters.beta == 0.2
    job = wait_for(client, job.id, {"succeeded", "failed", "cancelled"})
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model in [m.id for m in client.models.list().data]
    recorded = ArtifactManifest.read(
        resolve_adapter(job.fine_tuned_model, StorageRoot.resolve(str(server["home"])))
    )
    assert recorded.objective == "dpo" and recorded.spec["dpo"]["beta"] == 0.2
    assert recorded.project == "default"  # the job's project (an open server's): its keys only


def test_a_reinforcement_job_grades_answers_and_reports_the_mean_grade(client, server):
    # OpenAI's third method through the unchanged client: prompt rows, a grader, the
    # validation file's mean grade in the job's events and checkpoint metrics.
    import json

    from rayft.trainers.registry import ArtifactManifest, resolve_adapter
    from rayft.trainers.storage import StorageRoot

    def upload(name: str, pairs: list[tuple[int, int]]) -> str:
        rows = [
            {"messages": [{"role": "user", "content": f"{a} plus {b}?"}], "answer": str(a + b)}
            for a, b in pairs
        ]
        data = "".join(json.dumps(row) + "\n" for row in rows).encode()
        return client.files.create(file=(name, data), purpose="fine-tune").id

    train = upload("sums.jsonl", [(a, b) for a in range(4) for b in range(2)])
    valid = upload("sums-valid.jsonl", [(5, 1), (6, 2)])
    options = {
        "scaling": {"num_workers": 1},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "optim": {"max_steps": 2},
        "data": {"max_seq_len": 64},
        "grpo": {"max_new_tokens": 4},
        "checkpoint": {"every_steps": 1},
    }
    job = client.fine_tuning.jobs.create(
        model="tiny-llama",
        training_file=train,
        validation_file=valid,
        suffix="sums",
        method={
            "type": "reinforcement",
            "reinforcement": {
                "grader": FUZZY_GRADER,
                "hyperparameters": {
                    "batch_size": 2,
                    "eval_interval": 1,
                    "compute_multiplier": 0.5,  # 2 answers per prompt
                    "reasoning_effort": "low",  # accepted; an open model has no such knob
                },
            },
        },
        extra_body={"rayft": options},
    )
    assert job.method.type == "reinforcement"
    assert job.method.reinforcement.grader.name == "close"
    job = wait_for(client, job.id, {"succeeded", "failed", "cancelled"})
    assert job.status == "succeeded", job.error

    metrics = [e.data for e in client.fine_tuning.jobs.list_events(job.id, limit=100).data]
    metrics = [m for m in metrics if m]
    trained = [m for m in metrics if "train_reward_mean" in m]
    graded = [m for m in metrics if "valid_reward_mean" in m]
    assert sorted(m["step"] for m in trained) == [1, 2]
    assert all(0.0 <= m["train_reward_mean"] <= 1.0 for m in trained)
    assert {m["step"] for m in graded} >= {1, 2}  # every eval_interval (1) step
    assert all(0.0 <= m["valid_reward_mean"] <= 1.0 for m in graded)
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert checkpoints and all(
        "valid_reward_mean" in c.metrics.model_dump(exclude_none=True) for c in checkpoints
    )

    recorded = ArtifactManifest.read(
        resolve_adapter(job.fine_tuned_model, StorageRoot.resolve(str(server["home"])))
    )
    assert recorded.objective == "grpo" and recorded.spec["grpo"]["grader"] == FUZZY_GRADER
    assert recorded.spec["grpo"]["num_generations"] == 2
    answer = client.chat.completions.create(
        model=job.fine_tuned_model,
        messages=[{"role": "user", "content": "2 plus 2?"}],
        max_tokens=4,
    )
    assert answer.choices[0].message.content is not None


def test_a_job_on_a_file_that_does_not_fit_fails_in_validating_files(client, uploaded):
    job = client.fine_tuning.jobs.create(
        model="tiny-llama",
        training_file=uploaded,
        extra_body={"rayft": {**NO_EVAL, "data": {"format": "prompt_completion"}}},
    )
    done = wait_for(client, job.id, {"succeeded", "failed", "cancelled"}, timeout_s=120)
    assert done.status == "failed" and done.fine_tuned_model is None
    assert (done.error.code, done.error.param) == ("invalid_training_file", "training_file")
    assert f"training_file {uploaded} (colors.jsonl):1: " in done.error.message
    statuses = [e.data["status"] for e in client.fine_tuning.jobs.list_events(job.id)]
    assert statuses == ["failed", "validating_files"]


@pytest.mark.parametrize(
    ("fields", "status", "param"),
    [
        ({"training_file": "file-0123456789abcdef01234567"}, 400, "training_file"),
        ({"hyperparameters": {"n_epochs": 0}}, 400, "hyperparameters.n_epochs"),
        ({"extra_body": {"rayft": {"lora": {"r": 0}}}}, 400, "rayft.lora.r"),
        ({"extra_body": {"rayft": {"scaling": {"num_gpus": 1}}}}, 400, "rayft.scaling.num_gpus"),
        ({"method": {"type": "reinforcement"}}, 400, "method.reinforcement"),
        ({"model": "no-such-adapter"}, 404, "model"),
    ],
)
def test_bad_job_bodies_are_refused_naming_the_param(client, uploaded, fields, status, param):
    body = {"model": "tiny-llama", "training_file": uploaded, **fields}
    with pytest.raises(openai.APIStatusError) as refused:
        client.fine_tuning.jobs.create(**body)
    assert refused.value.status_code == status
    assert refused.value.body["param"] == param


def test_malformed_json_and_unknown_ids_are_clean_errors(server):
    url = server["url"]
    answer = httpx.post(f"{url}/v1/fine_tuning/jobs", content=b"{not json", timeout=30)
    assert answer.status_code == 400 and answer.json()["error"]["code"] == "invalid_json"
    for path in ("/v1/fine_tuning/jobs/ftjob-unknown", "/v1/files/file-unknown"):
        answer = httpx.get(f"{url}{path}", timeout=30)
        assert answer.status_code == 404 and answer.json()["error"]["type"] == "not_found_error"
    answer = httpx.get(f"{url}/v1/fine_tuning/jobs", params={"limit": "many"}, timeout=30)
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "limit"


def test_cancel_stops_the_ray_work_and_publishes_nothing(client, server, uploaded, trained):
    import ray

    from rayft.cluster.fine_tuning import NAMESPACE, runner_name

    options = {**NO_EVAL, "optim": {**RUN_OPTIONS["optim"], "max_steps": 2000}}
    job = client.fine_tuning.jobs.create(
        model="tiny-llama", training_file=uploaded, extra_body={"rayft": options}
    )
    running = wait_for(client, job.id, {"running", "succeeded", "failed"}, timeout_s=240)
    assert running.status == "running"
    assert ray.get_actor(runner_name(job.id), namespace=NAMESPACE) is not None
    cancelled = client.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled" and cancelled.fine_tuned_model is None

    total = ray.cluster_resources()["CPU"]
    deadline = time.monotonic() + 60
    while ray.available_resources().get("CPU", 0) < total - 1 and time.monotonic() < deadline:
        time.sleep(0.5)
    # Only the serving replica's CPU is still held: the training worker is gone.
    assert ray.available_resources().get("CPU", 0) == total - 1
    with pytest.raises(ValueError):
        ray.get_actor(runner_name(job.id), namespace=NAMESPACE)
    time.sleep(2)
    assert client.fine_tuning.jobs.retrieve(job.id).status == "cancelled"
    name = cancelled.model_extra["rayft"]["output_name"]
    assert name not in [m.id for m in client.models.list().data]
    assert not (server["home"] / "adapters" / name).exists()
    with pytest.raises(openai.BadRequestError):
        client.fine_tuning.jobs.cancel(job.id)  # already cancelled


def test_jobs_survive_a_restart_of_the_serving_app(client, server, trained):
    from ray import serve

    from rayft.cluster.fine_tuning import job_relpath, read_job, save_job
    from rayft.cluster.service_app import ROUTERS
    from rayft.serving.client import APP_NAME, run_app
    from rayft.trainers.storage import StorageRoot

    before = {j.id: j.status for j in client.fine_tuning.jobs.list(limit=100)}
    assert before[trained.id] == "succeeded" and len(before) >= 2
    # A job whose runner died with its node: recorded as running, no actor behind it.
    root = StorageRoot.resolve(str(server["home"]))
    orphan = {**read_job(root, trained.id), "id": "ftjob-0rphan", "status": "running"}
    save_job(root, orphan)
    assert root.path(job_relpath("ftjob-0rphan")).is_file()

    serve.delete(APP_NAME)
    run_app(server["args"], routers=ROUTERS)
    after = {j.id: j.status for j in client.fine_tuning.jobs.list(limit=100)}
    assert {k: after[k] for k in before} == before
    lost = client.fine_tuning.jobs.retrieve("ftjob-0rphan")
    assert lost.status == "failed" and lost.error.code == "runner_lost"
    page = client.fine_tuning.jobs.list(limit=1)
    assert len(page.data) == 1 and page.has_more
    chat = client.chat.completions.create(
        model=trained.fine_tuned_model,
        messages=[{"role": "user", "content": "name a blue thing"}],
        max_tokens=4,
        temperature=0,
    )
    assert chat.choices[0].message.content is not None


def test_a_job_from_a_fine_tuned_model_continues_its_adapter(client, uploaded, trained):
    job = client.fine_tuning.jobs.create(
        model=trained.fine_tuned_model, training_file=uploaded, extra_body={"rayft": NO_EVAL}
    )
    extra = job.model_extra["rayft"]
    assert job.model == trained.fine_tuned_model
    assert extra["parent_adapter"] == trained.fine_tuned_model
    model = extra["spec"]["model"]
    assert (model["name"], model["adapter"]) == ("tiny-llama", trained.fine_tuned_model)
    assert client.fine_tuning.jobs.cancel(job.id).status == "cancelled"


@contextmanager
def cluster_of(cpus: int) -> Iterator[None]:
    """Hold every CPU of the shared cluster beyond ``cpus`` (in a placement group) for the
    block, so that a scenario sized for a ``cpus``-CPU cluster plays out the same on a
    larger one (the embedded cluster's size follows the machine's cores)."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    surplus = int(ray.cluster_resources()["CPU"]) - cpus
    if surplus <= 0:
        yield
        return
    group = placement_group([{"CPU": surplus}])
    ray.get(group.ready(), timeout=60)
    try:
        yield
    finally:
        remove_placement_group(group)


def test_a_job_beyond_free_capacity_waits_in_order_holding_no_actor(client, server, uploaded):
    import ray

    from rayft.cluster.fine_tuning import NAMESPACE, runner_name

    # 4 CPUs, 1 held by the replica: a job of 1 worker takes 2 (its worker and data), so
    # the first starts and the second waits for it.
    options = {**NO_EVAL, "optim": {**RUN_OPTIONS["optim"], "max_steps": 2}}
    total = ray.cluster_resources()["CPU"]
    deadline = time.monotonic() + 60  # earlier jobs' workers give their CPUs back first
    while ray.available_resources().get("CPU", 0) < total - 1 and time.monotonic() < deadline:
        time.sleep(0.5)
    with cluster_of(4):
        first, second = (
            client.fine_tuning.jobs.create(
                model="tiny-llama",
                training_file=uploaded,
                suffix=f"q{i}",
                extra_body={"rayft": options},
            )
            for i in (1, 2)
        )
        assert first.status == "validating_files"
        assert second.status == "queued" and second.model_extra["rayft"]["queue_position"] == 1
        with pytest.raises(ValueError):
            ray.get_actor(runner_name(second.id), namespace=NAMESPACE)  # nothing on the cluster

        done = [
            wait_for(client, job.id, {"succeeded", "failed", "cancelled"})
            for job in (first, second)
        ]
    assert [job.status for job in done] == ["succeeded", "succeeded"], [j.error for j in done]
    assert done[1].created_at >= done[0].created_at
    events = [e.message for e in client.fine_tuning.jobs.list_events(second.id, limit=50).data]
    assert any("waiting for 2 CPUs" in m for m in events), events


def test_pause_checkpoints_frees_the_cpus_and_resume_finishes_the_run(client, server, uploaded):
    import ray

    from rayft.cluster.fine_tuning import NAMESPACE, runner_name
    from rayft.trainers.records import newest_checkpoint, read_events
    from rayft.trainers.storage import StorageRoot

    steps, root = 24, StorageRoot.resolve(str(server["home"]))
    options = {**NO_EVAL, "optim": {**RUN_OPTIONS["optim"], "max_steps": steps}}
    job = client.fine_tuning.jobs.create(
        model="tiny-llama", training_file=uploaded, suffix="pause", extra_body={"rayft": options}
    )
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:  # polled closely: the run must not end first
        status = client.fine_tuning.jobs.retrieve(job.id).status
        trained = any(e.get("type") == "train" for e in read_events(root, job.id))
        if trained or status not in ("validating_files", "queued"):
            break
        time.sleep(0.2)
    paused = client.fine_tuning.jobs.pause(job.id)
    assert paused.status == "paused", paused
    at = newest_checkpoint(root, job.id)
    assert at is not None and 0 < at[1] < steps  # stopped at a checkpoint, midway
    name = paused.model_extra["rayft"]["output_name"]
    assert paused.fine_tuned_model is None and not (server["home"] / "adapters" / name).exists()
    total = ray.cluster_resources()["CPU"]
    deadline = time.monotonic() + 60
    while ray.available_resources().get("CPU", 0) < total - 1 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert ray.available_resources().get("CPU", 0) == total - 1  # only the replica's is held
    with pytest.raises(ValueError):
        ray.get_actor(runner_name(job.id), namespace=NAMESPACE)
    with pytest.raises(openai.ConflictError):
        client.fine_tuning.jobs.pause(job.id)

    resumed = client.fine_tuning.jobs.resume(job.id)
    assert resumed.status in ("validating_files", "queued")
    done = wait_for(client, job.id, {"succeeded", "failed", "cancelled"})
    assert done.status == "succeeded", done.error
    events = read_events(root, job.id)
    # Every step trained once: the resumed run went on from the pause's checkpoint.
    assert [e["step"] for e in events if e.get("type") == "train"] == list(range(1, steps + 1))
    assert [e["step"] for e in events if e.get("type") == "resumed"] == [at[1]]
    messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100)]
    assert any(m.startswith("Job paused: paused after step") for m in messages), messages
    assert any(m.startswith("Job queued: resumed") for m in messages), messages
    chat = client.chat.completions.create(
        model=done.fine_tuned_model,
        messages=[{"role": "user", "content": "name a red thing"}],
        max_tokens=4,
        temperature=0,
    )
    assert chat.model == done.fine_tuned_model and chat.choices[0].message.content is not None
