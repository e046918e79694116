"""The Engine on the real default model: every strategy, streaming, stops, logprobs, context checks."""

from __future__ import annotations

import pytest

from ownllm.errors import OwnLLMError
from ownllm.generate.chat import ChatSession
from ownllm.generate.engine import Completion, TextDelta
from ownllm.generate.params import SamplingParams

pytestmark = pytest.mark.slow
PROMPT = "The three most visited cities in Europe are"


def test_greedy_is_deterministic(engine) -> None:
    params = SamplingParams(max_new_tokens=16)
    first, second = engine.generate(PROMPT, params), engine.generate(PROMPT, params)
    assert first.token_ids == second.token_ids and first.text
    assert first.seed is None


def test_top_k_1_sampling_equals_greedy(engine) -> None:
    greedy = engine.generate(PROMPT, SamplingParams(max_new_tokens=16))
    sampled = engine.generate(PROMPT, SamplingParams(strategy="sample", top_k=1, temperature=1.3, seed=7,
                                                     max_new_tokens=16))
    assert sampled.token_ids == greedy.token_ids


def test_fixed_seed_reproduces_sampling(engine) -> None:
    params = SamplingParams(strategy="sample", temperature=1.2, top_p=0.95, seed=1234, max_new_tokens=24)
    first, second = engine.generate(PROMPT, params), engine.generate(PROMPT, params)
    assert first.token_ids == second.token_ids and first.seed == 1234
    others = {tuple(engine.generate(PROMPT, SamplingParams(strategy="sample", temperature=1.2, seed=s,
                                                           max_new_tokens=24)).token_ids) for s in range(3)}
    assert len(others) > 1  # sampling really samples


def test_beam_search_scores_at_least_greedy(engine) -> None:
    n = 12
    greedy = engine.generate(PROMPT, SamplingParams(max_new_tokens=n, ignore_eos=True))
    beam = engine.generate(PROMPT, SamplingParams(strategy="beam", num_beams=4, max_new_tokens=n,
                                                  ignore_eos=True))
    assert len(beam.token_ids) == len(greedy.token_ids) == n
    assert beam.sequence_logprob >= greedy.sequence_logprob - 1e-3
    # the greedy path's reported logprob is the model's own score of that sequence
    prompt_ids = engine.encode(PROMPT)
    assert engine.sequence_logprob(prompt_ids, greedy.token_ids) == pytest.approx(
        greedy.sequence_logprob, abs=1e-2)


def test_explain_rows_cover_the_kept_set(engine) -> None:
    params = SamplingParams(strategy="sample", temperature=0.8, top_k=5, top_p=0.9, explain=5, seed=3,
                            max_new_tokens=6, ignore_eos=True)
    completion = engine.generate(PROMPT, params)
    assert len(completion.explanations) == 6
    for step, token in zip(completion.explanations, completion.token_ids, strict=True):
        assert sum(r.prob_top_p for r in step.rows) == pytest.approx(1.0, abs=1e-4)
        assert sum(r.prob_top_k for r in step.rows) == pytest.approx(1.0, abs=1e-4)
        chosen = [r for r in step.rows if r.chosen]
        assert len(chosen) == 1 and chosen[0].token_id == token == step.chosen_id
        assert chosen[0].prob_top_p > 0


def test_stream_pieces_add_up_to_the_text(engine) -> None:
    events = list(engine.stream(PROMPT, SamplingParams(max_new_tokens=20)))
    completion = events[-1]
    assert isinstance(completion, Completion)
    deltas = [e for e in events[:-1] if isinstance(e, TextDelta)]
    assert len(deltas) > 1
    assert "".join(d.text for d in deltas) == completion.text
    assert sum(len(d.token_ids) for d in deltas) == completion.completion_tokens


def test_stop_string_ends_generation_and_is_not_returned(engine) -> None:
    full = engine.generate(PROMPT, SamplingParams(max_new_tokens=30, ignore_eos=True)).text
    stop = full.strip().split()[2]
    cut = engine.generate(PROMPT, SamplingParams(max_new_tokens=30, stop=[stop], ignore_eos=True))
    assert cut.finish_reason == "stop"
    assert stop not in cut.text and full.startswith(cut.text)
    streamed = "".join(e.text for e in engine.stream(PROMPT, SamplingParams(max_new_tokens=30, stop=[stop]))
                       if isinstance(e, TextDelta))
    assert streamed == cut.text


def test_logprobs_are_returned(engine) -> None:
    completion = engine.generate(PROMPT, SamplingParams(max_new_tokens=4, logprobs=3))
    assert len(completion.logprobs) == 4
    for item in completion.logprobs:
        assert len(item.top) == 3 and item.logprob <= 0
        assert item.top[0][1] >= item.logprob - 1e-6  # greedy picks the top token


def test_finish_reason_length(engine) -> None:
    completion = engine.generate(PROMPT, SamplingParams(max_new_tokens=3, ignore_eos=True))
    assert completion.finish_reason == "length" and completion.completion_tokens == 3


def test_past_the_context_window_is_refused(engine) -> None:
    with pytest.raises(OwnLLMError, match="context window"):
        engine.generate(PROMPT, SamplingParams(max_new_tokens=engine.context_length))


def test_chat_template_is_the_models_own(engine) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    expected = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    expected_ids = engine.tokenizer(expected, add_special_tokens=False).input_ids
    assert engine.render_chat(messages) == expected_ids
    assert engine.tokenizer.decode(engine.render_chat(messages)).endswith("<|im_start|>assistant\n")


def test_chat_answers(engine) -> None:
    reply = engine.chat([{"role": "user", "content": "What is the capital of France?"}],
                        SamplingParams(max_new_tokens=20))
    assert "Paris" in reply.text and reply.finish_reason == "stop"


def test_context_overflow_drops_oldest_turns(engine, monkeypatch) -> None:
    session = ChatSession(engine=engine, system="You are terse.", params=SamplingParams(max_new_tokens=40))
    session.history = [
        {"role": "user", "content": "Tell me about apples " * 8},
        {"role": "assistant", "content": "Apples are fruit. " * 6},
        {"role": "user", "content": "And pears?"},
        {"role": "assistant", "content": "Pears are fruit too."},
    ]
    everything = [*session.messages(), {"role": "user", "content": "And plums?"}]
    window = len(engine.render_chat(everything)) + 40 - 5  # five tokens short: the oldest turn must go
    monkeypatch.setattr(engine, "context_length", window)
    dropped = next(iter(session.send("And plums?")))
    assert dropped == 2
    assert session.history[0]["content"] == "And pears?"
    assert session.messages()[0]["role"] == "system"  # the system prompt is always kept
    assert len(engine.render_chat(session.messages())) + 40 <= window


def test_a_message_too_long_for_the_window_is_refused(engine, monkeypatch) -> None:
    monkeypatch.setattr(engine, "context_length", 64)
    session = ChatSession(engine=engine, params=SamplingParams(max_new_tokens=32))
    with pytest.raises(OwnLLMError, match="does not fit"):
        next(iter(session.send("word " * 80)))
    assert session.history == []


@pytest.mark.skipif(not __import__("ownllm.generate.llamacpp", fromlist=["x"]).llama_cpp_available(),
                    reason="llama-cpp-python (extra `llama`) is not installed")
def test_llama_cpp_backend_uses_the_same_sampling(default_model: str) -> None:
    from ownllm.generate.open import open_engine

    engine = open_engine(default_model, backend="llama.cpp")
    assert engine.backend == "llama.cpp" and engine.context_length == 8192
    completion = engine.generate("The capital of France is", SamplingParams(max_new_tokens=4, explain=3, logprobs=2))
    assert "Paris" in completion.text
    for step in completion.explanations:
        assert sum(r.prob_top_p for r in step.rows) <= 1.0 + 1e-4
    params = SamplingParams(strategy="sample", temperature=1.0, seed=5, max_new_tokens=8)
    assert engine.generate(PROMPT, params).token_ids == engine.generate(PROMPT, params).token_ids


def test_batch_matches_one_at_a_time(engine) -> None:
    prompts = ["The capital of France is", "Water boils at", "My favourite colour is blue because it"]
    params = SamplingParams(max_new_tokens=8)
    batch = engine.generate_batch(prompts, params)
    assert [c.token_ids for c in batch] == [engine.generate(p, params).token_ids for p in prompts]
    sampled = SamplingParams(strategy="sample", temperature=0.9, seed=11, max_new_tokens=8)
    first, second = engine.generate_batch(prompts, sampled), engine.generate_batch(prompts, sampled)
    assert [c.token_ids for c in first] == [c.token_ids for c in second]
    assert [c.seed for c in first] == [11, 12, 13]


def test_one_sequence_runs_through_the_slot_forward_as_transformers_does(engine) -> None:
    """`ownllm generate` and the API's stream run one sequence through the slot forward (the scheduler's prefill
    chunks): fp32 greedy gives transformers' own tokens, over a prompt longer than one chunk; the sequence's KV goes
    when its stream ends; an adapter the model does not have is a clear error."""
    import ownllm.generate.hf as hf
    from ownllm.generate.slots import PREFILL_CHUNK

    prompt = "Here is a list of fruits: " + ", ".join(["apple", "pear", "plum", "fig"] * 60) + ". The last one is"
    assert len(engine.tokenizer(prompt)["input_ids"]) > PREFILL_CHUNK + 10
    params = SamplingParams(max_new_tokens=12)
    through_slots = engine.generate(prompt, params)
    assert engine._one_sequence is not None and engine._one_sequence.buffers == {}  # released at the end
    assert engine._one_sequence.max_len < engine.context_length  # sized to the sequences asked for, not the context
    stream = engine.stream(prompt, params)
    next(stream)
    assert len(engine._one_sequence.buffers) == 1
    stream.close()
    assert engine._one_sequence.buffers == {}
    own_forward = hf.TransformersEngine._sequence_forward
    try:
        hf.TransformersEngine._sequence_forward = lambda self, tokens: hf._TransformersSequence(self)  # the old path
        assert engine.generate(prompt, params).token_ids == through_slots.token_ids
    finally:
        hf.TransformersEngine._sequence_forward = own_forward
    with pytest.raises(OwnLLMError, match="no adapter named 'nope'"):
        engine.generate("Hi", params, adapter="nope")
