"""KV memory for the continuous-batching scheduler: a budget counted in blocks, sequences that take blocks as they
grow, and a prefix cache of finished sequences that later requests start from.

The budget is tokens of KV (`--kv-memory` / the model's bytes per token), counted in blocks of `block` tokens. A
sequence holds blocks for what it has and a little ahead (geometric growth, so a long answer is copied a few times
rather than once per block); nothing is reserved for tokens no one has asked for, so `--max-batch 64` costs what
its 64 sequences hold, not 64 x the context.

Prefix caching, the way llama.cpp's server reuses a slot's prompt: a sequence that finishes keeps its KV, in LRU
order, as long as the memory is not needed. A new request looks for the longest common token prefix among them
and among running sequences (of the same adapter: keys computed with other weights are other keys); it takes a
finished one over in place when the match covers most of it, else copies the matched part, and prefills only the
rest. Under pressure the least recently used are dropped first; when even that is not enough, the running
sequence admitted last is preempted (its KV freed, to be computed again from its tokens when memory is back), the
way vLLM does, so nothing ever allocates past the budget.

The model provides the storage (`KVStorage`: `SlotModel` keeps a growing tensor per sequence; llama.cpp keeps a
fixed stream per sequence id and cannot copy between streams, so it only reuses a stream in place).
"""

from __future__ import annotations

import collections
import itertools
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from ownllm.errors import OwnLLMError

GROWTH = 1.25  # capacity grows by at least a quarter: ~7 copies from 300 to 1,500 tokens, at most 25% unused
MIN_MATCH_BLOCKS = 1  # a shared prefix shorter than a block is not worth a copy


class KVStorage(Protocol):
    """What a batched forward offers the cache: per-sequence KV that can be sized, cut, copied and freed."""

    token_bytes: int  # bytes of KV per token (0 when unknown: llama.cpp's context is sized at start)
    fixed_capacity: int | None  # every sequence holds this many tokens (llama.cpp's streams), or None: it grows
    max_sequences: int | None  # sequence ids available (llama.cpp's n_seq_max), or None: unbounded

    def reserve(self, sequence: int, tokens: int) -> None:
        """Room for `tokens` tokens in `sequence` (allocated or grown; what it holds is kept)."""
        ...

    def truncate(self, sequence: int, tokens: int) -> None:
        """Forget what `sequence` holds after its first `tokens` tokens."""
        ...

    def copy_prefix(self, source: int, target: int, tokens: int) -> bool:
        """Copy the first `tokens` tokens' KV of `source` into `target` (reserved); False when it cannot."""
        ...

    def release(self, sequence: int) -> None:
        """Free everything `sequence` holds."""
        ...


@dataclass
class _Held:
    capacity: int  # tokens of room this sequence holds (counted against the budget)
    tokens: np.ndarray | None = None  # a finished sequence's tokens (the prefix cache); None while running
    owner: Any = None  # what computed its keys: None (the base model) or (adapter name, adapter weights)
    # its first tokens whose KV whole prefill chunks computed, as a cache-off prefill of them would (a multiple of
    # the chunk: a shorter last chunk, or tokens decoded one at a time, round otherwise)
    exact: int = 0


@dataclass
class Start:
    """Where a new sequence starts: its id and how many tokens of its prompt are already in it."""

    sequence: int
    cached: int


@dataclass
class CacheStats:
    queried_tokens: int = 0  # prompt tokens looked up in the prefix cache
    hit_tokens: int = 0  # of those, tokens that did not have to be computed
    evictions: int = 0  # finished sequences dropped for room
    preemptions: int = 0  # running sequences sent back to wait for memory
    reuse_counts: collections.Counter[str] = field(default_factory=collections.Counter)  # "in place" | "copy"


class KVCache:
    """The KV budget of one batched model, its running sequences, and its prefix cache."""

    def __init__(self, storage: KVStorage, *, budget_tokens: int, max_len: int, block: int = 16,
                 prefix_caching: bool = True, extra_positions: int = 0, prefill_chunk: int = 0) -> None:
        """
        Args:
            storage: the batched model.
            budget_tokens: KV tokens all sequences together may hold (at least one full sequence).
            max_len: tokens one sequence may hold.
            block: the unit memory is counted and handed out in.
            prefix_caching: keep finished sequences for later requests that start the same way.
            extra_positions: positions each sequence holds in front of its tokens (prompt-tuning prefix).
            prefill_chunk: prompt tokens per prefill forward, chunks ending at its multiples (the scheduler's): a
                match stops short where the rest of its chunk would be computed otherwise than without the cache;
                and where the storage is batch invariant (`invariant`: a row's logits are promised not to depend
                on the rows beside it), a match is only ever of whole chunks that prefill computed, so a request
                gets the same logits bit for bit with the cache on and off (a chunk cut at the match rounds
                otherwise: matrix products and attention over fewer rows differ in the last bits).
        """
        self.storage = storage
        self.block = block
        self.max_len = max_len
        self.extra = extra_positions
        self._fixed = storage.fixed_capacity
        self.budget = max(budget_tokens, self._round(max_len))
        self.prefix_caching = prefix_caching
        self.prefill_chunk = prefill_chunk
        self.live: dict[int, _Held] = {}
        self.finished: collections.OrderedDict[int, _Held] = collections.OrderedDict()  # least recently used first
        self.used = 0
        self.stats = CacheStats()
        self._ids = itertools.count()
        self._cached_count = 0

    # --- accounting -------------------------------------------------------------------------------
    def _round(self, tokens: int) -> int:
        if self._fixed is not None:
            return self._fixed
        tokens = min(tokens, self.max_len)
        return -(-tokens // self.block) * self.block

    @property
    def free(self) -> int:
        return self.budget - self.used

    @property
    def cached_tokens(self) -> int:
        """Tokens held by finished sequences (the prefix cache). A count kept as they come and go: /metrics reads
        it from the HTTP thread while the engine thread changes `finished`."""
        return self._cached_count

    def usage(self) -> float:
        """Share of the budget held, running and cached together."""
        return self.used / self.budget

    def _new_id(self) -> int | None:
        limit = self.storage.max_sequences
        if limit is None:
            return next(self._ids)
        taken = self.live.keys() | self.finished.keys()
        for sequence in range(limit):
            if sequence not in taken:
                return sequence
        return None

    def _evict_for(self, tokens: int, ids: int = 0, keep: int | None = None) -> bool:
        """Drop least recently used finished sequences until `tokens` more fit (and `ids` sequence ids are free)."""
        while self.free < tokens or (ids and self._free_ids() < ids):
            victim = next((s for s in self.finished if s != keep), None)
            if victim is None:
                return False
            self._drop(victim)
            self.stats.evictions += 1
        return True

    def _free_ids(self) -> int:
        limit = self.storage.max_sequences
        return 1 << 30 if limit is None else limit - len(self.live) - len(self.finished)

    def _drop(self, sequence: int) -> None:
        held = self.finished.pop(sequence, None) or self.live.pop(sequence)
        if held.tokens is not None:
            self._cached_count -= len(held.tokens)
        self.used -= held.capacity
        self.storage.release(sequence)

    # --- the scheduler's calls -----------------------------------------------------------------------
    def start(self, known: list[int], owner: Any, running: list[tuple[int, list[int], Any]] | None, want: int
              ) -> Start | None:
        """A sequence for a request whose first tokens are `known`, with room for `want` tokens, started from the
        longest cached or running prefix of `owner`'s; None when memory is short (the request waits; running
        sequences are never preempted to admit one).

        Args:
            known: the tokens the sequence must hold before it decodes on (its prompt, or all it had when preempted).
            owner: None for the base model, or (adapter name, adapter weights).
            running: (sequence, tokens it holds, owner) of the running sequences (copy sources); None: start
                from nothing cached (the request needs every position computed).
            want: tokens of room to start with (at least len(known)).
        """
        match, source, in_place = self._best_match(known, owner, running)
        capacity = self._round(max(want, len(known)))
        if in_place:
            held = self.finished[source]  # type: ignore[index]
            extra = max(0, capacity - held.capacity)
            evictable = sum(h.capacity for s, h in self.finished.items() if s != source)
            if self.free + evictable < extra:
                return None  # (it stays where it is in the LRU order)
            del self.finished[source]  # type: ignore[arg-type]
            self._cached_count -= len(held.tokens)  # type: ignore[arg-type]
            held.tokens, held.owner, held.exact = None, owner, self._whole_chunks(len(known))
            self.live[source] = held  # type: ignore[index]
            self._evict_for(extra)
            try:
                self.storage.truncate(source, match)  # type: ignore[arg-type]
                self._grow_to(source, capacity)  # type: ignore[arg-type]
            except BaseException:
                self._drop(source)  # type: ignore[arg-type]
                raise
            self.stats.queried_tokens += len(known)
            self._hit(match, "in place")
            return Start(source, match)  # type: ignore[arg-type]
        if not self._evict_for(capacity, ids=1, keep=source):
            # the prefix to copy takes the room the copy needs: start without it rather than wait for nothing
            if source is None or not self._evict_for(capacity, ids=1):
                return None
            if source not in self.finished and source not in self.live:
                match, source = 0, None
        sequence = self._new_id()
        assert sequence is not None  # _evict_for freed one
        self.storage.reserve(sequence, capacity + self.extra)
        self.live[sequence] = _Held(capacity, owner=owner, exact=self._whole_chunks(len(known)))
        self.used += capacity
        self.stats.queried_tokens += len(known)
        try:
            copied = bool(match) and source is not None and self.storage.copy_prefix(source, sequence, match)
        except BaseException:
            self._drop(sequence)
            raise
        if copied:
            if source in self.finished:
                self.finished.move_to_end(source)
            self._hit(match, "copy")
            return Start(sequence, match)
        return Start(sequence, 0)

    def catch_up(self, sequence: int, known: list[int], have: int, owner: Any,
                 running: list[tuple[int, list[int], Any]]) -> int:
        """Just before a started sequence computes its first chunk: copy in a longer prefix than the `have` tokens
        it started with, if a sequence computed one since (requests that arrive together start together; by the
        time the second one prefills, the first one has the shared system prompt). Returns the tokens it holds."""
        others = [entry for entry in running if entry[0] != sequence]
        match, source, _ = self._best_match(known, owner, others)
        if match <= have or source is None or source == sequence:
            return have
        if not self.storage.copy_prefix(source, sequence, match):
            return have
        if source in self.finished:
            self.finished.move_to_end(source)
        self._hit(match - have, "copy")
        return match

    def _hit(self, tokens: int, how: str) -> None:
        self.stats.hit_tokens += tokens
        self.stats.reuse_counts[how] += 1

    def _best_match(self, known: list[int], owner: Any, running: list[tuple[int, list[int], Any]] | None
                    ) -> tuple[int, int | None, bool]:
        """(tokens matched, the sequence holding them, whether to take that finished sequence over in place)."""
        if not self.prefix_caching or running is None or len(known) < 2:
            return 0, None, False
        wanted = np.asarray(known, dtype=np.int64)
        limit = len(known) - 1  # the last prompt token is always computed: its logits choose the first token
        best, source, finished = 0, None, False
        exact_only = self.exact_only
        candidates = [(s, h.tokens, h.owner, True) for s, h in self.finished.items()]
        candidates += [(s, np.asarray(tokens, dtype=np.int64), o, False) for s, tokens, o in running]
        for sequence, tokens, held_owner, is_finished in candidates:
            if tokens is None or not _same_owner(held_owner, owner):
                continue
            length = _common_prefix(wanted, tokens, limit)
            if exact_only:
                held = self.finished.get(sequence) or self.live.get(sequence)
                length = self._whole_chunks(min(length, held.exact if held is not None else 0))
            if length > best or (length == best and length and is_finished and not finished):
                best, source, finished = length, sequence, is_finished
        best = self._computed_alike(best, len(known))
        if best < MIN_MATCH_BLOCKS * self.block:
            return 0, None, False
        if not finished and self._fixed is not None:
            return 0, None, False  # llama.cpp cannot copy between streams
        if finished:
            held = self.finished[source]  # type: ignore[index]
            assert held.tokens is not None
            # take it over when the request keeps most of it (or the storage cannot copy): else copy, and keep it
            in_place = best * 2 >= len(held.tokens) or self._fixed is not None
            return best, source, in_place
        return best, source, False

    @property
    def exact_only(self) -> bool:
        """Whether matches are whole prefill chunks only (the storage is batch invariant), so that a hit never
        changes a logit."""
        return bool(self.prefill_chunk) and getattr(self.storage, "invariant", None) is True

    def _whole_chunks(self, tokens: int) -> int:
        return tokens // self.prefill_chunk * self.prefill_chunk if self.prefill_chunk else 0

    def _computed_alike(self, match: int, length: int) -> int:
        """`match`, or the start of its prefill chunk where the tokens after it would be too few to be computed as
        the whole chunk is without the cache: a forward of `short_forward` tokens or fewer takes other products
        (F.linear for one row beside packed weights, narrow ones, the int4 kernel), whose rows round otherwise, so a
        fully cached prompt's last token alone got other logits than in its chunk (and a seeded request other
        tokens with the cache than without). The whole chunk again is the same forward, bit for bit; its last few
        tokens were not (packed products of 4 rows and of 98 differed in the last bits here). (The rest of a
        longer prompt is computed from the match in forwards of equal width: `BatchScheduler._chunk_end`.)"""
        short, chunk = getattr(self.storage, "short_forward", 0), self.prefill_chunk
        if short and chunk and match % chunk and length - match <= short:
            return match // chunk * chunk
        return match

    def grow(self, sequence: int, tokens: int) -> bool:
        """Room for `tokens` tokens in a running sequence: True when it has it (dropping cached prefixes as needed),
        False when only preempting running sequences could make it."""
        held = self.live[sequence]
        if tokens <= held.capacity:
            return True
        capacity = self._round(max(tokens, int(held.capacity * GROWTH)))
        if not self._evict_for(capacity - held.capacity):
            capacity = self._round(tokens)  # the least that will do
            if not self._evict_for(capacity - held.capacity):
                return False
        self._grow_to(sequence, capacity)
        return True

    def _grow_to(self, sequence: int, capacity: int) -> None:
        held = self.live[sequence]
        if capacity > held.capacity:
            self.storage.reserve(sequence, capacity + self.extra)
            self.used += capacity - held.capacity
            held.capacity = capacity

    def finish(self, sequence: int, tokens: list[int] | None) -> None:
        """A sequence left the batch: keep it for later prefixes when `tokens` (what it holds) are given and prefix
        caching is on, else free it."""
        held = self.live.pop(sequence)
        if tokens is None or not self.prefix_caching or len(tokens) < self.block:
            self.used -= held.capacity
            self.storage.release(sequence)
            return
        held.tokens = np.asarray(tokens, dtype=np.int64)
        self.finished[sequence] = held
        self._cached_count += len(held.tokens)

    def preempted(self, sequence: int) -> None:
        """A running sequence gives its memory back (it will be computed again)."""
        self.stats.preemptions += 1
        self.finish(sequence, None)

    def forget_owner(self, name: str) -> None:
        """Drop the cached prefixes of an adapter that is gone."""
        for sequence in [s for s, h in self.finished.items() if h.owner is not None and h.owner[0] == name]:
            self._drop(sequence)


def _same_owner(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a[0] == b[0] and a[1] is b[1]


def _common_prefix(a: np.ndarray, b: np.ndarray, limit: int) -> int:
    """Length of the common prefix of two token arrays, at most `limit`."""
    n = min(len(a), len(b), limit)
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if differ.size else n


def kv_budget(storage: KVStorage, kv_memory: int | None, max_batch: int, max_len: int) -> int:
    """Tokens of KV a batched model may hold. llama.cpp: its streams, sized at start. Otherwise `kv_memory` bytes,
    by default what `max_batch` full-length sequences would hold but at most a quarter of the memory free now (and at
    least one full sequence): an upper bound, allocated only as sequences grow. A `kv_memory` below one sequence, or
    above the free memory of the CPU it would live on, is refused."""
    if storage.fixed_capacity is not None:
        return storage.fixed_capacity * (storage.max_sequences or max_batch)
    import psutil

    free = psutil.virtual_memory().available
    one_sequence = max_len * storage.token_bytes
    if kv_memory is None:
        return max(min(max_batch * one_sequence, free // 4), one_sequence) // max(1, storage.token_bytes)
    device = getattr(storage, "device", None)
    if device is not None and device.type == "cpu" and kv_memory > free:
        raise OwnLLMError(f"--kv-memory {kv_memory / 2**30:,.2f} GiB is more than the free memory "
                          f"({free / 2**30:,.2f} GiB)", param="kv_memory", hint="give less")
    budget = kv_memory // max(1, storage.token_bytes)
    if budget < max_len:
        raise OwnLLMError(f"--kv-memory {kv_memory:,} bytes holds {budget:,} tokens of KV, less than one sequence of "
                          f"{max_len:,} tokens ({one_sequence / 2**20:,.0f} MiB at {storage.token_bytes:,} bytes per "
                          "token)", param="kv_memory", hint="give more, or a smaller --max-model-len")
    return budget


def parse_memory(text: str) -> int:
    """Bytes from '2GiB', '512MiB', '1.5G', '800M' or a plain number of bytes; ValueError otherwise."""
    units = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12,
             "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
    cleaned = text.strip().lower().replace(" ", "")
    number = cleaned.rstrip("kmgtib")
    unit = cleaned[len(number):]
    if unit not in units:
        raise ValueError(text)
    value = float(number) * units[unit]
    if not value > 0 or value != value or value == float("inf"):
        raise ValueError(text)
    return int(value)
