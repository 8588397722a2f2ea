"""OpenAI's legacy ``logprobs`` object of ``POST /v1/completions``, built from token scores.

A completion with ``logprobs: k`` (and, with ``echo: true``, its prompt) is scored by one
teacher-forced pass over prompt + completion (``ModelEngine.token_scores``). This module
turns those scores into the object OpenAI's legacy completions return, which evaluation
harnesses such as lm-evaluation-harness read::

    {"tokens": ["The", " cat"], "token_logprobs": [null, -2.1],
     "top_logprobs": [null, {" cat": -2.1, " dog": -1.7}], "text_offset": [0, 3]}

The first token of an echoed prompt has nothing before it, so its log-probability and
its alternatives are ``null``. ``top_logprobs`` maps the text of each of the ``k``
likeliest tokens to its log-probability, best first, plus the token actually there (so a
position holds at most ``k + 1`` entries, as OpenAI's do). ``text_offset`` is where each
token's text starts, counting the texts of the tokens before it: in the prompt + completion
text, as vLLM counts it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

MAX_LOGPROBS = 5
"""The most alternatives per position a request may ask for (``logprobs``), as OpenAI's."""

LOGPROB_FLOOR = -9999.0
"""Reported in place of ``-inf`` (a token of zero probability): JSON has no infinity."""


@dataclass(frozen=True)
class TokenScores:
    """How likely a model found each token of one sequence, given the tokens before it.

    Attributes:
        logprobs: ``log p(ids[t] | ids[:t])`` for ``t = 1 .. len(ids) - 1``.
        top: At the same positions, the likeliest tokens as ``(token id, logprob)``,
            best first (empty lists when no alternatives were asked for).
    """

    logprobs: list[float]
    top: list[list[tuple[int, float]]]


def legacy_logprobs(
    ids: list[int],
    scores: TokenScores,
    token_text: Callable[[int], str],
    start: int = 0,
    offset: int = 0,
) -> dict[str, Any]:
    """The ``logprobs`` object of one choice: tokens ``ids[start:]`` and their scores.

    Args:
        ids: The whole scored sequence, prompt then completion.
        scores: Its scores (``len(ids) - 1`` positions).
        token_text: The text of one token id.
        start: The first token reported: 0 with ``echo``, the prompt's length without.
        offset: ``text_offset`` of that first token (0 with ``echo``; the prompt text's
            length without, as OpenAI counts it).

    Raises:
        ValueError: ``scores`` does not cover ``ids``.
    """
    if len(scores.logprobs) != max(len(ids) - 1, 0) or len(scores.top) != len(scores.logprobs):
        raise ValueError(f"{len(scores.logprobs)} scored positions for {len(ids)} tokens")
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []
    for t in range(start, len(ids)):
        text = token_text(ids[t])
        tokens.append(text)
        text_offset.append(offset)
        offset += len(text)
        if t == 0:
            token_logprobs.append(None)
            top_logprobs.append(None)
            continue
        logprob = finite(scores.logprobs[t - 1])
        token_logprobs.append(logprob)
        top_logprobs.append(_alternatives(scores.top[t - 1], text, logprob, token_text))
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top_logprobs,
        "text_offset": text_offset,
    }


def _alternatives(
    top: list[tuple[int, float]], text: str, logprob: float, token_text: Callable[[int], str]
) -> dict[str, float]:
    # Two tokens may share a text: the likelier one keeps it, so a token that was not the
    # likeliest never shows as the maximum of its position.
    alternatives: dict[str, float] = {}
    for token, value in top:
        alternatives.setdefault(token_text(token), finite(value))
    alternatives.setdefault(text, logprob)
    return alternatives


def finite(logprob: float) -> float:
    """``logprob``, with ``-inf`` (and NaN) reported as :data:`LOGPROB_FLOOR`."""
    return logprob if math.isfinite(logprob) else LOGPROB_FLOOR


def completion_ids(
    generated: list[int],
    text: str,
    finish_reason: str | None,
    decode: Callable[[list[int]], str],
    stop_ids: set[int],
) -> list[int]:
    """The generated tokens a choice reports in its ``logprobs``.

    Every sampled token, the end-of-turn token that ended the row included (as OpenAI and
    vLLM report it: lm-eval drops the last reported token of an echoed prompt as the
    generated one), except tokens past a stop string that cut the text short.

    Args:
        generated: Every token the row sampled, in order.
        text: The choice's text.
        finish_reason: Why the row ended.
        decode: Token ids to text, as the engine decodes completions.
        stop_ids: The engine's end-of-turn token ids.
    """
    ids = list(generated)
    if finish_reason != "stop" or not ids or ids[-1] in stop_ids:
        return ids
    while ids and len(decode(ids[:-1])) >= len(text):
        ids.pop()
    return ids
