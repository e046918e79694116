"""Metric functions on hand-made cases."""

from __future__ import annotations

import pytest

from ownllm.evaluate.metrics import contains_answer, exact_match, normalize, rouge_l, token_f1


def test_normalize() -> None:
    assert normalize("The  Eiffel Tower!") == "eiffel tower"
    assert normalize("An apple, a day.") == "apple day"
    assert normalize("") == ""


def test_exact_match_after_normalisation() -> None:
    assert exact_match("Paris.", ["paris"]) == 1.0
    assert exact_match("the Pacific", ["Pacific Ocean", "Pacific"]) == 1.0
    assert exact_match("Paris, France", ["Paris"]) == 0.0


def test_f1_edge_cases() -> None:
    assert token_f1("Paris", ["Paris"]) == 1.0
    assert token_f1("", [""]) == 1.0
    assert token_f1("", ["Paris"]) == 0.0
    assert token_f1("Paris", [""]) == 0.0
    assert token_f1("capital is Paris", ["Paris"]) == pytest.approx(0.5)  # p=1/3, r=1
    assert token_f1("x b c", ["x y", "b c d"]) == pytest.approx(2 / 3)  # best reference counts
    assert token_f1("paris paris", ["paris"]) == pytest.approx(2 / 3)  # repeats are not free


def test_rouge_l() -> None:
    assert rouge_l("the cat sat on the mat", ["the cat sat on the mat"]) == pytest.approx(1.0)
    assert rouge_l("the cat on the mat", ["the cat sat on the mat"]) == pytest.approx(2 * 5 / 6 * 1 / (5 / 6 + 1))
    assert rouge_l("dogs bark", ["the cat sat"]) == 0.0


def test_contains_answer_matches_whole_words() -> None:
    assert contains_answer("The capital of France is Paris.", ["Paris"]) == 1.0
    assert contains_answer("Parisian food", ["Paris"]) == 0.0
    assert contains_answer("anything", [""]) == 0.0
