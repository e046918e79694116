"""The continuous-batching scheduler on the real model: joining, leaving, failures that stay contained."""

from __future__ import annotations

import queue
import threading

import pytest
import torch

from ownllm.errors import OwnLLMError
from ownllm.generate.batching import BatchScheduler, QueueFull, Request
from ownllm.generate.engine import Completion, TextDelta
from ownllm.generate.params import SamplingParams

pytestmark = pytest.mark.slow


def collect(events: queue.Queue, timeout: float = 60) -> tuple[str, Completion | BaseException]:
    text = ""
    while True:
        event = events.get(timeout=timeout)
        if isinstance(event, TextDelta):
            text += event.text
        else:
            return text, event


@pytest.fixture
def scheduler(engine):
    running = BatchScheduler(engine, max_batch=4, max_queue=8, max_len=512)
    running.start()
    yield running
    running.stop(drain_seconds=1)


def submit(scheduler: BatchScheduler, engine, prompt: str, **options) -> queue.Queue:
    events: queue.Queue = queue.Queue()
    params = SamplingParams(**{"max_new_tokens": 16, **options})
    scheduler.submit(Request(engine.encode(prompt), params, 0, events.put))
    return events


def test_batched_greedy_equals_the_single_stream_engine(scheduler, engine) -> None:
    prompts = ["The capital of France is", "Water boils at", "My favourite colour is", "Once upon a time"]
    streams = [submit(scheduler, engine, p) for p in prompts]
    results = [collect(s) for s in streams]
    for prompt, (text, completion) in zip(prompts, results, strict=True):
        expected = engine.generate(prompt, SamplingParams(max_new_tokens=16))
        assert completion.token_ids == expected.token_ids and text == expected.text


def test_a_broken_client_does_not_stop_the_others(scheduler, engine) -> None:
    def broken(event) -> None:
        raise ConnectionError("client went away")

    scheduler.submit(Request(engine.encode("Tell me a story"), SamplingParams(max_new_tokens=64), 0, broken))
    text, completion = collect(submit(scheduler, engine, "The capital of France is"))
    assert isinstance(completion, Completion) and text


def test_a_row_that_fails_fails_alone_and_the_others_go_on(scheduler, engine, monkeypatch) -> None:
    """A decode step that breaks is retried row by row: only the row that also fails alone is failed."""
    real = scheduler.model.forward
    poisoned: set[int] = set()

    def breaks_on_a_poisoned_slot(tokens, slots, starts, adapters=None):
        if tokens.shape[1] == 1 and poisoned & set(slots.tolist()):
            raise RuntimeError("simulated kernel failure on one row")
        return real(tokens, slots, starts, adapters)

    monkeypatch.setattr(scheduler.model, "forward", breaks_on_a_poisoned_slot)
    prompts = ["The capital of France is", "Water boils at", "Once upon a time"]
    expected = [engine.generate(p, SamplingParams(max_new_tokens=16)) for p in prompts]
    bad_events: queue.Queue = queue.Queue()

    def on_bad_event(event) -> None:
        # The scheduler thread calls this before it reuses the slot: a later request there must not be poisoned.
        if isinstance(event, OwnLLMError):
            poisoned.clear()
        bad_events.put(event)

    bad = Request(engine.encode("Hello there"), SamplingParams(max_new_tokens=16), 0, on_bad_event)
    scheduler.submit(bad)
    good = [submit(scheduler, engine, p) for p in prompts]
    bad_events.get(timeout=60)  # its first token is out: it is decoding with the others now
    poisoned.add(bad.sequence)
    _, failed = collect(bad_events)
    assert isinstance(failed, OwnLLMError) and "generation failed" in str(failed)
    for stream, reference in zip(good, expected, strict=True):
        _, completion = collect(stream)
        assert isinstance(completion, Completion) and completion.token_ids == reference.token_ids


def test_kv_that_cannot_grow_fails_its_own_request_alone(scheduler, engine, monkeypatch) -> None:
    """An allocation that fails while a sequence grows (out of memory, or of mappings) fails that request only."""
    real = scheduler.model.reserve
    starving: set[int] = set()

    def reserve(sequence, positions):
        if sequence in starving:
            raise OSError(12, "Cannot allocate memory")
        return real(sequence, positions)

    monkeypatch.setattr(scheduler.model, "reserve", reserve)
    bad_events: queue.Queue = queue.Queue()
    bad = Request(engine.encode("Tell me a long story"), SamplingParams(max_new_tokens=400, ignore_eos=True), 0,
                  bad_events.put)
    scheduler.submit(bad)
    bad_events.get(timeout=60)  # decoding: its next growth is refused
    starving.add(bad.sequence)
    good = submit(scheduler, engine, "The capital of France is")
    _, failed = collect(bad_events)
    assert isinstance(failed, OwnLLMError) and "generation failed: OSError" in str(failed)
    starving.clear()
    _, completion = collect(good)
    assert isinstance(completion, Completion)
    reference = engine.generate("The capital of France is", SamplingParams(max_new_tokens=16))
    assert completion.token_ids == reference.token_ids


def test_a_prompt_the_model_cannot_take_fails_alone(scheduler, engine) -> None:
    # The server refuses such ids before they get here; the scheduler must contain them all the same.
    bad_events: queue.Queue = queue.Queue()
    good = submit(scheduler, engine, "The capital of France is")
    scheduler.submit(Request([10**9, 5], SamplingParams(max_new_tokens=8), 0, bad_events.put))
    _, failed = collect(bad_events)
    assert isinstance(failed, OwnLLMError)
    _, completion = collect(good)
    assert isinstance(completion, Completion)
    assert engine.generate("The capital of France is", SamplingParams(max_new_tokens=16)).token_ids == \
        completion.token_ids


def test_a_transient_step_failure_is_retried(scheduler, engine, monkeypatch) -> None:
    real = scheduler.model.forward
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated kernel failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(scheduler.model, "forward", flaky)
    _, first = collect(submit(scheduler, engine, "Hello there"))
    assert isinstance(first, Completion)
    assert first.token_ids == engine.generate("Hello there", SamplingParams(max_new_tokens=16)).token_ids


def test_seeds_at_the_edges_of_64_bits(scheduler, engine) -> None:
    for seed in (2**64 - 1, -(2**63)):
        params = SamplingParams(strategy="sample", max_new_tokens=4, seed=seed)
        events: queue.Queue = queue.Queue()
        scheduler.submit(Request(engine.encode("Hi"), params, params.seed_for(3), events.put))
        assert isinstance(collect(events)[1], Completion)
    with pytest.raises(OwnLLMError, match="seed"):
        SamplingParams(strategy="sample", seed=2**64)


def test_queue_limit(engine) -> None:
    idle = BatchScheduler(engine, max_batch=1, max_queue=2, max_len=256)  # not started: nothing drains
    for _ in range(2):
        idle.submit(Request([1, 2, 3], SamplingParams(), 0, lambda e: None))
    with pytest.raises(QueueFull):
        idle.submit(Request([1, 2, 3], SamplingParams(), 0, lambda e: None))


def test_a_refused_request_queues_none_of_its_sequences(engine) -> None:
    idle = BatchScheduler(engine, max_batch=1, max_queue=4, max_len=256)  # not started: nothing drains
    idle.submit_all([Request([1, 2, 3], SamplingParams(), 0, lambda e: None) for _ in range(3)])
    with pytest.raises(QueueFull):  # two more do not fit: neither is queued
        idle.submit_all([Request([1, 2, 3], SamplingParams(), 0, lambda e: None) for _ in range(2)])
    assert len(idle.waiting) == 3
    with pytest.raises(OwnLLMError, match="at most 4"):  # can never fit: a client error, not "busy"
        idle.submit_all([Request([1, 2, 3], SamplingParams(), 0, lambda e: None) for _ in range(5)])


def test_cancel_frees_the_slot(scheduler, engine) -> None:
    events: queue.Queue = queue.Queue()
    request = Request(engine.encode("Write a long story"), SamplingParams(max_new_tokens=400, ignore_eos=True), 0,
                      events.put)
    scheduler.submit(request)
    events.get(timeout=30)
    request.cancel()
    done = threading.Event()
    for _ in range(100):
        if not scheduler.running_requests():
            done.set()
            break
        threading.Event().wait(0.05)
    assert done.is_set()


@pytest.mark.skipif(not __import__("ownllm.generate.llamacpp", fromlist=["x"]).llama_cpp_available(),
                    reason="llama-cpp-python (extra `llama`) is not installed")
def test_llama_cpp_batched_decoding(default_model: str) -> None:
    from ownllm.generate.batching import make_scheduler
    from ownllm.generate.open import open_engine

    engine = open_engine(default_model, backend="llama.cpp")
    scheduler = make_scheduler(engine, max_batch=4, max_len=256)
    assert isinstance(scheduler, BatchScheduler)
    scheduler.start()
    try:
        streams = [submit(scheduler, engine, p, strategy="sample", seed=3)
                   for p in ("Hello", "Tell me a joke", "The sea is", "Numbers: 1, 2,")]
        results = [collect(s) for s in streams]
        assert all(isinstance(c, Completion) and text == c.text and c.completion_tokens > 0 for text, c in results)
    finally:
        scheduler.stop(drain_seconds=1)


def test_the_scheduler_is_chosen_by_asking_the_engine(engine) -> None:
    from ownllm.generate.batching import make_scheduler
    from ownllm.generate.slots import rows_placed_alike, rows_round_alike

    assert engine.batching_mode() == ("batched", "slot forward for llama on cpu")
    batched = make_scheduler(engine, max_batch=4, max_len=256)
    token_bytes, narrow = batched.model.token_bytes, batched.model.narrow_rows
    # the weights are packed once per model, at the first decode step that runs on them: an earlier test's wide
    # steps on this shared engine may have packed them (where this CPU measured packed products faster)
    packed_before = batched.model.weights.packed is not None
    expected = {
        "mode": "batched", "max_batch": 4, "kv_tokens": 4 * 256, "kv_bytes": 4 * 256 * token_bytes,
        "prefix_caching": True, "int4_rows": 0,  # by default the budget holds max_batch full sequences (when
        # memory allows); no 4-bit kernel unless asked for (the server does) and in bf16
        "narrow_rows": narrow,  # fp32 steps of a few rows as transposed products where faster (then not invariant)
        "batch_invariant": rows_round_alike(batched.model.dtype, batched.model.device) and not narrow
        and not batched.model.packed and rows_placed_alike(batched.model.dtype, batched.model.device, [
            *batched.model.layer_shapes(), tuple(batched.model.weights.lm_head.shape)])}
    if packed_before:
        expected["packed_weights"] = batched.model.packed_note
    if expected["batch_invariant"]:
        expected["prefix_exact_chunks"] = batched.prefill_chunk  # then the cache reuses whole prefill chunks only
    assert isinstance(batched, BatchScheduler) and batched.batching == expected
    assert isinstance(narrow, int) and 0 <= narrow <= 16
    assert packed_before or batched.model.packed == {}  # not packed before a decode step runs on them


@pytest.fixture(scope="module")
def serial_engine(engine):
    """The default tokenizer over a tiny random GPT-2: an architecture the slot forward does not cover."""
    from dataclasses import replace

    import transformers

    from ownllm.generate.hf import TransformersEngine

    config = transformers.GPT2Config(vocab_size=engine.vocab_size, n_embd=32, n_layer=1, n_head=2, n_positions=256)
    return TransformersEngine(replace(engine.loaded, model=transformers.GPT2LMHeadModel(config).eval()))


def test_an_engine_that_cannot_batch_is_served_one_at_a_time_and_says_why(serial_engine) -> None:
    from ownllm.generate.batching import SerialScheduler, make_scheduler

    mode, reason = serial_engine.batching_mode()
    assert mode == "serial" and "gpt2" in reason
    scheduler = make_scheduler(serial_engine, max_batch=4, max_len=128)
    assert isinstance(scheduler, SerialScheduler)
    assert scheduler.batching == {"mode": "serial", "reason": reason}
    with pytest.raises(OwnLLMError, match="gpt2"):
        scheduler.load_adapter("tuned", "anywhere")
    with pytest.raises(OwnLLMError, match="gpt2"):
        BatchScheduler(serial_engine, max_batch=2, max_len=64)
    params = SamplingParams(max_new_tokens=4, ignore_eos=True)
    prompts = ["Hello", "The sea is"]
    batch = serial_engine.generate_batch(prompts, params)  # one at a time, same contract
    assert [c.token_ids for c in batch] == [serial_engine.generate(p, params).token_ids for p in prompts]


def test_generate_batch_runs_through_the_scheduler_with_more_prompts_than_slots(engine, monkeypatch) -> None:
    """More prompts than rows: the rest wait for a free slot, results come back in the prompts' order."""
    import ownllm.generate.batching as batching

    steps = {"n": 0}
    real_step = BatchScheduler._step

    def counted(self) -> None:
        steps["n"] += 1
        real_step(self)

    monkeypatch.setattr(BatchScheduler, "_step", counted)
    prompts = ["The capital of France is", "Water boils at", "Once upon a time", "Hi", "Numbers: 1, 2,"]
    params = SamplingParams(max_new_tokens=6)
    ids = [engine.encode(p) for p in prompts]
    together = batching.generate_together(engine, ids, params, [0] * len(ids), max_batch=2)
    assert steps["n"] > 0
    assert [c.token_ids for c in together] == [engine.generate(p, params).token_ids for p in prompts]
    assert [c.prompt_tokens for c in together] == [len(i) for i in ids]
    finished: list[int] = []  # the callers' progress bars: one tick per finished prompt, all in one call
    batch = engine.generate_batch(prompts, params, max_batch=2, progress=finished.append)
    assert finished == [1] * len(prompts) and [c.token_ids for c in batch] == [c.token_ids for c in together]


def test_wide_products_run_on_packed_weights_where_faster_and_memory_allows(engine, monkeypatch) -> None:
    """Steps past the narrow rows run on the weights packed for oneDNN where measured faster (forced here): the
    same greedy tokens as F.linear's, one packed copy shared by every scheduler of the model, refused where it
    would not fit twice in the memory free (less a server's KV budget), and never with OWNLLM_PACKED_WEIGHTS=0."""
    from ownllm.generate import slots
    from ownllm.generate.batching import make_scheduler

    # narrow products up to 2 rows (measured: 5-9 here): a prompt joins the decoding rows every other step, so
    # 8 tokens each bring steps of 3-4 rows, past them
    monkeypatch.setattr(slots.SlotModel, "_measured_narrow_rows", lambda self: 2)
    prompts = [f"Name a colour and a fruit, number {i}." for i in range(8)]
    params = SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True)
    monkeypatch.setenv("OWNLLM_PACKED_WEIGHTS", "0")
    plain = [c.text for c in engine.generate_batch(prompts, params, max_batch=8)]
    unpacked = make_scheduler(engine, max_batch=2, max_len=64).model
    unpacked.pack_for(64)
    assert unpacked.packed == {} and unpacked.packed_note == "packed weights off: OWNLLM_PACKED_WEIGHTS=0"
    monkeypatch.delenv("OWNLLM_PACKED_WEIGHTS")
    monkeypatch.setattr(slots, "packed_products_win", lambda *args: True)
    first = make_scheduler(engine, max_batch=2, max_len=64).model
    # decided afresh here, and as it was after the test
    for kept in ("packed", "packed_note", "packed_versions"):
        monkeypatch.setattr(first.weights, kept, None if kept == "packed" else getattr(first.weights, kept))
    first = make_scheduler(engine, max_batch=2, max_len=64).model
    first.pack_for(1)  # one sequence never packs
    first.pack_for(first.dense_rows_from)  # nor steps that would not run on them
    assert first.packed == {} and first.weights.packed is None
    first.pack_for(first.dense_rows_from + 1)
    assert first.packed and first.packed_note.startswith("products of 3+ rows on weights packed")
    second = make_scheduler(engine, max_batch=2, max_len=64).model
    second.pack_for(64)
    assert second.packed is first.packed  # packed once per model
    assert [c.text for c in engine.generate_batch(prompts, params, max_batch=8)] == plain
    # weights written in place (as an optimizer step writes them) are packed again before the next forward
    head, packed_head = first.weights.lm_head, first.packed[id(first.weights.lm_head)]
    kept = head.detach().clone()
    try:
        with torch.no_grad():
            head.copy_(kept * 0.5)
        halved = [c.text for c in engine.generate_batch(prompts, params, max_batch=8)]
        assert first.weights.packed[id(head)] is not packed_head
        monkeypatch.setenv("OWNLLM_PACKED_WEIGHTS", "0")
        assert [c.text for c in engine.generate_batch(prompts, params, max_batch=8)] == halved != plain
        monkeypatch.delenv("OWNLLM_PACKED_WEIGHTS")
    finally:
        with torch.no_grad():
            head.copy_(kept)
    first.weights.packed = None
    monkeypatch.setattr(slots.psutil, "virtual_memory", lambda: type("Memory", (), {"available": 2**20})())
    refused = make_scheduler(engine, max_batch=2, max_len=64).model
    refused.pack_for(64)
    assert refused.packed == {} and "does not fit twice in the 1 MiB free" in refused.packed_note
    first.weights.packed = None
    monkeypatch.setattr(slots.psutil, "virtual_memory", lambda: type("Memory", (), {"available": 2**32})())
    beside = make_scheduler(engine, max_batch=2, max_len=64).model
    beside.pack_for(64, reserve=2**32 - 2**20)  # a server's KV budget would take nearly all of it
    assert beside.packed == {} and "in the 4,096 MiB free beside the KV budget (4,095 MiB)" in beside.packed_note


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_batch_invariance_holds_where_it_is_said_to(default_model: str, monkeypatch, dtype: str) -> None:
    """OWNLLM_BATCH_INVARIANT=1: where the model says its rows are invariant, three seeded requests together give
    each the log-probabilities it gets alone, bit for bit; where a row of its products rounds by its place in the
    step (bf16 on oneDNN here: the down projection's fourth row), it says it cannot hold, rather than claim it."""
    from ownllm.generate.open import open_engine

    monkeypatch.setenv("OWNLLM_BATCH_INVARIANT", "1")
    engine = open_engine(default_model, dtype=dtype)
    scheduler = BatchScheduler(engine, max_batch=4, max_len=256, prefix_caching=False)
    if not scheduler.model.invariant:
        assert "cannot hold" in scheduler.batching["invariance_note"] and not scheduler.batching["batch_invariant"]
        return
    params = SamplingParams(max_new_tokens=6, temperature=1.0)
    prompts = [engine.render_chat([{"role": "user", "content": question}])
               for question in ("Tell me a joke.", "What is the capital of Italy?", "Name three fruits.")]

    def run(batch: list[list[int]]) -> list[Completion]:
        done: dict[int, Completion] = {}
        scheduler.submit_all([Request(prompt, params, 3, lambda e, i=i: done.__setitem__(i, e)
                                      if isinstance(e, Completion) else None) for i, prompt in enumerate(batch)])
        scheduler.run_until_done()
        return [done[i] for i in range(len(batch))]

    alone = [run([prompt])[0] for prompt in prompts]
    together = run(prompts)
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]
    assert [c.sequence_logprob for c in together] == [c.sequence_logprob for c in alone]


def test_prompt_logprobs_score_each_prompt_token_as_transformers_does(engine) -> None:
    """SamplingParams.prompt_logprobs: every prompt token's log-probability given those before it, with the top
    ones at its position, over several prefill chunks, equal to transformers' own forward over the prompt; the
    prefix cache holds the prompt already (a scored request computes it anyway) and the completion is the same as
    without scoring."""
    ids = engine.encode("The quick brown fox jumps over the lazy dog, and then it runs far away. " * 3)
    scheduler = BatchScheduler(engine, max_batch=2, max_len=256, prefill_chunk=16)  # a chunk boundary every 16
    done: list[Completion] = []

    def run(params: SamplingParams) -> Completion:
        scheduler.submit(Request(ids, params, 0, lambda e: done.append(e) if isinstance(e, Completion) else None))
        scheduler.run_until_done()
        return done[-1]

    plain = run(SamplingParams(max_new_tokens=4))
    scored = run(SamplingParams(max_new_tokens=4, prompt_logprobs=3))
    assert scored.token_ids == plain.token_ids and scored.cached_tokens == 0 and plain.prompt_logprobs is None
    with torch.inference_mode():
        expected = torch.log_softmax(engine.model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)
    items = scored.prompt_logprobs
    assert [i.token_id for i in items] == ids and items[0].logprob is None and items[0].top == []
    assert items[0].token == engine.tokenizer.decode([ids[0]])
    got = torch.tensor([i.logprob for i in items[1:]])
    assert torch.allclose(got, expected[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0], atol=1e-4)
    for position, item in enumerate(items[1:]):
        top = torch.topk(expected[position], 3).values
        assert len(item.top) == 3 and torch.allclose(torch.tensor([lp for _, lp in item.top]), top, atol=1e-4)
    alone = engine.generate(ids, SamplingParams(max_new_tokens=4, prompt_logprobs=3))  # the Python API: one prompt
    assert alone.token_ids == plain.token_ids and len(alone.prompt_logprobs) == len(ids)
    assert torch.allclose(torch.tensor([i.logprob for i in alone.prompt_logprobs[1:]]), got, atol=1e-4)  # (its
    # chunks are 256 wide, not 16: the last bits differ)
    with pytest.raises(OwnLLMError, match="not with beam search") as refused:
        engine.generate("Hello", SamplingParams(strategy="beam", prompt_logprobs=0))
    assert refused.value.param == "prompt_logprobs"
