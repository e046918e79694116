"""Reference-based metrics, as plain functions. Each takes a prediction and one or more references and
returns the best score over the references (as SQuAD does)."""

from __future__ import annotations

import re
import string
from collections import Counter
from functools import cache

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize(text: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, references: list[str]) -> float:
    return float(any(normalize(prediction) == normalize(r) for r in references))


def _f1(prediction: str, reference: str) -> float:
    pred, ref = normalize(prediction).split(), normalize(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, references: list[str]) -> float:
    return max(_f1(prediction, r) for r in references)


@cache
def _rouge() -> object:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, references: list[str]) -> float:
    return max(_rouge().score(r, prediction)["rougeL"].fmeasure for r in references)


def contains_answer(prediction: str, references: list[str]) -> float:
    pred = f" {normalize(prediction)} "
    return float(any(f" {normalize(r)} " in pred for r in references if normalize(r)))


METRICS = {"exact_match": exact_match, "f1": token_f1, "rouge_l": rouge_l, "contains": contains_answer}


def score_all(prediction: str, references: list[str]) -> dict[str, float]:
    return {name: fn(prediction, references) for name, fn in METRICS.items()}
