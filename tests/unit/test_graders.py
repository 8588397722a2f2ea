"""Graders in OpenAI's JSON, graded in this process: string checks, templates, text
similarity against independent computations, multi formulas and what they refuse."""

from __future__ import annotations

import difflib
import math

import pytest

from rayft.trainers import metrics
from rayft.trainers.graders import (
    Formula,
    FormulaError,
    GradeContext,
    GraderError,
    JudgeError,
    JudgeReply,
    grade,
    parse_grader,
    render,
    sample_namespace,
    text_similarity,
)


def check(operation: str, input: str = "{{ sample.output_text }}", **extra) -> dict:
    return {
        "type": "string_check",
        "name": "check",
        "input": input,
        "reference": "{{ item.answer }}",
        "operation": operation,
        **extra,
    }


@pytest.mark.parametrize(
    ("operation", "sample", "answer", "score"),
    [
        ("eq", "Paris", "Paris", 1.0),
        ("eq", "paris", "Paris", 0.0),
        ("ne", "Lyon", "Paris", 1.0),
        ("ne", "Paris", "Paris", 0.0),
        ("like", "It is Paris.", "Paris", 1.0),
        ("like", "It is paris.", "Paris", 0.0),
        ("ilike", "IT IS PARIS.", "Paris", 1.0),
        ("ilike", "It is Lyon.", "Paris", 0.0),
    ],
)
def test_string_check_operations(operation, sample, answer, score):
    result = grade(parse_grader(check(operation)), sample, {"answer": answer})
    assert result.score == score and result.errors == []


def test_templates_render_item_paths_sample_fields_and_json():
    item = {"answer": "x", "nested": {"list": [{"k": "deep"}]}, "n": 3, "obj": {"a": [1, True]}}
    ns = {"item": item, "sample": sample_namespace('{"city": "Paris", "n": 2}')}
    text = (
        "{{item.answer}}|{{ item.nested.list[0].k }}|{{ item.n }}|{{ item.obj }}|"
        "{{ sample.output_json.city }}|{{ sample.output_text }}"
    )
    assert render(text, ns) == 'x|deep|3|{"a": [1, true]}|Paris|{"city": "Paris", "n": 2}'
    assert sample_namespace("not json")["output_json"] is None


def test_a_missing_template_key_scores_zero_as_an_invalid_variable_naming_the_row():
    result = grade(
        parse_grader(check("eq", input="{{ item.missing }}")),
        "x",
        {"answer": "x"},
        GradeContext(row=7),
    )
    assert result.score == 0.0
    [issue] = result.errors
    assert issue.kind == "invalid_variable_error"
    assert "row 7" in issue.details and "item.missing" in issue.details
    assert result.metadata_errors()["invalid_variable_error"] is True


@pytest.mark.parametrize(
    "template",
    ["{{ 7*7 }}", "{{ item.__class__() }}", "{{ os.environ }}", "{{ item['a'] }}", "{{ }}"],
)
def test_templates_that_are_not_paths_are_refused(template):
    with pytest.raises(GraderError) as caught:
        parse_grader(check("eq", input=template))
    assert caught.value.param == "grader.input"


def test_attribute_names_are_only_dictionary_keys():
    ns = {"item": {"answer": "x"}, "sample": sample_namespace("y")}
    with pytest.raises(ValueError, match="not in the data"):
        render("{{ item.answer.__class__ }}", ns)  # a str has no keys


def test_text_similarity_matches_the_reference_libraries():
    from nltk.translate.gleu_score import sentence_gleu
    from rouge_score import rouge_scorer

    text, reference = "the cat sat on a mat today", "the cat sat on the mat"
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge3", "rougeL"], use_stemmer=False)
    expected = scorer.score(reference, text)
    assert text_similarity(text, reference, "rouge_1") == pytest.approx(expected["rouge1"].fmeasure)
    assert text_similarity(text, reference, "rouge_3") == pytest.approx(expected["rouge3"].fmeasure)
    assert text_similarity(text, reference, "rouge_l") == pytest.approx(expected["rougeL"].fmeasure)
    assert text_similarity(text, reference, "bleu") == pytest.approx(
        metrics.bleu([text], [reference])
    )
    assert text_similarity(text, reference, "gleu") == pytest.approx(
        sentence_gleu([reference.split()], text.split())
    )
    ratio = difflib.SequenceMatcher(None, text, reference, autojunk=False).ratio()
    assert text_similarity(text, reference, "fuzzy_match") == pytest.approx(ratio, abs=0.02)
    assert text_similarity(reference, reference, "meteor") > 0.99
    assert 0 < text_similarity(text, reference, "meteor") < 1
    for metric in ("rouge_1", "rouge_5", "bleu", "gleu", "fuzzy_match", "meteor"):
        assert text_similarity("", "completely different", metric) == pytest.approx(0.0, abs=1e-6)


def test_cosine_is_refused_naming_the_metrics_to_use():
    grader = {**check("eq"), "type": "text_similarity", "evaluation_metric": "cosine"}
    grader.pop("operation")
    with pytest.raises(GraderError, match="cosine.*rouge_l"):
        parse_grader(grader)


def multi(formula: str) -> dict:
    return {
        "type": "multi",
        "name": "blend",
        "graders": {"exact": check("eq"), "contains": check("like")},
        "calculate_output": formula,
    }


def test_multi_combines_named_scores_by_its_formula():
    grader = parse_grader(multi("0.25 * exact + 0.75 * max(contains, 0) + sqrt(0)"))
    result = grade(grader, "It is Paris", {"answer": "Paris"})
    assert result.sub_scores == {"exact": 0.0, "contains": 1.0}
    assert result.score == 0.75 and result.errors == []


@pytest.mark.parametrize(
    "formula",
    [
        "__import__('os')",
        "exact.__class__",
        "[exact]",
        "exact if contains else 1",
        "open('/etc/passwd')",
        "nope + 1",
        "min(exact, key=abs)",
        "lambda: 1",
        "'a' * 3",
        "exact(",
        "(" * 300 + "1" + ")" * 300,
    ],
)
def test_multi_formulas_beyond_arithmetic_are_refused(formula):
    with pytest.raises(GraderError):
        parse_grader(multi(formula))
    with pytest.raises(FormulaError):
        Formula(formula, {"exact", "contains"})


def test_a_formula_that_fails_when_evaluated_scores_zero_and_is_reported():
    result = grade(parse_grader(multi("exact / (contains - 1)")), "Paris", {"answer": "Paris"})
    assert result.score == 0.0
    assert [issue.kind for issue in result.errors] == ["other_error"]
    big = Formula("9 ** 9 ** 9", set())
    with pytest.raises(FormulaError):
        big.evaluate({})
    assert Formula("log(exp(2))", set()).evaluate({}) == pytest.approx(2.0)
    assert math.isfinite(Formula("-abs(-3) % 2", set()).evaluate({}))


def test_model_graders_parse_openais_answers_through_a_judge():
    asked = []

    def judge(model, messages, params):
        asked.append((model, messages[-1]["content"]))
        return JudgeReply(replies.pop(0), tokens=5)

    score = {
        "type": "score_model",
        "name": "judge",
        "model": "my-adapter",
        "input": [{"role": "user", "content": "Rate {{ sample.output_text }}"}],
        "range": [0, 10],
    }
    label = {
        "type": "label_model",
        "name": "labeler",
        "model": "my-adapter",
        "input": [{"role": "user", "content": [{"type": "input_text", "text": "{{ item.q }}"}]}],
        "labels": ["good", "bad"],
        "passing_labels": ["good"],
    }
    replies = ['{"steps": [], "result": 7.5}', " 3 ", "eleven", '{"result": "good"}', "meh"]
    context = GradeContext(judge=judge)
    scores = [grade(parse_grader(score), "Paris", {}, context) for _ in range(3)]
    labels = [grade(parse_grader(label), "Paris", {"q": "ok?"}, context) for _ in range(2)]
    assert [r.score for r in scores + labels] == [7.5, 3.0, 0.0, 1.0, 0.0]
    assert scores[2].errors[0].kind == "model_grader_parse_error"
    assert labels[1].errors[0].kind == "model_grader_parse_error"
    assert asked[0] == ("my-adapter", "Rate Paris") and asked[3][1] == "ok?"
    assert scores[0].token_usage == 5 and scores[0].sampled_model_name == "my-adapter"

    def down(model, messages, params):
        raise JudgeError("my-adapter: overloaded")

    failed = grade(parse_grader(score), "x", {}, GradeContext(judge=down, row=2))
    assert failed.score == 0.0 and failed.metadata_errors()["model_grader_server_error"]
    assert "row 2" in failed.metadata_errors()["model_grader_server_error_details"]


@pytest.mark.parametrize(
    ("grader", "param"),
    [
        ({"type": "string_check", "name": "x", "input": "a", "reference": "b"}, "grader.operation"),
        ({"type": "python", "name": "x", "source": "", "extra": 1}, "grader.source"),
        ([1], "grader.type"),
        ({**check("eq"), "unknown_key": 1}, "grader.unknown_key"),
        (
            {
                "type": "label_model",
                "name": "x",
                "model": "m",
                "input": [{"role": "user", "content": "hi"}],
                "labels": ["a"],
                "passing_labels": ["b"],
            },
            "grader",
        ),
    ],
)
def test_bad_grader_json_names_the_key(grader, param):
    with pytest.raises(GraderError) as caught:
        parse_grader(grader)
    assert caught.value.param == param, caught.value.message


def test_a_training_judge_answers_as_plain_transformers_and_peft_would(published_adapters):
    # In training no server holds the judge: trainers.rollout loads it on rayft's engine, a
    # published adapter on the base its manifest names. Its greedy reply is the one plain
    # transformers (and PEFT) generate for the chat-templated messages.
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from rayft.trainers.graders import SamplingParams
    from rayft.trainers.rollout import LocalJudge
    from rayft.trainers.storage import StorageRoot

    judge = LocalJudge(StorageRoot.resolve(str(published_adapters)), dtype="float32")
    messages = [{"role": "user", "content": "name a red thing"}]
    params = SamplingParams(max_completions_tokens=6, temperature=0)
    for model in ("tiny-llama", "a1"):
        reply = judge(model, messages, params)
        engine, _ = judge._engine("tiny-llama")
        tokenizer = engine.tokenizer
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
        reference = AutoModelForCausalLM.from_pretrained(engine.model_dir, dtype=torch.float32)
        if model == "a1":
            reference = PeftModel.from_pretrained(
                reference, str(published_adapters / "adapters" / "a1")
            )
        out = reference.eval().generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False
        )[0, ids.shape[1] :]
        assert reply.text == tokenizer.decode(out, skip_special_tokens=True)
        assert 0 < reply.tokens - ids.shape[1] <= 6
    assert list(judge._engines) == ["tiny-llama"]  # the adapter ran on the base's engine

    with pytest.raises(JudgeError, match="no-such-model"):
        judge("no-such-model", messages, params)
    # Through a grader: tiny-llama's reply is no label, so the grade is a parse error, not
    # a crash, and names the row.
    label = {
        "type": "label_model",
        "name": "labeler",
        "model": "a1",
        "input": [{"role": "user", "content": "Is {{ sample.output_text }} red?"}],
        "labels": ["yes", "no"],
        "passing_labels": ["yes"],
    }
    result = grade(parse_grader(label), "an apple", {}, GradeContext(judge=judge, row=4))
    assert result.score == 0.0 and result.sampled_model_name == "a1"
    assert result.metadata_errors()["model_grader_parse_error"]
    assert [e.kind for e in result.errors] == ["model_grader_parse_error"]
    assert "row 4" in result.errors[0].details


def test_judge_calls_made_at_once_decode_in_one_batch_with_the_replies_of_calls_alone(
    published_adapters,
):
    import threading
    import time

    from rayft.trainers.graders import SamplingParams
    from rayft.trainers.rollout import LocalJudge
    from rayft.trainers.storage import StorageRoot

    judge = LocalJudge(StorageRoot.resolve(str(published_adapters)), dtype="float32")
    params = SamplingParams(max_completions_tokens=5, temperature=0)
    calls = [
        (model, [{"role": "user", "content": f"name a {color} thing"}])
        for model in ("tiny-llama", "a1", "a2")
        for color in ("red", "blue")
    ]
    alone = [judge(model, messages, params) for model, messages in calls]
    _, decoder = judge._engine("tiny-llama")
    assert decoder.batches == [1] * len(calls)

    # Hold the engine while every call queues, so that the next holder takes them all.
    replies: dict[int, object] = {}

    def call(index: int, model: str, messages: list) -> None:
        try:
            replies[index] = judge(model, messages, params)
        except JudgeError as err:
            replies[index] = err

    # A prompt beyond the judge's window fails for its caller only.
    too_long = ("a1", [{"role": "user", "content": "red " * 20_000}])
    threads = [
        threading.Thread(target=call, args=(i, *c)) for i, c in enumerate([*calls, too_long])
    ]
    with decoder._decoding:
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 30
        while len(decoder._pending) < len(threads) and time.monotonic() < deadline:
            time.sleep(0.01)
    for thread in threads:
        thread.join(60)
    assert decoder.batches[len(calls) :] == [len(calls)]  # one batch held every known judge
    assert [replies[i] for i in range(len(calls))] == alone  # the same greedy replies
    assert isinstance(replies[len(calls)], JudgeError)
    assert "window" in str(replies[len(calls)])
