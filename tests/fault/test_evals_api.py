"""OpenAI's evals API over real HTTP, driven by the unchanged ``openai`` client.

``client.evals.*`` against the API (inference plus the fine-tuning routes, as the rayft
service mounts them) on tiny-llama on 127.0.0.1 in this process, no Ray: an eval with a
``string_check`` criterion, a ``completions`` run over an uploaded file sampled from the
served base model, a ``jsonl`` run with precomputed samples and a python grader, counts
that match the output items, another project's eval answered 404, an ``inference`` key
refused, bad bodies answered 400 naming the key, bounds answered 4xx, and deletion.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from serving_http import http_server

pytestmark = pytest.mark.fault

EXACT = {
    "type": "string_check",
    "name": "exact",
    "input": "{{ sample.output_text }}",
    "reference": "{{ item.answer }}",
    "operation": "eq",
}
CONFIG = {
    "type": "custom",
    "item_schema": {"type": "object", "properties": {"question": {}, "answer": {}}},
    "include_sample_schema": True,
}
QUESTIONS = [("sky?", "blue"), ("grass?", "green"), ("snow?", "white")]
ROWS = "".join(json.dumps({"item": {"question": q, "answer": a}}) + "\n" for q, a in QUESTIONS)
TEMPLATE = {
    "type": "template",
    "template": [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "What colour is the {{ item.question }}"},
    ],
}


@pytest.fixture(scope="module")
def api(tmp_path_factory, published_adapters: Path, tiny_model_dir: Path) -> Iterator:
    import openai
    from harness import copy_registry

    from rayft.cluster.fine_tuning_api import router as fine_tuning_router
    from rayft.serving.auth import KeyStore
    from rayft.serving.engine import ModelEngine
    from rayft.serving.openai_api import create_api
    from rayft.serving.service import Limits, ModelService
    from rayft.trainers.job_limits import JobLimits
    from rayft.trainers.manifest import ArtifactManifest

    root = copy_registry(published_adapters, tmp_path_factory.mktemp("evals") / "root")
    # a1 is project beta's; a2 stays shared.
    ArtifactManifest(kind="adapter", base_model="tiny-llama", project="beta").write(
        root / "adapters" / "a1"
    )
    store = KeyStore(str(root))
    keys = {
        name: store.create(project, role)[1]
        for name, project, role in (
            ("alpha", "alpha", "member"),
            ("beta", "beta", "member"),
            ("infer", "alpha", "inference"),
        )
    }
    engine = ModelEngine("tiny-llama", storage=str(root), dtype="float32")
    bounds = JobLimits(
        eval_max_rows=5,
        eval_max_criteria=3,
        eval_max_completion_tokens=4,
        eval_max_concurrent_runs=2,
    )
    limits = Limits(max_tokens_limit=8, max_prompt_tokens=256, job_limits=bounds)
    service = ModelService(engine, limits)
    with http_server(create_api(service, [fine_tuning_router])) as url:

        def client(name: str) -> openai.OpenAI:
            return openai.OpenAI(base_url=f"{url}/v1", api_key=keys[name], max_retries=0)

        yield SimpleNamespace(
            url=url,
            root=str(root),
            keys=keys,
            alpha=client("alpha"),
            beta=client("beta"),
            infer=client("infer"),
        )
    service.close()


def wait_ended(client, eval_id: str, run_id: str, timeout_s: float = 60) -> object:
    deadline = time.monotonic() + timeout_s
    while True:
        run = client.evals.runs.retrieve(run_id, eval_id=eval_id)
        if run.status not in ("queued", "in_progress") or time.monotonic() > deadline:
            return run
        time.sleep(0.1)


def test_completions_run_on_the_served_model_counts_what_its_items_show(api):
    client = api.alpha
    evaluation = client.evals.create(
        name="colours", data_source_config=CONFIG, testing_criteria=[EXACT]
    )
    assert evaluation.object == "eval" and evaluation.name == "colours"
    assert evaluation.data_source_config.type == "custom"
    assert evaluation.testing_criteria[0].type == "string_check"
    upload = client.files.create(file=("colours.jsonl", ROWS.encode()), purpose="evals")
    run = client.evals.runs.create(
        evaluation.id,
        name="base",
        data_source={
            "type": "completions",
            "model": "tiny-llama",
            "source": {"type": "file_id", "id": upload.id},
            "input_messages": TEMPLATE,
            "sampling_params": {"max_completion_tokens": 3, "temperature": 0.0, "seed": 7},
        },
    )
    assert run.object == "eval.run" and run.status in ("queued", "in_progress", "completed")
    run = wait_ended(client, evaluation.id, run.id)
    assert run.status == "completed", run.error
    items = list(client.evals.runs.output_items.list(run.id, eval_id=evaluation.id))
    assert [i.datasource_item_id for i in items] == [0, 1, 2]
    for item, (question, answer) in zip(items, QUESTIONS, strict=True):
        assert item.datasource_item == {"question": question, "answer": answer}
        assert item.sample.input[-1].content == f"What colour is the {question}"
        text = item.sample.output[0].content
        assert 1 <= item.sample.usage.completion_tokens <= 3
        assert item.results[0].name == "exact"
        assert item.results[0].passed is (text == answer) and item.status in ("pass", "fail")
    passed = sum(i.status == "pass" for i in items)
    counts = run.result_counts
    assert (counts.total, counts.passed, counts.failed, counts.errored) == (
        3,
        passed,
        3 - passed,
        0,
    )
    assert run.per_testing_criteria_results[0].testing_criteria == "exact"
    assert run.per_testing_criteria_results[0].passed == passed
    assert run.per_model_usage[0].run_model_name == "tiny-llama"
    assert run.per_model_usage[0].invocation_count == 3
    one = client.evals.runs.output_items.retrieve(items[1].id, eval_id=evaluation.id, run_id=run.id)
    assert one.id == items[1].id
    listed = client.evals.runs.list(evaluation.id)
    assert [r.id for r in listed.data] == [run.id]


def test_jsonl_run_grades_given_samples_with_a_python_grader(api):
    client = api.alpha
    source = "def grade(sample, item):\n    return 1.0 if sample['output_text'] == item['answer'] else 0.2\n"
    python = {"type": "python", "name": "py", "source": source, "pass_threshold": 0.5}
    broken = {"type": "python", "name": "broken", "source": "def grade(s, i):\n    return i['x']\n"}
    evaluation = client.evals.create(
        data_source_config=CONFIG, testing_criteria=[EXACT, python, broken]
    )
    rows = [
        {"item": {"answer": "blue"}, "sample": {"output_text": "blue"}},
        {"item": {"answer": "green", "x": 1.0}, "sample": {"output_text": "red"}},
        {"item": {"answer": "white", "x": 1.0}, "sample": {"output_text": "white"}},
    ]
    run = client.evals.runs.create(
        evaluation.id,
        data_source={"type": "jsonl", "source": {"type": "file_content", "content": rows}},
    )
    run = wait_ended(client, evaluation.id, run.id)
    assert run.status == "completed", run.error
    counts = run.result_counts
    # Row 0 passes string_check and py but its broken grader raises: errored.
    # Row 1 fails both. Row 2 passes all three.
    assert (counts.total, counts.passed, counts.failed, counts.errored) == (3, 1, 1, 1)
    per = {r.testing_criteria: (r.passed, r.failed) for r in run.per_testing_criteria_results}
    assert per == {"exact": (2, 1), "py": (2, 1), "broken": (2, 1)}
    items = client.evals.runs.output_items.list(run.id, eval_id=evaluation.id)
    assert [i.status for i in items.data] == ["error", "fail", "pass"]
    scores = {r.name: r.score for r in items.data[1].results}
    assert scores == {"exact": 0.0, "py": 0.2, "broken": 1.0}
    error = items.data[0].results[2]
    assert error.name == "broken" and not error.passed and "KeyError" in error.errors[0]
    passing = client.evals.runs.output_items.list(run.id, eval_id=evaluation.id, status="pass")
    assert [i.datasource_item_id for i in passing.data] == [2]


def test_another_projects_eval_is_not_found_and_inference_keys_are_refused(api):
    import openai

    evaluation = api.alpha.evals.create(data_source_config=CONFIG, testing_criteria=[EXACT])
    for call in (
        lambda: api.beta.evals.retrieve(evaluation.id),
        lambda: api.beta.evals.delete(evaluation.id),
        lambda: api.beta.evals.runs.list(evaluation.id),
        lambda: api.beta.evals.update(evaluation.id, name="mine"),
    ):
        with pytest.raises(openai.NotFoundError):
            call()
    assert evaluation.id not in [e.id for e in api.beta.evals.list()]
    assert evaluation.id in [e.id for e in api.alpha.evals.list(limit=100)]
    with pytest.raises(openai.PermissionDeniedError):
        api.infer.evals.retrieve(evaluation.id)
    with pytest.raises(openai.PermissionDeniedError):
        api.infer.evals.create(data_source_config=CONFIG, testing_criteria=[EXACT])


def test_bad_bodies_are_400_naming_the_key(api):
    import openai

    client = api.alpha
    for criteria, config, param in (
        ([{**EXACT, "operation": "regex"}], CONFIG, "testing_criteria.0.operation"),
        ([{**EXACT, "type": "multi"}], CONFIG, "testing_criteria.0.type"),
        ([EXACT, EXACT], CONFIG, "testing_criteria.1.name"),
        (
            [{**EXACT, "input": "{{ item.__class__ }} {{ 7*7 }}"}],
            CONFIG,
            "testing_criteria.0.input",
        ),
        ([EXACT], {"type": "logs"}, "data_source_config.type"),
        ([EXACT], {"type": "custom"}, "data_source_config.item_schema"),
    ):
        with pytest.raises(openai.BadRequestError) as caught:
            client.evals.create(data_source_config=config, testing_criteria=criteria)
        assert caught.value.body["param"] == param, caught.value.body
    evaluation = client.evals.create(data_source_config=CONFIG, testing_criteria=[EXACT])
    content = {"type": "file_content", "content": [{"item": {"answer": "a"}}]}
    completions = {"type": "completions", "model": "tiny-llama", "source": content}
    for source, param in (
        ({"type": "responses", "source": content}, "data_source.type"),
        (
            {
                **completions,
                "input_messages": {
                    "type": "template",
                    "template": [{"role": "user", "content": "{{ sample.output_text }}"}],
                },
            },
            "data_source.input_messages.template.0.content",
        ),
        (
            {**completions, "input_messages": TEMPLATE, "sampling_params": {"temperature": 9}},
            "data_source.sampling_params.temperature",
        ),
        (
            {"type": "jsonl", "source": {"type": "file_id", "id": "file-" + "0" * 24}},
            "data_source.source.id",
        ),
        ({"type": "jsonl", "source": content}, "data_source.source"),  # no sample to grade
    ):
        with pytest.raises(openai.BadRequestError) as caught:
            client.evals.runs.create(evaluation.id, data_source=source)
        assert caught.value.body["param"] == param, caught.value.body
    with pytest.raises(openai.NotFoundError) as caught:
        client.evals.runs.create(
            evaluation.id, data_source={**completions, "model": "nope", "input_messages": TEMPLATE}
        )
    assert caught.value.body["param"] == "data_source.model"
    answer = httpx.post(
        f"{api.url}/v1/evals",
        content=b"{",
        headers={"Authorization": f"Bearer {api.keys['alpha']}"},
    )
    assert answer.status_code == 400 and set(answer.json()["error"]) >= {"message", "code"}
    with pytest.raises(openai.BadRequestError) as caught:
        client.files.create(file=("x.jsonl", b'{"question": "no item"}\n'), purpose="evals")
    assert caught.value.body["param"] == "file" and "x.jsonl:1" in caught.value.body["message"]


def test_limits_are_refused_with_a_4xx_naming_them(api):
    import openai

    client = api.alpha
    with pytest.raises(openai.BadRequestError) as caught:
        client.evals.create(
            data_source_config=CONFIG,
            testing_criteria=[{**EXACT, "name": f"c{i}"} for i in range(4)],
        )
    assert caught.value.body["code"] == "eval_limit_exceeded"
    assert caught.value.body["param"] == "testing_criteria"
    evaluation = client.evals.create(data_source_config=CONFIG, testing_criteria=[EXACT])
    row = {"item": {"answer": "a"}, "sample": {"output_text": "a"}}
    for source, param in (
        (
            {"type": "jsonl", "source": {"type": "file_content", "content": [row] * 6}},
            "data_source.source.content",
        ),
        (
            {
                "type": "completions",
                "model": "tiny-llama",
                "source": {"type": "file_content", "content": [row]},
                "input_messages": TEMPLATE,
                "sampling_params": {"max_completion_tokens": 5},
            },
            "data_source.sampling_params.max_completion_tokens",
        ),
    ):
        with pytest.raises(openai.BadRequestError) as caught:
            client.evals.runs.create(evaluation.id, data_source=source)
        assert caught.value.body["code"] == "eval_limit_exceeded"
        assert caught.value.body["param"] == param
    big = "".join(json.dumps(row) + "\n" for _ in range(6)).encode()
    upload = client.files.create(file=("big.jsonl", big), purpose="evals")
    with pytest.raises(openai.BadRequestError) as caught:
        client.evals.runs.create(
            evaluation.id,
            data_source={"type": "jsonl", "source": {"type": "file_id", "id": upload.id}},
        )
    assert caught.value.body["code"] == "eval_limit_exceeded"


def test_update_cancel_and_delete(api):
    import openai

    client = api.alpha
    evaluation = client.evals.create(data_source_config=CONFIG, testing_criteria=[EXACT])
    updated = client.evals.update(evaluation.id, name="renamed", metadata={"team": "a"})
    assert (updated.name, updated.metadata) == ("renamed", {"team": "a"})
    assert client.evals.retrieve(evaluation.id).name == "renamed"
    row = {"item": {"answer": "a"}, "sample": {"output_text": "a"}}
    run = client.evals.runs.create(
        evaluation.id,
        data_source={"type": "jsonl", "source": {"type": "file_content", "content": [row]}},
    )
    run = wait_ended(client, evaluation.id, run.id)
    canceled = client.evals.runs.cancel(run.id, eval_id=evaluation.id)
    assert canceled.status == "completed"  # an ended run stays as it ended
    gone = client.evals.runs.delete(run.id, eval_id=evaluation.id)
    assert (gone.deleted, gone.run_id) == (True, run.id)
    with pytest.raises(openai.NotFoundError):
        client.evals.runs.retrieve(run.id, eval_id=evaluation.id)
    deleted = client.evals.delete(evaluation.id)
    assert (deleted.deleted, deleted.eval_id) == (True, evaluation.id)
    with pytest.raises(openai.NotFoundError):
        client.evals.retrieve(evaluation.id)


def test_a_run_whose_worker_is_gone_reads_as_failed(api):
    from rayft.cluster.eval_store import EvalStore
    from rayft.trainers.storage import StorageRoot

    client = api.alpha
    evaluation = client.evals.create(data_source_config=CONFIG, testing_criteria=[EXACT])
    row = {"item": {"answer": "a"}, "sample": {"output_text": "a"}}
    run = client.evals.runs.create(
        evaluation.id,
        data_source={"type": "jsonl", "source": {"type": "file_content", "content": [row]}},
    )
    wait_ended(client, evaluation.id, run.id)
    # What a replica that stopped mid-run leaves: an in_progress record nobody computes.
    store = EvalStore(StorageRoot.resolve(api.root))
    record = store.get_run(evaluation.id, run.id)
    store.save_run(record.model_copy(update={"status": "in_progress"}))
    failed = client.evals.runs.retrieve(run.id, eval_id=evaluation.id)
    assert failed.status == "failed" and failed.error.code == "run_interrupted"
    assert store.get_run(evaluation.id, run.id).status == "failed"  # stored so


def test_runs_past_the_concurrent_bound_get_429_and_a_cancelled_run_keeps_its_items(api):
    import openai

    client = api.alpha
    slow = {
        "type": "python",
        "name": "slow",
        "source": "import time\ndef grade(sample, item):\n    time.sleep(0.4)\n    return 1.0\n",
    }
    evaluation = client.evals.create(data_source_config=CONFIG, testing_criteria=[slow])
    row = {"item": {"answer": "a"}, "sample": {"output_text": "a"}}
    source = {"type": "jsonl", "source": {"type": "file_content", "content": [row] * 5}}
    runs = [client.evals.runs.create(evaluation.id, data_source=source) for _ in range(2)]
    with pytest.raises(openai.RateLimitError) as caught:
        client.evals.runs.create(evaluation.id, data_source=source)
    assert caught.value.body["code"] == "too_many_eval_runs"
    canceled = client.evals.runs.cancel(runs[0].id, eval_id=evaluation.id)
    assert canceled.status == "canceled"
    items = client.evals.runs.output_items.list(runs[0].id, eval_id=evaluation.id).data
    assert canceled.result_counts.total == len(items) < 5
    assert wait_ended(client, evaluation.id, runs[1].id).status == "completed"
    assert client.evals.runs.retrieve(runs[0].id, eval_id=evaluation.id).status == "canceled"
    # The bound is of runs computing now: with both ended, a new one starts.
    third = client.evals.runs.create(evaluation.id, data_source=source)
    client.evals.delete(evaluation.id)  # cancels it first
    with pytest.raises(openai.NotFoundError):
        client.evals.runs.retrieve(third.id, eval_id=evaluation.id)


def test_a_label_model_criterion_asks_the_served_model_as_judge(api):
    client = api.alpha
    judge = {
        "type": "label_model",
        "name": "judge",
        "model": "tiny-llama",
        "input": [{"role": "user", "content": "Is {{ sample.output_text }} {{ item.answer }}?"}],
        "labels": ["yes", "no"],
        "passing_labels": ["yes"],
    }
    evaluation = client.evals.create(data_source_config=CONFIG, testing_criteria=[judge])
    row = {"item": {"answer": "blue"}, "sample": {"output_text": "blue"}}
    run = client.evals.runs.create(
        evaluation.id,
        data_source={"type": "jsonl", "source": {"type": "file_content", "content": [row]}},
    )
    run = wait_ended(client, evaluation.id, run.id)
    assert run.status == "completed", run.error
    (item,) = client.evals.runs.output_items.list(run.id, eval_id=evaluation.id).data
    # tiny-llama is random: its answer is rarely a label, which errors the item, not the run.
    if item.status == "error":
        assert "the judge answered" in item.results[0].errors[0]
    usage = {u.run_model_name: u for u in run.per_model_usage}
    assert usage["tiny-llama"].invocation_count == 1 and usage["tiny-llama"].total_tokens > 0


def test_a_completions_run_samples_an_adapter_the_key_may_see(api):
    import openai

    client = api.alpha
    evaluation = client.evals.create(data_source_config=CONFIG, testing_criteria=[EXACT])
    chat = [{"role": "user", "content": "Colour of the sky?"}]
    data = {
        "type": "completions",
        "model": "a2",
        "source": {"type": "file_content", "content": [{"item": {"chat": chat, "answer": "b"}}]},
        "input_messages": {"type": "item_reference", "item_reference": "item.chat"},
        "sampling_params": {"max_completion_tokens": 2, "seed": 1},
    }
    run = wait_ended(
        client, evaluation.id, client.evals.runs.create(evaluation.id, data_source=data).id
    )
    assert run.status == "completed" and run.model == "a2", run.error
    (item,) = client.evals.runs.output_items.list(run.id, eval_id=evaluation.id).data
    assert item.sample.model == "a2" and item.sample.input[0].content == "Colour of the sky?"
    assert item.sample.usage.completion_tokens >= 1 and item.status in ("pass", "fail")
    # beta's adapter is not found for alpha's key, as if it did not exist.
    with pytest.raises(openai.NotFoundError) as caught:
        client.evals.runs.create(evaluation.id, data_source={**data, "model": "a1"})
    assert caught.value.body["param"] == "data_source.model"
