"""Generation metrics against values computed by hand."""

import math

import pytest

from rayft.trainers.metrics import (
    bleu,
    exact_match,
    generation_metrics,
    lcs_length,
    normalize_answer,
    rouge_l,
    token_f1,
)


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


def test_lcs_and_rouge_l_hand_computed():
    assert lcs_length("a b c d".split(), "a c d b".split()) == 3
    # LCS("the cat sat on the mat", "the cat on the mat") = 5; P=5/6, R=1, F=10/11.
    assert rouge_l("the cat sat on the mat", "The cat, on the mat.") == pytest.approx(10 / 11)
    assert rouge_l("x y", "a b") == 0.0
    assert rouge_l("", "") == 1.0


def test_bleu_identical_is_one():
    assert bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(1.0)


def test_bleu_hand_computed_with_brevity_penalty():
    pred, ref = "the cat sat on mat", "the cat sat on the mat"
    # n-gram matches/totals: 1: 5/5, 2: 3/4, 3: 2/3, 4: 1/2; c=5, r=6.
    bp = math.exp(1 - 6 / 5)
    smoothed = bp * (1.0 * (4 / 5) * (3 / 4) * (2 / 3)) ** 0.25
    plain = bp * (1.0 * (3 / 4) * (2 / 3) * (1 / 2)) ** 0.25
    assert bleu([pred], [ref]) == pytest.approx(smoothed)
    assert bleu([pred], [ref], smooth=False) == pytest.approx(plain)


def test_bleu_is_corpus_level_not_mean_of_sentences():
    preds, refs = ["a b c d", "x"], ["a b c d", "y"]
    # Summed counts: 1-gram 4/5, 2-gram 3/3, 3-gram 2/2, 4-gram 1/1 (x has no n>1 grams).
    expected = ((5 / 6) * (4 / 4) * (3 / 3) * (2 / 2)) ** 0.25
    assert bleu(preds, refs) == pytest.approx(expected)
    assert bleu(["a b c d"], ["x y z w"], smooth=False) == 0.0
    with pytest.raises(ValueError):
        bleu(["a"], [])


def test_generation_metrics_means_and_unknown_name():
    out = generation_metrics(
        ["Paris", "tokyo city"], ["paris", "Tokyo"], ["exact_match", "token_f1"]
    )
    assert out["exact_match"] == pytest.approx(0.5)
    assert out["token_f1"] == pytest.approx((1.0 + 2 / 3) / 2)
    with pytest.raises(ValueError):
        generation_metrics(["a"], ["a"], ["meteor"])
