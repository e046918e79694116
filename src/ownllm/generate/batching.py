"""Continuous batching: one engine loop in its own thread serves many requests at once.

Between decode steps the loop admits waiting requests (up to `max_batch` running), prefills one prompt
chunk, then advances every running sequence by one token in a single batched forward; each request keeps
its own sampling parameters, constraint (a grammar state of its own; the constrained rows' masks are computed
together before each step), stop strings and token budget, and leaves the batch the moment it finishes
or its client goes away. Events go to each request's `sink` from the loop thread.

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
from ownllm.generate.engine import BatchedModel, Completion, Decoding, Engine, TextDelta, choose_step
from ownllm.generate.params import SamplingParams

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
    slot: int | None = None
    prefilled: int = 0
    decoding: Decoding | None = None
    generator: torch.Generator | None = None
    seen: torch.Tensor | None = None
    next_token: int | None = None

    def cancel(self) -> None:
        self.cancelled.set()


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

    def submit_all(self, requests: list[Request]) -> None:
        """Queue every request or none: a refusal (queue full, shutting down) leaves no part of a multi-prompt
        or n > 1 request generating for a client that has been told no."""
        if len(requests) > self.max_queue:
            raise OwnLLMError(f"one request may start at most {self.max_queue} sequences (prompts x n), "
                              f"this one asks for {len(requests)}", param="n")
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
                 prefill_chunk: int = 256) -> None:
        super().__init__(engine, max_queue=max_queue)
        self.max_batch = max_batch
        self.max_len = min(max_len or engine.context_length, engine.context_length)
        self.prefill_chunk = prefill_chunk
        model = engine.batched_model(max_batch, self.max_len)
        if model is None:
            raise OwnLLMError(f"{engine.name} cannot decode in batches: {engine.batching_mode()[1]}",
                              kind="unsupported")
        self.model: BatchedModel = model
        self.running: list[Request] = []
        self.free_slots = list(range(max_batch))
        self.retiring: set[str] = set()

    @property
    def context_length(self) -> int:
        return self.max_len

    def running_requests(self) -> list[Request]:
        return list(self.running)

    @property
    def batching(self) -> dict[str, Any]:
        return {"mode": "batched", "max_batch": self.max_batch}

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
        while self.waiting and self.free_slots:
            request = self.waiting.popleft()
            if request.cancelled.is_set():
                continue
            try:
                request.decoding = Decoding(self.engine, request.prompt_ids, request.params, request.seed)
                request.decoding.started = request.enqueued_at  # time in the queue counts towards TTFT
                request.generator = torch.Generator().manual_seed(request.seed)
                request.seen = torch.tensor(request.prompt_ids, dtype=torch.long)
            except Exception as exc:  # this request's own problem: it fails, the others go on
                log.exception("could not start request %s", request.id)
                self._emit(request, _failed(exc))
                continue
            request.slot = self.free_slots.pop(0)
            self.running.append(request)

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

    def _finish(self, request: Request, error: BaseException | None) -> None:
        if request in self.running:
            self.running.remove(request)
            self.free_slots.append(request.slot)  # type: ignore[arg-type]
            self.free_slots.sort()  # keep busy slots low
        if error is not None:
            self._emit(request, error)
        elif not request.cancelled.is_set():
            assert request.decoding is not None
            tail = request.decoding.flush()
            if tail is not None:
                self._emit(request, tail)
            self._emit(request, request.decoding.completion())

    def _prefill_one_chunk(self) -> None:
        request = next((r for r in self.running if r.prefilled < len(r.prompt_ids)), None)
        if request is None:
            return
        start = request.prefilled
        chunk = request.prompt_ids[start : start + self.prefill_chunk]
        try:
            logits = self.model.forward(torch.tensor([chunk]), torch.tensor([request.slot]), torch.tensor([start]),
                                        [request.adapter])
        except Exception as exc:  # a prefill holds one request: only that one fails
            log.exception("prefill of request %s failed", request.id)
            self._finish(request, _failed(exc))
            return
        request.prefilled += len(chunk)
        if request.prefilled == len(request.prompt_ids):
            self._take(request, logits[0])

    def _decode_step(self) -> None:
        rows = [r for r in self.running if r.next_token is not None]
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
            self._take(request, row)

    def _decode(self, rows: list[Request]) -> torch.Tensor:
        # the token fed now is the last one kept: it goes right after the prompt and the tokens before it
        positions = [len(r.prompt_ids) + len(r.decoding.steps) - 1 for r in rows]  # type: ignore[union-attr]
        return self.model.forward(torch.tensor([[r.next_token] for r in rows]), torch.tensor([r.slot for r in rows]),
                                  torch.tensor(positions), [r.adapter for r in rows])

    def _take(self, request: Request, logits: torch.Tensor) -> None:
        """Choose the request's next token, stream what became final, finish it if it is done."""
        params, decoding = request.params, request.decoding
        assert decoding is not None and request.seen is not None
        try:
            step = choose_step(logits, params, request.seen, request.generator,
                               [s.token_id for s in decoding.steps], decode=self._piece, grammar=decoding.grammar)
            token = step.token_id
        except Exception as exc:
            log.exception("choosing a token for request %s failed", request.id)
            self._finish(request, _failed(exc))
            return
        if params.repetition_penalty != 1.0:
            request.seen = torch.cat([request.seen, torch.tensor([token])])
        delta = decoding.add(step)
        if delta is not None:
            self._emit(request, delta)
        if decoding.done or len(request.prompt_ids) + len(decoding.steps) >= self.max_len:
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

                    for event in self.engine.stream(request.prompt_ids, replace(request.params, seed=request.seed)):
                        if request.cancelled.is_set():
                            break
                        self._emit(request, event)
            except Exception as exc:
                log.exception("request %s failed", request.id)
                self._emit(request, _failed(exc))
            finally:
                self.current = None


def _failed(exc: BaseException) -> OwnLLMError:
    """What a request's client is told when its generation broke: our error as it is, anything else by class only
    (the details are in the server's log, not in another user's reply)."""
    if isinstance(exc, OwnLLMError):
        return exc
    return OwnLLMError(f"generation failed: {exc.__class__.__name__}", kind="resource")


def make_scheduler(engine: Engine, *, max_batch: int = 16, max_queue: int = 64, max_len: int | None = None
                   ) -> BatchScheduler | SerialScheduler:
    """Continuous batching where the engine can batch (`Engine.batching_mode`), else one request at a time."""
    mode, reason = engine.batching_mode()
    if mode == "batched":
        return BatchScheduler(engine, max_batch=max_batch, max_queue=max_queue, max_len=max_len)
    log.info("serving %s one request at a time: %s", engine.name, reason)
    return SerialScheduler(engine, max_queue=max_queue, reason=reason)


def generate_together(engine: Engine, prompt_ids: list[list[int]], params: SamplingParams, seeds: list[int], *,
                      max_batch: int = 16) -> list[Completion]:
    """Completions of checked prompts (in their order), decoded together by a `BatchScheduler` run in this thread,
    prompt i sampling with `seeds[i]`: `Engine.generate_batch` for the backends that batch. Its cache holds the
    longest prompt plus `max_new_tokens` per row; the first row that fails raises its error."""
    results: list[Completion | BaseException | None] = [None] * len(prompt_ids)

    def keep(index: int) -> Sink:
        def sink(event: Event) -> None:
            if isinstance(event, Completion | BaseException):
                results[index] = event
        return sink

    longest = max(len(ids) for ids in prompt_ids)
    scheduler = BatchScheduler(engine, max_batch=min(max_batch, len(prompt_ids)), max_queue=len(prompt_ids),
                               max_len=longest + params.max_new_tokens)
    scheduler.submit_all([Request(ids, params, seed, keep(i))
                          for i, (ids, seed) in enumerate(zip(prompt_ids, seeds, strict=True))])
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
