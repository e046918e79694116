"""Continuous batching: one engine loop in its own thread serves many requests at once.

Between decode steps the loop admits waiting requests (up to `max_batch` running, as the KV budget allows: see
`ownllm.generate.kv_cache`), prefills one prompt chunk, then advances every running sequence by one token in a
single batched forward; each request keeps its own sampling parameters, constraint (a grammar state of its own;
the constrained rows' masks are computed together before each step), stop strings and token budget, and leaves the
batch the moment it finishes or its client goes away. Events go to each request's `sink` from the loop thread.

A request starts after the longest prefix the KV cache already holds for it (an earlier turn of its conversation,
a system prompt other requests share) and prefills the rest. Its KV grows as it does; when the budget is spent,
the request admitted last is preempted: its KV is freed, it goes back to the head of the queue, and it is computed
again from the tokens it had (its stream pauses; its sampler state is kept, so its tokens are the same).

What decodes the batch is the engine's: `Engine.batched_model` (the slot forward of the transformers
backend, llama.cpp's batched decoding of a GGUF). `SerialScheduler` offers the same interface for engines that
cannot batch (`Engine.batching_mode` says why): one request at a time, in order. `generate_together` runs a
fixed set of prompts through a `BatchScheduler` in the calling thread: `Engine.generate_batch` (`eval qa`,
replay) decodes with the same loop as the server.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ownllm.errors import OwnLLMError
from ownllm.generate.constraints import fill_masks
from ownllm.generate.engine import BatchedModel, Completion, Decoding, Engine, TextDelta, choose_step, scored_tokens
from ownllm.generate.kv_cache import KVCache, kv_budget
from ownllm.generate.params import SamplingParams
from ownllm.generate.slots import PREFILL_CHUNK

log = logging.getLogger(__name__)
Event = TextDelta | Completion | BaseException
Sink = Callable[[Event], None]
_ids = itertools.count(1)


class QueueFull(OwnLLMError):
    def __init__(self, depth: int) -> None:
        super().__init__(f"the server is busy ({depth} requests waiting)", kind="resource",
                         hint="retry after a moment")


@dataclass(eq=False)
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    sink: Sink
    adapter: str | None = None
    id: int = field(default_factory=lambda: next(_ids))
    cancelled: threading.Event = field(default_factory=threading.Event)
    enqueued_at: float = field(default_factory=time.perf_counter)
    # set by the loop
    sequence: int | None = None  # its KV in the batched model (`KVCache`)
    known: list[int] = field(default_factory=list)  # what its KV must hold before it decodes on
    kv_tokens: list[int] = field(default_factory=list)  # what its KV holds, in order
    cached_tokens: int = 0  # prompt tokens the prefix cache gave it
    caught_up: bool = False  # looked for a longer cached prefix just before its first prefill chunk
    owner: Any = None  # whose weights compute its keys (`BatchScheduler._owner`), fixed when it starts
    decoding: Decoding | None = None
    generator: torch.Generator | None = None
    seen: torch.Tensor | None = None
    next_token: int | None = None  # chosen, not yet in the KV

    def cancel(self) -> None:
        self.cancelled.set()

    @property
    def prefilling(self) -> bool:
        return len(self.kv_tokens) < len(self.known)


class _Loop:
    """Thread plumbing shared by both schedulers: a waiting queue, a condition, start/stop."""

    def __init__(self, engine: Engine, *, max_queue: int) -> None:
        self.engine = engine
        self.max_queue = max_queue
        self.waiting: collections.deque[Request] = collections.deque()
        self.cond = threading.Condition()
        self.stopping = False
        self.accepting = True
        self.thread = threading.Thread(target=self._run, name="ownllm-engine", daemon=True)

    def start(self) -> None:
        """Run the loop in a thread of its own (tests, the Python API)."""
        self.thread.start()

    def run_here(self) -> None:
        """Run the loop in the calling thread until `stop`. Servers call this from the main thread: on these
        CPUs, torch's and llama.cpp's OpenMP workers hand work over measurably faster (~1.5x here) to the
        thread that first used them than to a thread started later."""
        self._run()

    def submit(self, request: Request) -> Request:
        self.submit_all([request])
        return request

    def submit_all(self, requests: list[Request], choices_param: str = "n") -> None:
        """Queue every request or none: a refusal (queue full, shutting down) leaves no part of a multi-prompt
        or n > 1 request generating for a client that has been told no. `choices_param`: the request field that
        asked for several sequences per prompt (`n`, or `best_of`), named in the refusal of too many."""
        if len(requests) > self.max_queue:
            raise OwnLLMError(f"one request may start at most {self.max_queue} sequences (prompts x "
                              f"{choices_param}), this one asks for {len(requests)}", param=choices_param)
        with self.cond:
            if not self.accepting:
                raise OwnLLMError("the server is shutting down", kind="resource")
            if len(self.waiting) + len(requests) > self.max_queue:
                raise QueueFull(len(self.waiting))
            self.waiting.extend(requests)
            self.cond.notify()

    def stop(self, drain_seconds: float = 10.0) -> None:
        """Stop taking requests, let running ones finish for up to `drain_seconds`, cancel the rest."""
        with self.cond:
            self.accepting = False
        deadline = time.monotonic() + drain_seconds
        while self.busy() and time.monotonic() < deadline:
            time.sleep(0.05)
        with self.cond:
            for request in list(self.waiting) + self.running_requests():
                request.cancel()
            self.stopping = True
            self.cond.notify()
        if self.thread.is_alive():
            self.thread.join(timeout=5)

    def busy(self) -> bool:
        return bool(self.waiting) or bool(self.running_requests())

    @property
    def batching(self) -> dict[str, Any]:
        """How this scheduler runs requests, for /health: {"mode": "batched", "max_batch": n} or
        {"mode": "serial", "reason": why the engine cannot batch}."""
        raise NotImplementedError

    def running_requests(self) -> list[Request]:
        raise NotImplementedError

    def _run(self) -> None:
        raise NotImplementedError

    @staticmethod
    def _emit(request: Request, event: Event) -> None:
        try:
            request.sink(event)
        except Exception:  # a broken sink (client gone) must not stop the loop
            log.exception("dropping events of request %s", request.id)
            request.cancel()


class BatchScheduler(_Loop):
    """Continuous batching over the engine's batched forward (`Engine.batched_model`)."""

    def __init__(self, engine: Engine, *, max_batch: int = 16, max_queue: int = 64, max_len: int | None = None,
                 prefill_chunk: int = PREFILL_CHUNK, kv_memory: int | None = None, prefix_caching: bool = True,
                 four_bit: bool = False) -> None:
        """
        Args:
            max_batch: sequences decoded together.
            max_len: tokens per sequence (prompt and completion; default: the model's context).
            prefill_chunk: prompt tokens per prefill forward (chunks start at its multiples).
            kv_memory: bytes of KV all sequences (and the prefix cache) may hold; default and checks: `kv_budget`.
            prefix_caching: start requests from the KV of earlier ones that began the same way.
            four_bit: a GGUF's 4-bit tensors run as stored in steps of few rows (`Engine.batched_model`).
        """
        super().__init__(engine, max_queue=max_queue)
        self.max_batch = max_batch
        self.max_len = min(max_len or engine.context_length, engine.context_length)
        self.prefill_chunk = prefill_chunk
        model = engine.batched_model(max_batch, self.max_len, four_bit=four_bit)
        if model is None:
            raise OwnLLMError(f"{engine.name} cannot decode in batches: {engine.batching_mode()[1]}",
                              kind="unsupported")
        self.model: BatchedModel = model
        budget = kv_budget(model, kv_memory, max_batch, self.max_len)
        self.kv = KVCache(model, budget_tokens=budget, max_len=self.max_len, prefix_caching=prefix_caching,
                          extra_positions=getattr(model, "prefix_len", 0), prefill_chunk=prefill_chunk)
        self.running: list[Request] = []
        self.retiring: set[str] = set()
        self.headroom = 128  # tokens of answer a sequence starts with room for (it grows from there)

    @property
    def context_length(self) -> int:
        return self.max_len

    def running_requests(self) -> list[Request]:
        return list(self.running)

    @property
    def batching(self) -> dict[str, Any]:
        return {"mode": "batched", "max_batch": self.max_batch, "kv_tokens": self.kv.budget,
                "kv_bytes": self.kv.budget * self.model.token_bytes, "prefix_caching": self.kv.prefix_caching,
                "int4_rows": getattr(self.model, "four_bit_rows", 0),
                "narrow_rows": getattr(self.model, "narrow_rows", 0),
                "batch_invariant": getattr(self.model, "invariant", None),  # None: not known (llama.cpp)
                **({"int4_note": note} if (note := getattr(self.model, "four_bit_note", None)) else {}),
                **({"packed_weights": note} if (note := getattr(self.model, "packed_note", None)) else {}),
                **({"compiled_steps": note} if (note := getattr(self.model, "compiled_steps", None)) else {}),
                **({"invariance_note": note} if (note := getattr(self.model, "invariance_note", None)) else {}),
                # a batch-invariant model's cache reuses whole prefill chunks only (KVCache.exact_only)
                **({"prefix_exact_chunks": self.prefill_chunk} if self.kv.prefix_caching and self.kv.exact_only
                   else {})}

    def load_adapter(self, name: str, folder: Any) -> None:
        self.retiring.discard(name)
        self.model.load_adapter(name, folder)

    def unload_adapter(self, name: str) -> None:
        """Drop an adapter's weights once no running request uses it (the engine loop checks each step)."""
        self.retiring.add(name)

    def run_until_done(self) -> None:
        """Run the loop in the calling thread until every queued request has finished (`generate_together`)."""
        while self.busy():
            self._step()

    # --- the loop ---------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.stopping and not self.waiting and not self.running:
                    self.cond.wait(timeout=0.5)
                if self.stopping and not self.running and not self.waiting:
                    return
            self._step()

    def _step(self) -> None:
        """Admit what fits, prefill one chunk, decode one token for every running sequence."""
        with self.cond:
            self._admit()
        try:
            self._drop_cancelled()
            self._drop_retired_adapters()
            self._prefill_one_chunk()
            self._decode_step()
        except Exception as exc:  # a bug of ours: fail what is running, keep the server (and the queue)
            log.exception("engine step failed")
            for request in list(self.running):
                self._finish(request, _failed(exc))

    def _admit(self) -> None:
        """Start waiting requests in order while the batch has room and the KV budget allows (the first that does
        not fit waits, and so do the ones behind it)."""
        while self.waiting and len(self.running) < self.max_batch:
            request = self.waiting[0]
            if request.cancelled.is_set():
                self.waiting.popleft()
                continue
            if request.decoding is None:  # a new request (a preempted one keeps its state)
                try:
                    request.decoding = Decoding(self.engine, request.prompt_ids, request.params, request.seed)
                    request.decoding.started = request.enqueued_at  # time in the queue counts towards TTFT
                    request.generator = torch.Generator().manual_seed(request.seed)
                    request.seen = torch.tensor(request.prompt_ids, dtype=torch.long)
                    request.known = list(request.prompt_ids)
                except Exception as exc:  # this request's own problem: it fails, the others go on
                    self.waiting.popleft()
                    log.exception("could not start request %s", request.id)
                    self._emit(request, _failed(exc))
                    continue
            # room for the prompt and the first stretch of the answer; it grows from there (`_make_room`)
            remaining = request.params.max_new_tokens - len(request.decoding.steps)
            want = min(len(request.known) + max(1, min(remaining, self.headroom)), self.max_len)
            owner = self._owner(request)
            try:
                start = self.kv.start(request.known, owner, self._sources() if self._reuses(request) else None,
                                      want)
            except Exception as exc:  # (an allocation that failed): this request fails, the loop goes on
                self.waiting.popleft()
                log.exception("could not start request %s", request.id)
                self._emit(request, _failed(exc))
                continue
            if start is None:
                return  # memory is short: it waits for running sequences to finish
            self.waiting.popleft()
            request.owner = owner
            request.sequence = start.sequence
            request.kv_tokens = request.known[: start.cached]
            if request.next_token is None:  # a preempted request's count stays that of its first start
                request.cached_tokens = start.cached
            self.running.append(request)

    @staticmethod
    def _reuses(request: Request) -> bool:
        """Whether a request may start from cached KV: not while its prompt is to be scored position by position
        (`SamplingParams.prompt_logprobs`), which needs each position's logits."""
        return request.params.prompt_logprobs is None or request.next_token is not None

    def _sources(self) -> list[tuple[int, list[int], Any]]:
        """What the running sequences hold, for `KVCache` to copy prefixes from: (sequence, tokens, owner)."""
        return [(r.sequence, r.kv_tokens, r.owner) for r in self.running if r.sequence is not None]

    def _owner(self, request: Request) -> Any:
        """Whose weights computed a sequence's keys: the base model, or the adapter by name and weights."""
        return None if request.adapter is None else (request.adapter, self.model.adapters.get(request.adapter))

    def _drop_cancelled(self) -> None:
        for request in [r for r in self.running if r.cancelled.is_set()]:
            self._finish(request, None)

    def _drop_retired_adapters(self) -> None:
        if not self.retiring:
            return
        with self.cond:
            in_use = {r.adapter for r in [*self.running, *self.waiting]}
        for name in list(self.retiring - in_use):
            self.retiring.discard(name)
            self.model.adapters.pop(name, None)
            self.kv.forget_owner(name)

    def _finish(self, request: Request, error: BaseException | None) -> None:
        if request in self.running:
            self.running.remove(request)
            # its KV stays for later requests that start the same way, unless it broke (then it is not trusted)
            self.kv.finish(request.sequence, request.kv_tokens if error is None else None)  # type: ignore[arg-type]
            request.sequence = None
        if error is not None:
            self._emit(request, error)
        elif not request.cancelled.is_set():
            assert request.decoding is not None
            tail = request.decoding.flush()
            if tail is not None:
                self._emit(request, tail)
            completion = request.decoding.completion()
            completion.cached_tokens = request.cached_tokens
            self._emit(request, completion)

    def _make_room(self, request: Request, tokens: int) -> bool:
        """Room for `tokens` tokens in the request's KV, preempting the requests admitted after it if need be;
        False when it was preempted itself (it waits at the head of the queue)."""
        while not self.kv.grow(request.sequence, tokens):  # type: ignore[arg-type]
            victim = self.running[-1]  # the last admitted gives way (the first always can go on)
            self._preempt(victim)
            if victim is request:
                return False
        return True

    def _room_or_fail(self, request: Request, tokens: int) -> bool:
        """`_make_room`, where an allocation that fails (the system is out of memory, or of mappings) fails this
        request alone; its KV is as it was, and the others go on."""
        try:
            return self._make_room(request, tokens)
        except Exception as exc:
            log.exception("could not grow the KV of request %s", request.id)
            self._finish(request, _failed(exc))
            return False

    def _preempt(self, request: Request) -> None:
        """Free a running request's KV and put it first in the queue: it is computed again from the tokens it had
        (what its client has already been sent stays sent; decoding resumes where it was)."""
        log.info("request %s waits for KV memory (%d tokens)", request.id, len(request.kv_tokens))
        self.running.remove(request)
        self.kv.preempted(request.sequence)  # type: ignore[arg-type]
        request.sequence = None
        if not request.prefilling:  # it was decoding: all it holds is what it must hold again (a request still
            request.known = list(request.kv_tokens)  # prefilling, fresh or resumed, keeps its `known` whole)
        request.kv_tokens = []
        request.caught_up = False
        with self.cond:
            self.waiting.appendleft(request)

    def _prefill_one_chunk(self) -> None:
        request = next((r for r in self.running if r.prefilling), None)
        if request is None:
            return
        if not request.caught_up and self._reuses(request):
            request.caught_up = True
            have = self.kv.catch_up(request.sequence, request.known, len(request.kv_tokens),  # type: ignore[arg-type]
                                    request.owner, self._sources())
            if have > len(request.kv_tokens):
                request.kv_tokens = request.known[:have]
                if request.next_token is None:
                    request.cached_tokens = have
        start = len(request.kv_tokens)
        end = self._chunk_end(start, len(request.known))
        chunk = request.known[start:end]
        if not self._room_or_fail(request, end):
            return
        scoring = not self._reuses(request)
        try:
            logits = self.model.forward(torch.tensor([chunk]), torch.tensor([request.sequence]),
                                        torch.tensor([start]), [request.adapter],
                                        **({"every_position": True} if scoring else {}))
            if scoring:
                self._score_prompt(request, start, logits)
                logits = logits[-1:]
        except Exception as exc:  # a prefill holds one request: only that one fails
            log.exception("prefill of request %s failed", request.id)
            self._finish(request, _failed(exc))
            return
        request.kv_tokens.extend(chunk)
        if not request.prefilling and request.next_token is None:  # (a resumed request has its next token)
            self._take(request, logits[0])

    @staticmethod
    def _score_prompt(request: Request, start: int, logits: torch.Tensor) -> None:
        """Score the prompt tokens that follow the chunk's positions (`logits`: one row per position from
        `start`), past those a start before preemption scored."""
        decoding, prompt = request.decoding, request.prompt_ids
        assert decoding is not None
        first = 1 + len(decoding.prompt_steps)  # the next prompt token to score
        last = min(start + logits.shape[0], len(prompt) - 1)  # the last prompt token these positions score
        if last >= first:
            decoding.prompt_steps += scored_tokens(logits[first - 1 - start :], prompt[first : last + 1],
                                                   request.params.prompt_logprobs or 0)

    def _chunk_end(self, start: int, length: int) -> int:
        """Where the prefill forward from `start` ends. From a chunk boundary: at the next one (as without the cache,
        which computes the same positions in the same forwards; under batch invariance every cached prefix ends on
        one). From a cached prefix that ends inside a chunk (its rest is not computed as without the cache in any
        case): the rest in as few forwards as the chunk size allows, of equal width, so a RAG request's few
        hundred new tokens after a shared system prompt take two forwards, not three (the grid's sliver to the
        boundary, a chunk, a tail), and no forward is a sliver of a few rows."""
        chunk = self.prefill_chunk
        if start % chunk == 0:
            return min(length, start + chunk)
        forwards = -(-(length - start) // chunk)
        return start + -(-(length - start) // forwards)

    def _decode_step(self) -> None:
        rows = [r for r in self.running if r.next_token is not None and not r.prefilling]
        for request in list(rows):
            if request in self.running and not self._room_or_fail(request, len(request.kv_tokens) + 1):
                rows.remove(request)
        rows = [r for r in rows if r in self.running]  # (making room may have preempted rows after it)
        if not rows:
            return
        grammars = [r.decoding.grammar for r in rows if r.decoding is not None and r.decoding.grammar is not None]
        if grammars:
            # the constrained rows' next masks, on llguidance's threads, in one call; a grammar that fails here
            # fails again, for its own row only, when its token is chosen
            with contextlib.suppress(OwnLLMError):
                fill_masks(grammars)
        try:
            logits = list(self._decode(rows))
        except Exception:
            # One row may be the cause (and each row only rewrites its own cache position): retry row by row,
            # so the rows that decode alone go on and only the ones that fail alone are failed.
            log.exception("batched decode step of %d rows failed; retrying row by row", len(rows))
            kept = []
            for request in rows:
                try:
                    kept.append((request, self._decode([request])[0]))
                except Exception as exc:
                    self._finish(request, _failed(exc))
            rows, logits = [r for r, _ in kept], [row for _, row in kept]
        for request, row in zip(rows, logits, strict=True):
            request.kv_tokens.append(request.next_token)  # type: ignore[arg-type]
            self._take(request, row)

    def _decode(self, rows: list[Request]) -> torch.Tensor:
        # the token fed now is the last one chosen: it goes right after what the sequence holds
        return self.model.forward(torch.tensor([[r.next_token] for r in rows]),
                                  torch.tensor([r.sequence for r in rows]),
                                  torch.tensor([len(r.kv_tokens) for r in rows]), [r.adapter for r in rows])

    def _take(self, request: Request, logits: torch.Tensor) -> None:
        """Choose the request's next token, stream what became final, finish it if it is done."""
        params, decoding = request.params, request.decoding
        assert decoding is not None and request.seen is not None
        try:
            step = choose_step(logits, params, request.seen, request.generator,
                               [s.token_id for s in decoding.steps], decode=self._piece, grammar=decoding.grammar)
            token = step.token_id
        except Exception as exc:
            _log_failure(f"choosing a token for request {request.id} failed", exc)
            self._finish(request, _failed(exc))
            return
        if params.repetition_penalty != 1.0:
            request.seen = torch.cat([request.seen, torch.tensor([token])])
        delta = decoding.add(step)
        if delta is not None:
            self._emit(request, delta)
        if decoding.done or len(request.prompt_ids) + len(decoding.steps) >= self.max_len:
            request.next_token = None
            self._finish(request, None)
        else:
            request.next_token = token

    def _piece(self, token_id: int) -> str:
        """A token's text, for `explain` rows."""
        return self.engine.tokenizer.decode([token_id])


class SerialScheduler(_Loop):
    """One request at a time through any Engine: for engines that cannot batch (`Engine.batching_mode` says why)."""

    def __init__(self, engine: Engine, *, max_queue: int = 64, reason: str | None = None) -> None:
        super().__init__(engine, max_queue=max_queue)
        self.current: Request | None = None
        self.max_batch = 1
        self.reason = reason or engine.batching_mode()[1]

    @property
    def context_length(self) -> int:
        return self.engine.context_length

    def running_requests(self) -> list[Request]:
        return [self.current] if self.current else []

    @property
    def batching(self) -> dict[str, Any]:
        return {"mode": "serial", "reason": self.reason}

    def load_adapter(self, name: str, folder: Any) -> None:
        raise OwnLLMError(f"adapters are served by the batched forward, and this model runs one request at a "
                          f"time ({self.reason})", kind="unsupported", param="adapter")

    def unload_adapter(self, name: str) -> None:
        pass  # it never loads any

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.stopping and not self.waiting:
                    self.cond.wait(timeout=0.5)
                if self.stopping and not self.waiting:
                    return
                self.current = self.waiting.popleft()
            request = self.current
            try:
                if not request.cancelled.is_set():
                    from dataclasses import replace

                    for event in self.engine.stream(request.prompt_ids, replace(request.params, seed=request.seed),
                                                    adapter=request.adapter):
                        if request.cancelled.is_set():
                            break
                        self._emit(request, event)
            except Exception as exc:
                _log_failure(f"request {request.id} failed", exc)
                self._emit(request, _failed(exc))
            finally:
                self.current = None


def _log_failure(message: str, exc: BaseException) -> None:
    """A request's own error (OwnLLMError, such as its constraint failing: its client is told why) in one line;
    anything else with its traceback."""
    if isinstance(exc, OwnLLMError):
        log.warning("%s: %s", message, exc)
    else:
        log.error("%s", message, exc_info=exc)


def _failed(exc: BaseException) -> OwnLLMError:
    """What a request's client is told when its generation broke: our error as it is, anything else by class only
    (the details are in the server's log, not in another user's reply)."""
    if isinstance(exc, OwnLLMError):
        return exc
    return OwnLLMError(f"generation failed: {exc.__class__.__name__}", kind="resource")


def make_scheduler(engine: Engine, *, max_batch: int = 16, max_queue: int = 64, max_len: int | None = None,
                   kv_memory: int | None = None, prefix_caching: bool = True, four_bit: bool = False
                   ) -> BatchScheduler | SerialScheduler:
    """Continuous batching where the engine can batch (`Engine.batching_mode`), else one request at a time."""
    mode, reason = engine.batching_mode()
    if mode == "batched":
        return BatchScheduler(engine, max_batch=max_batch, max_queue=max_queue, max_len=max_len, kv_memory=kv_memory,
                              prefix_caching=prefix_caching, four_bit=four_bit)
    log.info("serving %s one request at a time: %s", engine.name, reason)
    return SerialScheduler(engine, max_queue=max_queue, reason=reason)


def generate_together(engine: Engine, prompt_ids: list[list[int]], params: SamplingParams, seeds: list[int], *,
                      max_batch: int = 16, progress: Callable[[int], None] | None = None,
                      adapter: str | list[str | None] | None = None) -> list[Completion]:
    """Completions of checked prompts (in their order), decoded together by a `BatchScheduler` run in this thread,
    prompt i sampling with `seeds[i]`: `Engine.generate_batch` for the backends that batch. Its cache holds the
    longest prompt plus `max_new_tokens` per row; the first row that fails raises its error. `adapter`: every row
    runs with that LoRA adapter of the batched model (one the engine's `batched_model` put there), or row i with
    adapter[i] when it is a list."""
    results: list[Completion | BaseException | None] = [None] * len(prompt_ids)

    def keep(index: int) -> Sink:
        def sink(event: Event) -> None:
            if isinstance(event, Completion | BaseException):
                results[index] = event
                if progress:
                    progress(1)
        return sink

    longest = max(len(ids) for ids in prompt_ids)
    scheduler = BatchScheduler(engine, max_batch=min(max_batch, len(prompt_ids)), max_queue=len(prompt_ids),
                               max_len=longest + params.max_new_tokens)
    adapters = adapter if isinstance(adapter, list) else [adapter] * len(prompt_ids)
    scheduler.submit_all([Request(ids, params, seed, keep(i), adapter=row_adapter)
                          for i, (ids, seed, row_adapter) in enumerate(zip(prompt_ids, seeds, adapters, strict=True))])
    try:
        scheduler.run_until_done()
    finally:
        close = getattr(scheduler.model, "close", None)  # llama.cpp: its context's memory, now rather than at exit
        if close is not None:
            close()
    completions = []
    for result in results:
        if isinstance(result, BaseException):
            raise result
        assert result is not None  # every request ends with a Completion or an error
        completions.append(result)
    return completions
