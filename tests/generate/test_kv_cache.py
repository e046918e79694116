"""KV memory that grows with use, and the prefix cache, on the real model: with the cache on, requests start from
earlier requests' KV and give the tokens they give with it off (greedy and seeded); under a small budget they wait,
evict and preempt, and all finish with the same tokens."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ownllm.generate.batching import BatchScheduler, Request
from ownllm.generate.engine import Completion
from ownllm.generate.kv_cache import parse_memory
from ownllm.generate.params import SamplingParams

pytestmark = pytest.mark.slow

SYSTEM = ("You are the help desk of a small bakery. Answer in one short sentence. Opening hours are 7 to 18 on "
          "weekdays and 8 to 14 on Saturdays; we are closed on Sundays. We bake sourdough, rye and spelt bread, and "
          "croissants on weekends. Orders for cakes need two days' notice.")
QUESTIONS = ["When do you open on Saturday?", "Do you bake rye bread?", "Can I order a cake for tomorrow?",
             "Are you open on Sunday?"]
GREEDY = SamplingParams(max_new_tokens=12)
SEEDED = SamplingParams(max_new_tokens=12, temperature=0.9, top_p=0.95)


def chat(engine: Any, *turns: tuple[str, str]) -> list[int]:
    messages = [{"role": "system", "content": SYSTEM}]
    messages += [{"role": role, "content": text} for role, text in turns]
    return engine.render_chat(messages)


def run(scheduler: BatchScheduler, prompts: list[list[int]], params: SamplingParams, seeds: list[int] | None = None,
        adapters: list[str | None] | None = None) -> list[Completion]:
    """All prompts queued at once, run to the end in this thread."""
    results: dict[int, Any] = {}

    def keep(index: int) -> Any:
        return lambda event: results.__setitem__(index, event) if isinstance(event, Completion | Exception) else None

    seeds = seeds or [0] * len(prompts)
    adapters = adapters or [None] * len(prompts)
    scheduler.submit_all([Request(p, params, s, keep(i), adapter=a)
                          for i, (p, s, a) in enumerate(zip(prompts, seeds, adapters, strict=True))])
    scheduler.run_until_done()
    assert all(isinstance(results[i], Completion) for i in range(len(prompts))), results
    return [results[i] for i in range(len(prompts))]


def repeated(scheduler: BatchScheduler, prompt: list[int]) -> int:
    """The cached tokens of a prompt sent again: all but the token whose logits choose the first token; or, where
    a forward of that one token would take other products than its chunk does without the cache (packed weights,
    narrow products, the int4 kernel), none of that last chunk."""
    if not scheduler.model.short_forward:
        return len(prompt) - 1
    return (len(prompt) - 1) // scheduler.prefill_chunk * scheduler.prefill_chunk


def tokens(completions: list[Completion]) -> list[list[int]]:
    return [c.token_ids for c in completions]


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_cache_on_and_off_give_the_same_tokens(engine: Any, params: SamplingParams) -> None:
    """A shared system prompt (copied from a running sequence, then from finished ones), a partial match (turn 2
    shares turn 1's prompt and part of its answer) and an exact repeat: the same tokens as without the cache."""
    first = [chat(engine, ("user", q)) for q in QUESTIONS]
    off = BatchScheduler(engine, max_batch=4, max_len=512, prefix_caching=False)
    on = BatchScheduler(engine, max_batch=4, max_len=512)
    seeds = [11, 12, 13, 14]
    wave_off, wave_on = run(off, first, params, seeds), run(on, first, params, seeds)
    assert tokens(wave_on) == tokens(wave_off)
    assert sum(c.cached_tokens for c in wave_on) >= 3 * 40  # the later three started from the first's system prompt
    assert all(c.cached_tokens == 0 for c in wave_off)
    # turn 2 resends turn 1 (its answer as the template renders it) and asks on; and one exact repeat
    second = [chat(engine, ("user", q), ("assistant", c.text), ("user", "Thanks. And on Monday?"))
              for q, c in zip(QUESTIONS, wave_off, strict=True)] + [first[0]]
    again_off, again_on = run(off, second, params, [21, 22, 23, 24, 11]), run(on, second, params, [21, 22, 23, 24, 11])
    assert tokens(again_on) == tokens(again_off)
    assert again_on[-1].token_ids == wave_on[0].token_ids
    assert again_on[-1].cached_tokens == repeated(on, first[0])
    for prompt, completion in zip(first, again_on, strict=False):
        assert completion.cached_tokens >= len(prompt)  # turn 1's prompt and some of its answer: not computed again
    stats = on.kv.stats
    assert stats.hit_tokens == sum(c.cached_tokens for c in wave_on + again_on) and stats.hit_tokens > 0


@pytest.mark.parametrize("narrow", [0, 3], ids=["packed", "narrow-and-packed"])
def test_a_fully_cached_prompt_is_computed_as_without_the_cache_on_packed_weights(
        engine: Any, monkeypatch: pytest.MonkeyPatch, narrow: int) -> None:
    """The same seeded request twice: the second finds its whole prompt cached and computes its last chunk whole
    again, as without the cache, not its last token alone (F.linear for one row beside packed weights, forced here;
    narrow products): the same logits bit for bit, so the same tokens (regression: a fresh home measured packed
    products faster, and a repeat's last token alone drew another token than the first request's)."""
    from ownllm.generate import slots

    monkeypatch.setattr(slots, "packed_products_win", lambda *args: True)
    monkeypatch.setattr(slots.SlotModel, "_measured_narrow_rows", lambda self: narrow)
    prompt = chat(engine, ("user", "Write a short poem about the usage of a stream."))
    params = SamplingParams(max_new_tokens=16, temperature=1.0)
    runs = {}
    for caching in (False, True):
        scheduler = BatchScheduler(engine, max_batch=2, max_len=256, prefix_caching=caching)
        weights = scheduler.model.weights
        for kept in ("packed", "packed_note", "packed_versions"):  # packed afresh here, as they were after
            monkeypatch.setattr(weights, kept, None if kept == "packed" else getattr(weights, kept))
        scheduler.model.packed, scheduler.model.packed_note = {}, None
        scheduler.model.pack_for(64)
        assert scheduler.model.packed and scheduler.model.short_forward == max(narrow, 1)
        runs[caching] = run(scheduler, [prompt], params, [7]) + run(scheduler, [prompt], params, [7])
    assert tokens(runs[True]) == tokens(runs[False])
    # bit for bit: each token's log-probability too (a rounding apart shows there before it flips a token)
    assert [c.sequence_logprob for c in runs[True]] == [c.sequence_logprob for c in runs[False]]
    assert runs[True][1].cached_tokens == 0  # (the prompt is one chunk: 98 tokens)


def test_under_batch_invariance_a_hit_is_of_whole_prefill_chunks_and_changes_no_logit(
        engine: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """OWNLLM_BATCH_INVARIANT=1: prompts that share the first 100 and 300 tokens of a longer one reuse only the
    whole 256-token chunks its prefill computed (none, then one), so every log-probability is the one computed
    without the cache, bit for bit. A match cut mid-chunk was not: the rest of that chunk, computed over fewer rows,
    rounded otherwise in the last bits (-8.251291871 against -8.251285791, fp32, here)."""
    monkeypatch.setenv("OWNLLM_BATCH_INVARIANT", "1")
    words = " ".join(f"Item {i} is {colour}." for i, colour in zip(range(42), ["red", "blue", "green"] * 14,
                                                                      strict=True))
    shared = chat(engine, ("user", words))
    assert 300 < len(shared) < 512 - 30
    tail = engine.tokenizer.encode(" Now name another colour.", add_special_tokens=False) + shared[-5:]
    prompts = [shared[:100] + tail, shared[:300] + tail]
    params = SamplingParams(max_new_tokens=4, temperature=1.0)
    runs = {}
    for caching in (False, True):
        scheduler = BatchScheduler(engine, max_batch=2, max_len=512, prefix_caching=caching)
        if not scheduler.model.invariant:  # a CPU whose products round a row by its place (an Ice Lake's fp32)
            assert "cannot hold" in scheduler.batching["invariance_note"] and not scheduler.kv.exact_only
            return
        assert scheduler.kv.exact_only
        run(scheduler, [shared], params, [5])
        runs[caching] = [run(scheduler, [prompt], params, [9])[0] for prompt in prompts]
    assert [c.cached_tokens for c in runs[True]] == [0, 256]
    assert tokens(runs[True]) == tokens(runs[False])
    assert [c.sequence_logprob for c in runs[True]] == [c.sequence_logprob for c in runs[False]]


def test_the_rest_after_a_prefix_cut_mid_chunk_takes_as_few_forwards_as_the_chunk_allows(
        engine: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A RAG-like request: a shared prefix that ends inside a chunk, then more new tokens than a chunk holds. The
    rest is computed from the match in two forwards of equal width, not three (the sliver to the chunk boundary, a
    whole chunk, a tail); a prompt without a cached prefix keeps the chunk grid."""
    monkeypatch.delenv("OWNLLM_BATCH_INVARIANT", raising=False)
    scheduler = BatchScheduler(engine, max_batch=2, max_len=1024, prefill_chunk=64)
    shared = chat(engine, ("user", "Keep this in mind. " * 6))[:-8]  # (ends inside the chunk grid)
    assert len(shared) % 64
    rest = engine.tokenizer.encode(" Then answer this question about the bakery, please. " * 10,
                                   add_special_tokens=False)[:90]
    assert len(rest) == 90
    widths: list[int] = []
    forward = scheduler.model.forward

    def counted(tokens: Any, *args: Any) -> Any:
        widths.append(int(tokens.shape[1]))
        return forward(tokens, *args)

    monkeypatch.setattr(scheduler.model, "forward", counted)
    other = engine.tokenizer.encode(" Hello", add_special_tokens=False)
    assert other[0] != rest[0]
    first = run(scheduler, [shared + other], GREEDY)[0]
    assert first.cached_tokens == 0
    prefill = widths[: -(-(len(shared) + len(other)) // 64)]
    assert prefill[:-1] == [64] * (len(prefill) - 1)  # the grid, from position 0
    widths.clear()
    second = run(scheduler, [shared + rest], GREEDY)[0]
    assert second.cached_tokens == len(shared)
    assert widths[:2] == [45, 45] and all(w == 1 for w in widths[2:])  # 90 new tokens: two forwards, then decode


def test_a_small_budget_evicts_and_preempts_and_every_request_finishes_the_same(engine: Any) -> None:
    """A budget for about two of four long requests: they wait, cached prefixes are dropped, running ones are
    preempted and computed again — and each gives the tokens it gives with memory to spare."""
    prompts = [chat(engine, ("user", q + " Please explain at length.")) for q in QUESTIONS]
    params = SamplingParams(max_new_tokens=48, ignore_eos=True)
    roomy = run(BatchScheduler(engine, max_batch=4, max_len=256, prefix_caching=False), prompts, params)
    tight = BatchScheduler(engine, max_batch=4, max_len=256)
    tight.headroom = 16
    # two requests start (each with room for its prompt and 16 tokens) but cannot both grow to 48 tokens
    start = -(-(max(len(p) for p in prompts) + 16) // 16) * 16
    tight.kv.budget = max(2 * start + 16, 256)
    squeezed = run(tight, prompts, params)
    assert tokens(squeezed) == tokens(roomy)
    assert tight.kv.stats.preemptions > 0
    assert tight.kv.used <= tight.kv.budget
    again = run(tight, prompts[:1], SamplingParams(max_new_tokens=8))  # the cache is usable after all that
    assert again[0].token_ids == roomy[0].token_ids[:8]


def test_a_prefix_cached_for_one_adapter_is_never_reused_for_another(engine: Any, adapter_dir: Path) -> None:
    prompt = chat(engine, ("user", QUESTIONS[0]))
    off = BatchScheduler(engine, max_batch=4, max_len=512, prefix_caching=False)
    on = BatchScheduler(engine, max_batch=4, max_len=512)
    for scheduler in (off, on):
        scheduler.load_adapter("tuned", adapter_dir)
        scheduler.load_adapter("other", adapter_dir)  # the same files: the same weights, but another adapter
    order = [None, "tuned", None, "other", "tuned"]
    expected = [run(off, [prompt], GREEDY, adapters=[a])[0] for a in order]
    got = [run(on, [prompt], GREEDY, adapters=[a])[0] for a in order]
    assert tokens(got) == tokens(expected)
    assert expected[0].token_ids != expected[1].token_ids  # the adapter changes the answer
    # each adapter's first request computes its prompt; only a repeat for the same adapter (or base) is cached
    repeat = repeated(on, prompt)
    assert [c.cached_tokens for c in got] == [0, 0, repeat, 0, repeat]
    on.unload_adapter("tuned")
    run(on, [prompt], SamplingParams(max_new_tokens=1))  # the loop drops a retired adapter's cached prefixes
    assert all(h.owner is None or h.owner[0] != "tuned" for h in on.kv.finished.values())


def test_memory_grows_with_use(engine: Any) -> None:
    """Nothing is reserved up front; a sequence holds its prompt and a stretch ahead, and grows past it."""
    scheduler = BatchScheduler(engine, max_batch=64, max_len=2048, prefix_caching=False)
    assert scheduler.model.cache_bytes == 0  # 64 x 2048 positions are a budget, not an allocation
    scheduler.headroom = 16
    prompt = chat(engine, ("user", QUESTIONS[0]))
    sizes = []
    real_reserve = scheduler.model.reserve
    scheduler.model.reserve = lambda sequence, positions: (sizes.append(positions), real_reserve(sequence, positions))
    long = run(scheduler, [prompt], SamplingParams(max_new_tokens=64, ignore_eos=True))[0]
    assert len(long.token_ids) == 64
    assert sizes[0] == -(-(len(prompt) + 16) // 16) * 16 and len(sizes) > 1  # its prompt and 16, then grown
    assert scheduler.kv.used == 0 and scheduler.model.cache_bytes == 0  # freed when it finished (cache off)


@pytest.mark.parametrize(("text", "expected"), [("2GiB", 2 * 2**30), ("512MiB", 512 * 2**20), ("1.5G", 1_500_000_000),
                                                ("800 MB", 800_000_000), ("1048576", 1 << 20)])
def test_memory_sizes(text: str, expected: int) -> None:
    assert parse_memory(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "-1G", "0", "2XB", "nanG", "infG", "1e999G"])
def test_memory_sizes_that_are_not(text: str) -> None:
    with pytest.raises(ValueError):
        parse_memory(text)


@pytest.mark.skipif(not __import__("ownllm.generate.llamacpp", fromlist=["x"]).llama_cpp_available(),
                    reason="llama-cpp-python (extra `llama`) is not installed")
def test_llama_cpp_reuses_a_finished_stream_in_place(default_model: str) -> None:
    """On llama.cpp a finished sequence's stream is taken over by the next request that shares its prefix (its
    later cells dropped), as llama-server reuses a slot. Only the cache's use is checked after the first wave:
    llama.cpp's batched decoding is not batch-invariant (the same prompt decoded next to another request can take
    another greedy path even with the cache off), and its KV of a token decoded alone differs in the last bits from
    the same token prefilled (llama-server's own prompt cache warns of the same)."""
    from ownllm.generate.open import open_engine

    engine = open_engine(default_model, backend="llama.cpp")
    first = [chat(engine, ("user", q)) for q in QUESTIONS[:2]]
    results = []
    for caching in (False, True):
        scheduler = BatchScheduler(engine, max_batch=2, max_len=512, prefix_caching=caching)
        try:
            wave = run(scheduler, first, GREEDY, [1, 2])
            turn2 = chat(engine, ("user", QUESTIONS[0]), ("assistant", wave[0].text), ("user", "And on Sunday?"))
            results.append(wave + run(scheduler, [turn2, first[1]], GREEDY, [3, 4]))
            assert scheduler.kv.stats.reuse_counts.get("copy", 0) == 0  # streams are never copied
        finally:
            scheduler.model.close()  # type: ignore[attr-defined]
    off, on = results
    assert tokens(on[:2]) == tokens(off[:2])
    assert [c.cached_tokens for c in off] == [0, 0, 0, 0]
    assert on[2].cached_tokens >= len(first[0]) and on[3].cached_tokens == len(first[1]) - 1


def test_a_request_preempted_again_while_it_is_recomputed_keeps_all_it_had(engine: Any) -> None:
    """Preempted mid-answer, then again before or during its re-prefill (which takes several chunks): what it must
    hold again never shrinks, and it ends with the tokens of a run that was never preempted."""
    prompt = chat(engine, ("user", " ".join(["river city market light winter garden story"] * 45)))
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    expected = run(BatchScheduler(engine, max_batch=2, max_len=1024, prefix_caching=False), [prompt], params)[0]
    scheduler = BatchScheduler(engine, max_batch=2, max_len=1024, prefix_caching=False)
    done: list[Any] = []
    request = Request(prompt, params, 0, lambda e: done.append(e) if isinstance(e, Completion) else None)
    scheduler.submit(request)
    while len(request.kv_tokens) < len(prompt) + 3:  # prefilled (two chunks) and three tokens decoded
        scheduler._step()
    held = list(request.kv_tokens)
    scheduler._preempt(request)  # what making room for an earlier request does to the last admitted one
    assert request.known == held
    with scheduler.cond:
        scheduler._admit()
    scheduler._preempt(request)  # again, before its first re-prefill chunk
    assert request.known == held
    with scheduler.cond:
        scheduler._admit()
    scheduler._prefill_one_chunk()
    assert 0 < len(request.kv_tokens) < len(held)
    scheduler._preempt(request)  # and again, between its re-prefill chunks
    assert request.known == held
    scheduler.run_until_done()
    assert done[0].token_ids == expected.token_ids


def test_a_freed_kv_buffer_leaves_the_resident_memory() -> None:
    """A sequence's CPU KV buffer is a mapping of its own, unmapped when its last tensor goes (a sequence that grew
    into a larger one, or ended), whatever malloc would have kept in its heap."""
    import gc

    import torch

    from ownllm.generate.slots import _kv_buffer

    def mapping_of(address: int) -> tuple[int, int] | None:
        with open("/proc/self/maps") as maps:
            for line in maps:
                low, high = (int(part, 16) for part in line.split()[0].split("-"))
                if low <= address < high:
                    return low, high
        return None

    shape = (30, 2, 3, 2048, 64)  # 45 MiB
    buffer = _kv_buffer(shape, torch.bfloat16, torch.device("cpu"))
    assert buffer.shape == shape and buffer.dtype == torch.bfloat16 and buffer.is_contiguous()
    assert not buffer.any()  # fresh pages read as zeros
    buffer.fill_(1)
    start, size = buffer.data_ptr(), buffer.numel() * 2

    def mapped() -> bool:  # one mapping holds the whole buffer (the kernel may merge it with a neighbour's, and a
        # neighbour may come and go meanwhile: its bounds are not the buffer's)
        own = mapping_of(start)
        return own is not None and own[0] <= start and start + size <= own[1]

    assert mapped()
    view = buffer[3, 1]  # a layer's view keeps the mapping alive
    del buffer
    gc.collect()
    assert view.sum().item() == 3 * 2048 * 64 and mapped()
    del view
    gc.collect()
    assert not mapped()
    assert _kv_buffer((30, 2, 3, 0, 64), torch.bfloat16, torch.device("cpu")).numel() == 0
