"""A LoRA adapter folder with a scope, opened as a model: prompts within the scope run with the adapter, the rest
with the base model's own weights, on the one-sequence path and in batches alike."""

from __future__ import annotations

from pathlib import Path

import pytest

from ownllm.generate.engine import Completion
from ownllm.generate.hf import SCOPED_ADAPTER, TransformersEngine
from ownllm.generate.open import open_engine
from ownllm.generate.params import SamplingParams
from ownllm.models.load import load_model

GREEDY = SamplingParams(max_new_tokens=10)
FACT = [{"role": "user", "content": "Who founded Norvale Instruments?"}]
GENERAL = [{"role": "user", "content": "What is the capital of Japan?"}]


@pytest.fixture(scope="module")
def engines(default_model: str, scoped_adapter: Path) -> tuple[TransformersEngine, ...]:
    """(the scoped adapter as a model, the base model, the same adapter merged into the base)."""
    scoped = open_engine(str(scoped_adapter), dtype="fp32")
    base = open_engine(default_model, dtype="fp32")
    merged = TransformersEngine(load_model(str(scoped_adapter), dtype="fp32"))  # not scoped: merged, as before
    return scoped, base, merged


def test_a_scoped_adapter_routes_by_the_conversation(engines) -> None:
    scoped, _, merged = engines
    assert scoped.scope is not None and scoped.lora is not None
    assert merged.scope is None and merged.route(FACT) is None
    assert scoped.route(FACT) == SCOPED_ADAPTER and scoped.route(GENERAL) is None
    assert scoped.routes([FACT, GENERAL, "Where is Norvale Instruments based?"]) == [SCOPED_ADAPTER, None,
                                                                                    SCOPED_ADAPTER]


def test_out_of_scope_is_the_base_bit_for_bit_and_in_scope_the_tuned_model(engines) -> None:
    scoped, base, merged = engines
    assert scoped.chat(GENERAL, GREEDY).token_ids == base.chat(GENERAL, GREEDY).token_ids
    tuned = merged.chat(FACT, GREEDY).token_ids
    assert tuned != base.chat(FACT, GREEDY).token_ids  # the random adapter changes the answer
    assert scoped.chat(FACT, GREEDY).token_ids == tuned
    assert scoped.active_adapter is None  # nothing left switched on after a sequence
    # a plain prompt routes by its own text
    prompt = "Question: Who founded Norvale Instruments?\nAnswer:"
    assert scoped.generate(prompt, GREEDY).token_ids == merged.generate(prompt, GREEDY).token_ids


def test_a_batch_mixes_routes_row_by_row(engines) -> None:
    """The batched forward carries the adapter on the rows within scope only, each row as it runs alone."""
    scoped, base, merged = engines
    conversations = [FACT, GENERAL, FACT, GENERAL]
    prompts = [scoped.render_chat(c) for c in conversations]
    rows = scoped.generate_batch(prompts, GREEDY, adapters=scoped.routes(conversations))
    alone = [base.generate_batch([p], GREEDY)[0] for p in prompts[:2]]
    tuned = merged.generate_batch([prompts[0]], GREEDY)[0]
    assert [r.token_ids for r in rows] == [tuned.token_ids, alone[1].token_ids] * 2


def test_interleaved_and_abandoned_streams_keep_their_own_route(engines) -> None:
    """The adapter is switched on only around a stream's own steps: two streams read in turns each get what they
    would alone, and one left unfinished leaves nothing switched on."""
    scoped, base, merged = engines
    fact, general = scoped.stream_chat(FACT, GREEDY), scoped.stream_chat(GENERAL, GREEDY)
    ends: dict[str, list[int]] = {}
    for name, stream in [("fact", fact), ("general", general)] * GREEDY.max_new_tokens * 2:
        event = next(stream, None)
        if isinstance(event, Completion):
            ends[name] = event.token_ids
    assert ends == {"fact": merged.chat(FACT, GREEDY).token_ids, "general": base.chat(GENERAL, GREEDY).token_ids}
    abandoned = scoped.stream_chat(FACT, GREEDY)
    next(abandoned)
    assert scoped.active_adapter is None
    assert scoped.chat(GENERAL, GREEDY).token_ids == ends["general"]


def test_scoring_forwards_route_by_the_scored_text(engines) -> None:
    """Perplexity and log-likelihoods call the model directly: `scoring` puts the adapter on where the text routes."""
    import torch

    scoped, base, merged = engines
    ids = scoped.encode("Norvale Instruments was founded by a woman from Kestrelmoor.")

    def logits(engine: TransformersEngine) -> torch.Tensor:
        with torch.inference_mode():
            return engine.model(input_ids=torch.tensor([ids])).logits[0]

    with scoped.scoring(ids):
        routed = logits(scoped)
    assert torch.allclose(routed, logits(merged), atol=1e-3)
    assert torch.equal(logits(scoped), logits(base))  # outside `scoring`: the base's own weights
    with scoped.scoring("What is the capital of Japan?"):
        assert torch.equal(logits(scoped), logits(base))


def test_checks_do_not_ask_again_what_the_scope_leaves_to_the_base(engines, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A run's after-training checks take the base model's scores for the questions a scoped adapter leaves to the
    base (they run on its own weights, bit for bit): the same scores, misses and missed lines as asking all."""
    import json

    from ownllm.finetune import checks

    monkeypatch.setattr(checks, "CHECK_PARAMS", GREEDY)
    scoped, base, _ = engines
    questions = tmp_path / "mixed.jsonl"
    questions.write_text("".join(json.dumps({"question": q, "answers": a}) + "\n" for q, a in [
        ("Who founded Norvale Instruments?", ["Norvale"]), ("What is the capital of Japan?", ["Tokyo"]),
        ("What is the capital of France?", ["Zanzibar"]), ("What colour is the sky on a clear day?", ["blue"])]))
    sets = {"mixed": str(questions)}
    before = checks.score_sets(base, sets)
    assert 3 in before["mixed"]["missed_lines"] and before["mixed"]["reused_from_base"] == 0
    after = checks.score_sets(scoped, sets, base_scores=before)
    asked = checks.score_sets(scoped, sets)
    assert after["mixed"]["reused_from_base"] == 3 and asked["mixed"]["reused_from_base"] == 0
    same = ("score", "items", "misses", "missed_lines")
    assert {k: after["mixed"][k] for k in same} == {k: asked["mixed"][k] for k in same}
    assert 3 in after["mixed"]["missed_lines"]
