"""The pure parts of the evals API: bodies, rows, prompts, pass/fail and counting."""

from __future__ import annotations

import json
import time

import pytest

from rayft.cluster.eval_data import (
    ItemReferenceInput,
    MessageError,
    TemplateInput,
    parse_eval,
    parse_run,
    render_messages,
    row_of,
    scan_eval_rows,
)
from rayft.cluster.eval_results import Tally, criterion_result, item_status, passes
from rayft.cluster.eval_runner import REPLICA, STALE_AFTER_S, EvalRuns, settle
from rayft.cluster.eval_store import RunRecord
from rayft.serving.errors import BadRequest
from rayft.trainers.data import DataError
from rayft.trainers.graders import GradeIssue, GradeResult, parse_grader

EXACT = {
    "type": "string_check",
    "name": "exact",
    "input": "{{ sample.output_text }}",
    "reference": "{{ item.answer }}",
    "operation": "eq",
}
CONFIG = {"type": "custom", "item_schema": {"type": "object"}}


def grader(**fields):
    return parse_grader(fields)


def test_pass_semantics_per_grader_type():
    check = grader(**EXACT)
    assert passes(check, 1.0) and not passes(check, 0.0)
    label = grader(
        type="label_model",
        name="l",
        model="m",
        input=[{"role": "user", "content": "x"}],
        labels=["yes", "no"],
        passing_labels=["yes"],
    )
    assert passes(label, 1.0) and not passes(label, 0.0)
    similar = grader(
        type="text_similarity",
        name="t",
        input="a",
        reference="b",
        evaluation_metric="fuzzy_match",
        pass_threshold=0.8,
    )
    assert passes(similar, 0.8) and not passes(similar, 0.79)
    python = grader(type="python", name="p", source="def grade(s, i):\n    return 1")
    assert passes(python, 0.5) and not passes(python, 0.49)  # no threshold: the middle
    scored = grader(
        type="score_model",
        name="s",
        model="m",
        input=[{"role": "user", "content": "x"}],
        range=[1, 7],
    )
    assert passes(scored, 4) and not passes(scored, 3.9)
    assert passes(scored.model_copy(update={"pass_threshold": 6.0}), 6.0)
    assert not passes(scored.model_copy(update={"pass_threshold": 6.0}), 5.0)


def test_an_errored_grade_neither_passes_nor_fails_and_counts_as_error():
    check = grader(**EXACT)
    ok = criterion_result(check, GradeResult(score=1.0))
    bad = criterion_result(
        check,
        GradeResult(score=0.0, errors=[GradeIssue("invalid_variable_error", "no 'x'", "exact")]),
    )
    miss = criterion_result(check, GradeResult(score=0.0))
    assert (ok.passed, bad.passed, bad.errored, miss.passed) == (True, False, True, False)
    assert item_status([ok], sample_failed=False) == "pass"
    assert item_status([ok, miss], sample_failed=False) == "fail"
    assert item_status([ok, bad], sample_failed=False) == "error"
    assert item_status([], sample_failed=True) == "error"
    tally = Tally(["exact", "other"])
    tally.add("pass", [ok, ok.__class__(**{**ok.__dict__, "name": "other"})])
    tally.add("fail", [miss, ok.__class__(**{**ok.__dict__, "name": "other"})])
    tally.add("error", [bad, miss.__class__(**{**miss.__dict__, "name": "other"})])
    tally.add("error", [])  # a sample that could not be made
    assert tally.result_counts() == {"total": 4, "passed": 1, "failed": 1, "errored": 2}
    assert tally.per_testing_criteria_results() == [
        {"testing_criteria": "exact", "passed": 1, "failed": 2},
        {"testing_criteria": "other", "passed": 2, "failed": 1},
    ]


def test_template_messages_fill_item_fields_and_send_developer_as_system():
    inputs = TemplateInput.model_validate(
        {
            "type": "template",
            "template": [
                {"role": "developer", "content": "Be brief."},
                {
                    "role": "user",
                    "type": "message",
                    "content": {"type": "input_text", "text": "Q: {{ item.q }} ({{item.n}})"},
                },
            ],
        }
    )
    messages = render_messages(inputs, {"q": "sky?", "n": [1, 2]})
    assert messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Q: sky? ([1, 2])"},
    ]
    with pytest.raises(MessageError, match="not in the data"):
        render_messages(inputs, {"q": "sky?"})


def test_item_reference_names_a_list_of_messages_in_the_item():
    reference = ItemReferenceInput(type="item_reference", item_reference="item.messages")
    chat = [{"role": "user", "content": "hi"}]
    assert render_messages(reference, {"messages": chat}) == chat
    braced = ItemReferenceInput(type="item_reference", item_reference="{{ item.messages }}")
    assert render_messages(braced, {"messages": chat}) == chat
    for item in ({"messages": "hi"}, {"messages": [{"role": "robot", "content": "x"}]}, {}):
        with pytest.raises(MessageError):
            render_messages(reference, item)


def test_eval_body_errors_name_the_key():
    create, graders = parse_eval({"data_source_config": CONFIG, "testing_criteria": [EXACT]}, 4)
    assert graders[0].name == "exact" and create.data_source_config.type == "custom"
    cases = [
        ({"testing_criteria": [EXACT]}, "data_source_config"),
        ({"data_source_config": CONFIG, "testing_criteria": []}, "testing_criteria"),
        ({"data_source_config": CONFIG, "testing_criteria": [EXACT], "x": 1}, "x"),
        (
            {"data_source_config": CONFIG, "testing_criteria": [{**EXACT, "reference": 3}]},
            "testing_criteria.0.reference",
        ),
        (
            {
                "data_source_config": CONFIG,
                "testing_criteria": [
                    {**EXACT, "type": "text_similarity", "evaluation_metric": "bleu"}
                ],
            },
            "testing_criteria.0.operation",
        ),
        (
            {"data_source_config": CONFIG, "testing_criteria": [EXACT], "metadata": {"k": 1}},
            "metadata.k",
        ),
    ]
    for body, param in cases:
        with pytest.raises(BadRequest) as caught:
            parse_eval(body, 4)
        assert caught.value.param == param, (body, caught.value.message)
    similarity = {k: v for k, v in EXACT.items() if k != "operation"}
    similarity |= {"type": "text_similarity", "evaluation_metric": "bleu"}
    with pytest.raises(BadRequest) as caught:
        parse_eval({"data_source_config": CONFIG, "testing_criteria": [similarity]}, 4)
    assert caught.value.param == "testing_criteria.0.pass_threshold"


def test_run_body_errors_name_the_key():
    content = {"type": "file_content", "content": [{"item": {"a": 1}}]}
    run = parse_run({"data_source": {"type": "jsonl", "source": content}})
    assert run.data_source.type == "jsonl"
    completions = {"type": "completions", "model": "m", "source": content}
    for body, param in (
        (
            {"data_source": {"type": "jsonl", "source": {"type": "file_id"}}},
            "data_source.source.id",
        ),
        ({"data_source": completions}, "data_source.input_messages"),
        (
            {
                "data_source": {
                    **completions,
                    "input_messages": {"type": "item_reference", "item_reference": "sample.x"},
                }
            },
            "data_source.input_messages.item_reference",
        ),
        (
            {
                "data_source": {
                    **completions,
                    "input_messages": {"type": "item_reference", "item_reference": "item.m"},
                    "sampling_params": {"tools": []},
                }
            },
            "data_source.sampling_params.tools",
        ),
        (
            {"data_source": {"type": "completions", "source": {"type": "stored_completions"}}},
            "data_source.source.type",
        ),
    ):
        with pytest.raises(BadRequest) as caught:
            parse_run(body)
        assert caught.value.param == param, (body, caught.value.message)


def test_rows_are_item_and_sample_or_a_whole_object_as_the_item():
    row = row_of({"item": {"a": 1}, "sample": {"output_text": "x"}})
    assert (row.item, row.output_text) == ({"a": 1}, "x")
    choices = row_of({"item": {}, "sample": {"choices": [{"message": {"content": "y"}}]}})
    assert choices.output_text == "y"
    chat = row_of({"messages": [{"role": "user", "content": "hi"}]})
    assert chat.item == {"messages": [{"role": "user", "content": "hi"}]} and chat.sample is None
    with pytest.raises(ValueError):
        row_of({"item": "x"})
    with pytest.raises(ValueError):
        row_of([1])


def test_an_evals_upload_is_checked_row_by_row(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"item": {"a": 1}}) + "\n\n" + json.dumps({"item": {}}) + "\n")
    report = scan_eval_rows(good, ".jsonl")
    assert (report.rows, report.blank_lines, report.format) == (2, 1, "evals")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"item": {"a": 1}}) + "\n" + json.dumps({"messages": []}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2"):
        scan_eval_rows(bad, ".jsonl")
    for name, line in (
        ("broken", "{not json"),
        ("deep", '{"item": ' * 5000 + "1" + "}" * 5000),
        ("digits", '{"item": {"n": ' + "9" * 5000 + "}}"),
    ):
        path = tmp_path / f"{name}.jsonl"
        path.write_text(line + "\n")
        with pytest.raises(DataError, match=rf"{name}.jsonl:1"):
            scan_eval_rows(path, ".jsonl")


def _run(**fields) -> RunRecord:
    base = {"id": "evalrun_" + "0" * 24, "eval_id": "eval_" + "0" * 24, "created_at": 0}
    return RunRecord(name="r", data_source={}, **(base | fields))


def test_a_run_whose_worker_is_gone_is_settled_as_failed():
    runs, now = EvalRuns(2), time.time()
    # Started on this replica, no task computes it (the replica restarted): failed at once.
    mine = _run(status="in_progress", replica=REPLICA, heartbeat_at=now, deadline_at=now + 60)
    failed = settle(mine, runs, now)
    assert failed is not None and failed.status == "failed"
    assert failed.error["code"] == "run_interrupted"
    # Another replica's: alive while it writes its heartbeat, gone once it stops.
    theirs = mine.model_copy(update={"replica": "other:1:x"})
    assert settle(theirs, runs, now + 1) is None
    assert settle(theirs, runs, now + STALE_AFTER_S + 1).status == "failed"
    # An ended run is never touched.
    assert settle(_run(status="completed", replica=REPLICA), runs, now) is None
