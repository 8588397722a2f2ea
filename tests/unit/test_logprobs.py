"""OpenAI's legacy ``logprobs`` object, shaped from token scores (``serving.logprobs``)."""

from __future__ import annotations

import math

import pytest

from rayft.serving.logprobs import (
    LOGPROB_FLOOR,
    TokenScores,
    completion_ids,
    legacy_logprobs,
)

TEXTS = {1: "The", 2: " cat", 3: " sat", 4: " dog", 5: " mat", 9: "</s>"}


def text(token: int) -> str:
    return TEXTS[token]


def decode(ids: list[int]) -> str:
    return "".join(TEXTS[t] for t in ids if t != 9)


SCORES = TokenScores(
    logprobs=[-2.0, -0.5],
    top=[[(4, -1.0), (2, -2.0)], [(3, -0.5), (5, -1.5)]],
)


def test_echo_reports_every_token_with_a_null_first():
    out = legacy_logprobs([1, 2, 3], SCORES, text)
    assert out == {
        "tokens": ["The", " cat", " sat"],
        "token_logprobs": [None, -2.0, -0.5],
        "top_logprobs": [None, {" dog": -1.0, " cat": -2.0}, {" sat": -0.5, " mat": -1.5}],
        "text_offset": [0, 3, 7],
    }


def test_without_echo_only_the_completion_is_reported_at_its_offset():
    out = legacy_logprobs([1, 2, 3], SCORES, text, start=2, offset=7)
    assert out["tokens"] == [" sat"]
    assert out["token_logprobs"] == [-0.5]
    assert out["text_offset"] == [7]


def test_the_actual_token_joins_the_alternatives_when_it_is_not_among_them():
    scores = TokenScores(logprobs=[-3.0], top=[[(4, -1.0)]])
    out = legacy_logprobs([1, 2], scores, text)
    top = out["top_logprobs"][1]
    assert top == {" dog": -1.0, " cat": -3.0}
    # lm-eval's greedy test: the token is greedy only when it is its position's maximum.
    assert out["token_logprobs"][1] != max(top.values())


def test_a_likelier_token_of_the_same_text_keeps_that_text():
    same = {**TEXTS, 7: " cat"}
    scores = TokenScores(logprobs=[-3.0], top=[[(7, -1.0)]])
    out = legacy_logprobs([1, 2], scores, same.__getitem__)
    assert out["top_logprobs"][1] == {" cat": -1.0}


def test_no_alternatives_asked_leaves_the_actual_token_only():
    scores = TokenScores(logprobs=[-3.0], top=[[]])
    assert legacy_logprobs([1, 2], scores, text)["top_logprobs"] == [None, {" cat": -3.0}]


def test_infinite_logprobs_are_reported_as_a_finite_floor():
    scores = TokenScores(logprobs=[-math.inf], top=[[(4, math.nan)]])
    out = legacy_logprobs([1, 2], scores, text)
    assert out["token_logprobs"] == [None, LOGPROB_FLOOR]
    assert out["top_logprobs"][1] == {" dog": LOGPROB_FLOOR, " cat": LOGPROB_FLOOR}


def test_scores_that_do_not_cover_the_tokens_are_refused():
    with pytest.raises(ValueError, match="2 scored positions for 4 tokens"):
        legacy_logprobs([1, 2, 3, 4], SCORES, text)


def test_a_single_token_prompt_has_only_its_null():
    out = legacy_logprobs([1], TokenScores([], []), text)
    assert out["token_logprobs"] == [None] and out["text_offset"] == [0]


@pytest.mark.parametrize(
    ("generated", "text_out", "reason", "expected"),
    [
        ([2, 3], " cat sat", "length", [2, 3]),
        # The end-of-turn token that ended the row is reported, as OpenAI and vLLM do.
        ([2, 9], " cat", "stop", [2, 9]),
        # A stop string (" sat") cut the text: tokens past it are not reported.
        ([2, 3, 5], " cat", "stop", [2]),
        # One generated token whose text is empty stays: lm-eval drops it as the generated one.
        ([9], "", "length", [9]),
    ],
)
def test_completion_ids(generated, text_out, reason, expected):
    assert completion_ids(generated, text_out, reason, decode, {9}) == expected
