"""Text-generation metrics: exact match, token F1, ROUGE-L and corpus BLEU-4.

Pure functions of strings, with no Ray, torch or model involved, so they are unit
tested against hand-computed values and shared by training-time evaluation, the
serving endpoint's ``/v1/evaluations`` and ``rayft eval``.

* ``exact_match`` and ``token_f1`` follow the SQuAD v1.1 evaluation script: lower-case,
  strip punctuation and the articles a/an/the, collapse whitespace.
* ``rouge_l`` is the LCS-based F-measure (Lin, 2004) over lower-cased alphanumeric tokens.
* ``bleu`` is corpus BLEU-4 (Papineni et al., 2002) with the brevity penalty and
  add-one smoothing of every n-gram precision (as in Google's NMT ``compute_bleu``), so a
  short corpus with no 4-gram match still scores above zero.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Sequence

GENERATION_METRICS = ("exact_match", "token_f1", "rouge_l", "bleu")

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


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


def _rouge_tokens(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token sequences (O(len(a)·len(b)))."""
    if not a or not b:
        return 0
    previous = [0] * (len(b) + 1)
    for token in a:
        current = [0]
        for j, other in enumerate(b):
            current.append(previous[j] + 1 if token == other else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (beta = 1): ``2PR / (P + R)`` with P, R from the LCS of the tokens.

    Tokens are lower-cased runs of letters and digits, as in Google's ``rouge-score``
    without stemming. Two empty texts score 1.0; one empty text scores 0.0.
    """
    pred, ref = _rouge_tokens(prediction), _rouge_tokens(reference)
    if not pred or not ref:
        return float(pred == ref)
    lcs = lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def bleu_tokens(text: str) -> list[str]:
    """BLEU tokens: words and single punctuation marks, case kept."""
    return re.findall(r"\w+|[^\w\s]", text)


def _ngrams(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def bleu(
    predictions: Sequence[str],
    references: Sequence[str],
    max_order: int = 4,
    smooth: bool = True,
) -> float:
    """Corpus BLEU between predictions and one reference each, in [0, 1].

    Clipped n-gram matches and candidate n-gram counts are summed over the corpus for
    n = 1..``max_order``; the score is the geometric mean of the precisions times the
    brevity penalty ``exp(1 - r / c)`` when the candidate length c is below the
    reference length r. With ``smooth`` every precision is ``(matches + 1) / (total + 1)``.

    Raises:
        ValueError: ``predictions`` and ``references`` differ in length.
    """
    if len(predictions) != len(references):
        raise ValueError(
            f"bleu needs one reference per prediction, got {len(predictions)} predictions "
            f"and {len(references)} references"
        )
    matches = [0] * max_order
    totals = [0] * max_order
    pred_len = ref_len = 0
    for prediction, reference in zip(predictions, references, strict=True):
        pred, ref = bleu_tokens(prediction), bleu_tokens(reference)
        pred_len += len(pred)
        ref_len += len(ref)
        for n in range(1, max_order + 1):
            pred_grams, ref_grams = _ngrams(pred, n), _ngrams(ref, n)
            matches[n - 1] += sum((pred_grams & ref_grams).values())
            totals[n - 1] += max(len(pred) - n + 1, 0)
    if pred_len == 0:
        return 0.0
    if smooth:
        precisions = [(m + 1) / (t + 1) for m, t in zip(matches, totals, strict=True)]
    else:
        precisions = [m / t if t else 0.0 for m, t in zip(matches, totals, strict=True)]
    if min(precisions) <= 0:
        return 0.0
    log_mean = sum(math.log(p) for p in precisions) / max_order
    brevity = 1.0 if pred_len >= ref_len else math.exp(1 - ref_len / pred_len)
    return brevity * math.exp(log_mean)


def generation_metrics(
    predictions: Sequence[str], references: Sequence[str], names: Sequence[str]
) -> dict[str, float]:
    """The requested generation metrics over a corpus.

    Exact match, token F1 and ROUGE-L are means over rows; BLEU is corpus-level.

    Args:
        predictions: Generated texts.
        references: One reference text per prediction.
        names: Any of ``GENERATION_METRICS``.
    """
    per_row = {"exact_match": exact_match, "token_f1": token_f1, "rouge_l": rouge_l}
    out: dict[str, float] = {}
    for name in names:
        if name == "bleu":
            out[name] = bleu(predictions, references)
        elif name in per_row:
            scores = [per_row[name](p, r) for p, r in zip(predictions, references, strict=True)]
            out[name] = sum(scores) / len(scores) if scores else 0.0
        else:
            raise ValueError(f"unknown metric {name!r}; expected one of {GENERATION_METRICS}")
    return out
