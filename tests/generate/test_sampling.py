"""Unit tests of the decoding filters on hand-made logits (no model)."""

from __future__ import annotations

import pytest
import torch

from ownllm.errors import OwnLLMError
from ownllm.generate.params import SamplingParams
from ownllm.generate.sampling import apply_repetition_penalty, pick_token

LOGITS = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0, -1.0])
NOTHING_SEEN = torch.tensor([], dtype=torch.long)


def explain(**options):
    params = SamplingParams(strategy="sample", explain=6, seed=0, **options)
    _, explanation = pick_token(LOGITS, params, NOTHING_SEEN, torch.Generator().manual_seed(0))
    return explanation


def test_every_probability_column_is_a_distribution() -> None:
    rows = explain(temperature=0.7, top_k=4, top_p=0.8, min_p=0.2).rows
    for column in ("prob", "prob_temperature", "prob_top_k", "prob_top_p", "prob_min_p"):
        assert sum(getattr(r, column) for r in rows) == pytest.approx(1.0, abs=1e-5)


def test_top_k_keeps_exactly_k() -> None:
    e = explain(top_k=2)
    assert e.kept_top_k == 2
    assert [r.prob_top_k > 0 for r in e.rows] == [True, True, False, False, False, False]


def test_top_p_keeps_smallest_set_reaching_p() -> None:
    probs = torch.softmax(LOGITS, dim=0)
    e = explain(top_p=0.9)
    kept = sum(1 for r in e.rows if r.prob_top_p > 0)
    assert probs[: kept - 1].sum() < 0.9 <= probs[:kept].sum()
    assert e.kept_top_p == kept


@pytest.mark.parametrize("options", [{"min_p": 0.3}, {"min_p": 0.1, "temperature": 1.5},
                                     {"min_p": 0.2, "top_k": 4, "top_p": 0.95}])
def test_min_p_keeps_what_transformers_keeps(options: dict) -> None:
    """Tokens at least min_p as likely as the best one, after temperature, top-k and top-p (transformers' order);
    the same set as transformers' own warpers, and no draw ever falls outside it."""
    from transformers.generation.logits_process import (
        MinPLogitsWarper,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    scores = LOGITS[None].clone()
    warpers = [TemperatureLogitsWarper(options.get("temperature", 1.0)),
               TopKLogitsWarper(options.get("top_k", 0) or LOGITS.numel()),
               TopPLogitsWarper(options.get("top_p", 1.0)), MinPLogitsWarper(options["min_p"])]
    for warper in warpers:
        scores = warper(None, scores)
    expected = torch.isfinite(scores[0]).tolist()
    e = explain(**options)
    by_id = sorted(e.rows, key=lambda r: r.token_id)
    assert [r.prob_min_p > 0 for r in by_id] == expected and e.kept_min_p == sum(expected)
    assert e.kept_min_p < LOGITS.numel()  # each case filters something
    params = SamplingParams(strategy="sample", **options)
    drawn = {pick_token(LOGITS, params, NOTHING_SEEN, torch.Generator().manual_seed(seed))[0] for seed in range(200)}
    assert drawn == {i for i, kept in enumerate(expected) if kept}


def test_temperature_sharpens_and_flattens() -> None:
    cold, hot = explain(temperature=0.5).rows[0], explain(temperature=2.0).rows[0]
    assert cold.prob_temperature > cold.prob > hot.prob_temperature


def test_chosen_token_is_in_the_kept_set() -> None:
    for seed in range(20):
        params = SamplingParams(strategy="sample", top_k=3, top_p=0.9, explain=6, seed=seed)
        token, e = pick_token(LOGITS, params, NOTHING_SEEN, torch.Generator().manual_seed(seed))
        chosen = next(r for r in e.rows if r.chosen)
        assert chosen.token_id == token and chosen.prob_top_p > 0


def test_greedy_is_argmax_and_top_k_1_equals_greedy() -> None:
    greedy, _ = pick_token(LOGITS, SamplingParams(), NOTHING_SEEN, None)
    sampled, _ = pick_token(LOGITS, SamplingParams(strategy="sample", top_k=1), NOTHING_SEEN,
                            torch.Generator().manual_seed(3))
    assert greedy == sampled == 0


def test_repetition_penalty_follows_transformers() -> None:
    out = apply_repetition_penalty(LOGITS, torch.tensor([0, 5]), 2.0)
    assert out[0] == 2.0 and out[5] == -2.0 and out[1] == 3.0


def test_temperature_zero_means_greedy() -> None:
    assert SamplingParams(strategy="sample", temperature=0).strategy == "greedy"


@pytest.mark.parametrize(
    ("options", "param"),
    [
        ({"temperature": -3}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"min_p": -0.1}, "min_p"),
        ({"min_p": 1.5}, "min_p"),
        ({"min_p": float("nan")}, "min_p"),
        ({"num_beams": 0}, "num_beams"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"strategy": "nucleus"}, "strategy"),
        ({"stop": [""]}, "stop"),
    ],
)
def test_bad_parameters_name_the_problem(options: dict, param: str) -> None:
    with pytest.raises(OwnLLMError) as info:
        SamplingParams(**options)
    assert info.value.param == param


def test_unknown_option_is_rejected() -> None:
    with pytest.raises(OwnLLMError, match="temprature"):
        SamplingParams.from_options(temprature=1.0)
