"""Text-generation metrics: exact match, token F1, ROUGE-1/2/L and corpus BLEU.

Functions of strings, with no Ray, torch or model involved, shared by training-time
evaluation (``eval.metrics``), the serving endpoint's ``/v1/evaluations`` and
``rayft eval``.

* ``exact_match`` and ``token_f1`` follow the SQuAD v1.1 evaluation script: lower-case,
  strip punctuation and the articles a/an/the, collapse whitespace.
* ``rouge_1``, ``rouge_2`` and ``rouge_l`` are the F-measures of Google's ``rouge-score``
  package (``RougeScorer`` without stemming), averaged over rows.
* ``bleu`` is ``sacrebleu.corpus_bleu`` (BLEU-4, ``13a`` tokenisation, exponential
  smoothing), divided by 100 so every metric lies in [0, 1]; papers quote it times 100.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

GENERATION_METRICS = ("exact_match", "token_f1", "rouge_1", "rouge_2", "rouge_l", "bleu")

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)
# Our metric names -> rouge-score's.
_ROUGE_TYPES = {"rouge_1": "rouge1", "rouge_2": "rouge2", "rouge_l": "rougeL"}


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower-case, drop punctuation and articles, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when prediction and reference are equal after SQuAD normalisation, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD token-overlap F1 between a prediction and a reference.

    Returns:
        The harmonic mean of token precision and recall over the multiset of shared
        normalised tokens; when either side has no tokens, 1.0 if both are empty else 0.0.
    """
    pred = normalize_answer(prediction).split()
    ref = normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    shared = sum((Counter(pred) & Counter(ref)).values())
    if shared == 0:
        return 0.0
    precision = shared / len(pred)
    recall = shared / len(ref)
    return 2 * precision * recall / (precision + recall)


@lru_cache(maxsize=1)
def _rouge_scorer() -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(list(_ROUGE_TYPES.values()), use_stemmer=False)


def rouge(prediction: str, reference: str) -> dict[str, float]:
    """ROUGE-1, ROUGE-2 and ROUGE-L F-measures of one prediction against its reference.

    Computed by ``rouge_score.rouge_scorer.RougeScorer`` (lower-cased alphanumeric tokens,
    no stemming); a text with no tokens scores 0.0 against anything, as in that package.
    """
    scores = _rouge_scorer().score(reference, prediction)
    return {name: float(scores[kind].fmeasure) for name, kind in _ROUGE_TYPES.items()}


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (longest common subsequence) from ``rouge-score``."""
    return rouge(prediction, reference)["rouge_l"]


def bleu(predictions: Sequence[str], references: Sequence[str], smooth: bool = True) -> float:
    """Corpus BLEU-4 of predictions against one reference each, by ``sacrebleu``, in [0, 1].

    Args:
        predictions: Generated texts.
        references: One reference per prediction.
        smooth: Exponential smoothing of zero n-gram counts (sacrebleu's default), so a
            short corpus with no 4-gram match still scores above zero; ``False`` is
            unsmoothed BLEU.

    Raises:
        ValueError: ``predictions`` and ``references`` differ in length.
    """
    if len(predictions) != len(references):
        raise ValueError(
            f"bleu needs one reference per prediction, got {len(predictions)} predictions "
            f"and {len(references)} references"
        )
    import sacrebleu

    result = sacrebleu.corpus_bleu(
        list(predictions), [list(references)], smooth_method="exp" if smooth else "none"
    )
    return float(result.score) / 100.0


def generation_metrics(
    predictions: Sequence[str], references: Sequence[str], names: Sequence[str]
) -> dict[str, float]:
    """The requested generation metrics over a corpus.

    Exact match, token F1 and the ROUGE scores are means over rows; BLEU is corpus-level.

    Args:
        predictions: Generated texts.
        references: One reference text per prediction.
        names: Any of ``GENERATION_METRICS``.

    Raises:
        ValueError: An unknown metric name, or predictions and references differ in length.
    """
    unknown = [n for n in names if n not in GENERATION_METRICS]
    if unknown:
        raise ValueError(f"unknown metric {unknown[0]!r}; expected one of {GENERATION_METRICS}")
    if len(predictions) != len(references):
        raise ValueError(
            f"{len(predictions)} predictions but {len(references)} references; give one each"
        )
    pairs = list(zip(predictions, references, strict=True))
    rows = max(len(pairs), 1)
    out: dict[str, float] = {}
    rouge_rows = [rouge(p, r) for p, r in pairs] if set(names) & set(_ROUGE_TYPES) else []
    for name in names:
        if name == "bleu":
            out[name] = bleu(predictions, references) if pairs else 0.0
        elif name in _ROUGE_TYPES:
            out[name] = sum(row[name] for row in rouge_rows) / rows
        else:
            score = exact_match if name == "exact_match" else token_f1
            out[name] = sum(score(p, r) for p, r in pairs) / rows
    return out
