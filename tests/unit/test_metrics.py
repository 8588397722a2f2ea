"""Generation metrics against hand-computed values and the libraries that define them."""

import math

import pytest

from rayft.trainers.metrics import (
    bleu,
    exact_match,
    generation_metrics,
    normalize_answer,
    rouge,
    rouge_l,
    token_f1,
)

PAIRS = [
    ("The capital of France is Paris.", "Paris is the capital of France."),
    ("the cat sat on the mat", "the cat was sitting on a mat"),
    ("Water boils at 100 degrees Celsius at sea level.", "At sea level water boils at 100 C."),
    ("four", "4"),
]


def test_normalize_answer_drops_case_punctuation_and_articles():
    assert normalize_answer("The  Cat, sat!") == "cat sat"
    assert normalize_answer("An apple a day") == "apple day"


def test_exact_match_after_normalisation():
    assert exact_match("The Cat!", "cat") == 1.0
    assert exact_match("a cat", "dog") == 0.0
    assert exact_match("", "") == 1.0


def test_token_f1_hand_computed():
    # pred "cat sat on mat" (4 tokens) vs ref "cat sat" (2): 2 shared, P=1/2, R=1, F1=2/3.
    assert token_f1("the cat sat on the mat", "a cat sat") == pytest.approx(2 / 3)
    # Multiset overlap: "cat cat" vs "cat": shared 1, P=1/2, R=1.
    assert token_f1("cat cat", "cat") == pytest.approx(2 / 3)
    assert token_f1("dog", "cat") == 0.0
    assert token_f1("the", "") == 1.0  # both empty after dropping the article
    assert token_f1("cat", "") == 0.0


def test_rouge_hand_computed():
    # LCS("the cat sat on the mat", "the cat on the mat") = 5; P=5/6, R=1, F=10/11.
    assert rouge_l("the cat sat on the mat", "The cat, on the mat.") == pytest.approx(10 / 11)
    # Bigrams: pred has 5, ref has 4, shared 3 (the cat, on the, the mat): F = 2*3/(5+4).
    scores = rouge("the cat sat on the mat", "The cat, on the mat.")
    assert scores["rouge_2"] == pytest.approx(6 / 9)
    assert scores["rouge_1"] == pytest.approx(2 * 5 / (6 + 5))
    assert rouge_l("x y", "a b") == 0.0


def test_rouge_matches_rouge_score_package():
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)
    for pred, ref in PAIRS:
        expected = scorer.score(ref, pred)
        got = rouge(pred, ref)
        assert got["rouge_1"] == pytest.approx(expected["rouge1"].fmeasure)
        assert got["rouge_2"] == pytest.approx(expected["rouge2"].fmeasure)
        assert got["rouge_l"] == pytest.approx(expected["rougeL"].fmeasure)
    out = generation_metrics([p for p, _ in PAIRS], [r for _, r in PAIRS], ["rouge_l"])
    mean = sum(scorer.score(r, p)["rougeL"].fmeasure for p, r in PAIRS) / len(PAIRS)
    assert out["rouge_l"] == pytest.approx(mean)


def test_bleu_identical_is_one():
    assert bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(1.0)


def test_bleu_hand_computed_with_brevity_penalty():
    pred, ref = "the cat sat on mat", "the cat sat on the mat"
    # n-gram matches/totals: 1: 5/5, 2: 3/4, 3: 2/3, 4: 1/2; c=5, r=6.
    bp = math.exp(1 - 6 / 5)
    plain = bp * (1.0 * (3 / 4) * (2 / 3) * (1 / 2)) ** 0.25
    assert bleu([pred], [ref], smooth=False) == pytest.approx(plain)


def test_bleu_is_corpus_level_not_mean_of_sentences():
    preds, refs = ["a b c d", "x"], ["a b c d", "y"]
    # Summed counts: 1-gram 4/5, 2-gram 3/3, 3-gram 2/2, 4-gram 1/1 (x has no n>1 grams).
    assert bleu(preds, refs, smooth=False) == pytest.approx((4 / 5) ** 0.25)
    assert bleu(["a b c d"], ["x y z w"], smooth=False) == 0.0
    with pytest.raises(ValueError):
        bleu(["a"], [])


def test_bleu_matches_sacrebleu_corpus_bleu():
    import sacrebleu

    preds, refs = [p for p, _ in PAIRS], [r for _, r in PAIRS]
    expected = sacrebleu.corpus_bleu(preds, [refs]).score / 100
    assert 0.0 < expected < 1.0
    assert bleu(preds, refs) == pytest.approx(expected)
    assert generation_metrics(preds, refs, ["bleu"])["bleu"] == pytest.approx(expected)


def test_generation_metrics_means_and_unknown_name():
    out = generation_metrics(
        ["Paris", "tokyo city"], ["paris", "Tokyo"], ["exact_match", "token_f1"]
    )
    assert out["exact_match"] == pytest.approx(0.5)
    assert out["token_f1"] == pytest.approx((1.0 + 2 / 3) / 2)
    with pytest.raises(ValueError):
        generation_metrics(["a"], ["a"], ["meteor"])
