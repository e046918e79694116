"""The Engine: one interface (generate, stream, chat, logprobs) over every backend.

Backends only produce a stream of `Step`s (one chosen token each, with its log-probability);
everything users see — stop strings, streaming text, finish reasons, context checks — is here,
once, so the CLI, the Python API, the server and evaluation all behave the same.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from ownllm.errors import ContextWindowExceeded, OwnLLMError, check_text
from ownllm.generate.constraints import Constraint, Grammars, GrammarState
from ownllm.generate.kv_cache import KVStorage
from ownllm.generate.params import SamplingParams
from ownllm.generate.sampling import StepExplanation, pick_token, top_logprobs
from ownllm.generate.text import IncrementalText
from ownllm.models.chat_template import Message, render_chat
from ownllm.models.scope import with_recalled

AUTO = "<auto>"  # as an `adapter` argument: the engine picks by the prompt (`Engine.route`)


@dataclass(frozen=True)
class Step:
    token_id: int
    logprob: float  # log-probability of the token under the model (T=1, before any filtering)
    top: list[tuple[int, float]] = field(default_factory=list)
    explanation: StepExplanation | None = None


def choose_step(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor,
                generator: torch.Generator | None, generated: list[int], decode: object = None,
                grammar: GrammarState | None = None) -> Step:
    """One token from one position's logits, with its log-probability (and the top ones, if asked for).

    Every backend and the batch scheduler choose through here, so sampling means the same everywhere. With a
    `grammar` (the sequence's constraint state), only the tokens it allows can be chosen, and the chosen one
    moves it on; the log-probabilities stay the model's own (before the mask, as before any filter).
    """
    logits = logits.float().cpu()
    allowed = grammar.allowed(logits.numel()) if grammar is not None else None
    token, explanation = pick_token(logits, params, seen, generator, decode=decode if params.explain else None,
                                    generated=torch.tensor(generated, dtype=torch.long), allowed=allowed)
    if grammar is not None:
        grammar.advance(token)
    logprobs = torch.log_softmax(logits, dim=-1)
    return Step(token, float(logprobs[token]), top_logprobs(logprobs, params.logprobs or 0), explanation)


def scored_tokens(logits: torch.Tensor, targets: list[int], top: int) -> list[Step]:
    """Each of `targets` scored by the logits of the position before it (row i of `logits` scores targets[i]):
    its log-probability and the `top` most likely tokens there, as a generated token's (prompt log-probabilities)."""
    logprobs = torch.log_softmax(logits[: len(targets)].float().cpu(), dim=-1)
    chosen = logprobs.gather(1, torch.tensor(targets, dtype=torch.long)[:, None])[:, 0].tolist()
    return [Step(token, logprob, top_logprobs(row, top))
            for token, logprob, row in zip(targets, chosen, logprobs, strict=True)]


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    token_id: int
    logprob: float | None  # None only for a prompt's first token: nothing before it scores it
    top: list[tuple[str, float]]


@dataclass(frozen=True)
class TextDelta:
    """A piece of streamed text, with the tokens produced since the previous delta."""

    text: str
    token_ids: list[int]


@dataclass
class Completion:
    """A finished sequence. `finish_reason` is "stop" (EOS, a stop string, or a constraint's grammar complete) or
    "length" (max_new_tokens ran out: under a constraint, the text is then an unfinished prefix). `parsed` is the
    parsed JSON value (or pydantic object) where the Python API was given a schema, else None."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS, a stop string, a complete grammar) | "length"
    prompt_tokens: int
    seed: int | None
    sequence_logprob: float
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob] | None = None  # each prompt token given those before it (the first: None)
    explanations: list[StepExplanation] | None = None
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    parsed: Any = None
    cached_tokens: int = 0  # prompt tokens the server's prefix cache had (not computed again)
    stop_token_id: int | None = None  # the end-of-sequence token that ended it (not in token_ids), if one did
    stop_logprob: float | None = None  # that token's log-probability (not in sequence_logprob)

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def tokens_per_second(self) -> float:
        steps = max(self.completion_tokens - 1, 0)
        return steps / self.decode_seconds if self.decode_seconds > 0 else 0.0


class BatchedModel(KVStorage, Protocol):
    """A forward over many sequences' KV (`SlotModel`, `LlamaCppSlots`): what the scheduler drives. The KV itself
    is handed out by `ownllm.generate.kv_cache.KVCache` through the `KVStorage` methods."""

    adapters: dict[str, Any]

    def forward(self, tokens: torch.Tensor, slots: torch.Tensor, starts: torch.Tensor,
                adapters: list[str | None] | None = None, every_position: bool = False) -> torch.Tensor:
        """Logits [rows, vocab] (on the CPU) of the last position of each row: one prefill chunk (rows = 1) or one
        decoding step (one token per row), each row in its own sequence (`slots`: sequence ids) at its own
        position. `every_position`: a prefill chunk's logits at each position, [T, vocab]."""
        ...

    def load_adapter(self, name: str, folder: Path) -> Any:
        """Make a LoRA adapter folder available to rows that name it (or refuse, naming why)."""
        ...


class Engine:
    """Base of every backend. Subclasses implement `_steps` (and `_beam` if they support beams)."""

    name: str
    tokenizer: Any
    context_length: int
    backend: str = "?"
    scope: Any = None  # ownllm.models.scope.AdapterScope when the model is a LoRA adapter routed per prompt

    @property
    def active_adapter(self) -> str | None:
        """The adapter the one-sequence path (`stream`) is computing with in this thread, this very moment: set
        only around each of a stream's own steps, so streams interleaved or abandoned never run with another's."""
        return getattr(self._running(), "adapter", None)

    def _running(self) -> threading.local:
        return self.__dict__.setdefault("_running_local", threading.local())  # per engine, per thread

    def scoring(self, prompt: str | list[int]) -> contextlib.AbstractContextManager[None]:
        """Around direct forwards of the model that score `prompt` (perplexity, log-likelihoods): the adapter its
        text routes to is on during them, as it would be for generating from it."""
        return self._running_with(self._auto_route(prompt, AUTO))

    @contextlib.contextmanager
    def _running_with(self, adapter: str | None) -> Iterator[None]:
        previous = self.active_adapter
        self._running().adapter = adapter
        try:
            yield
        finally:
            self._running().adapter = previous

    # --- what backends provide -------------------------------------------------------------
    def _steps(self, prompt_ids: list[int], params: SamplingParams, seed: int,
               grammar: GrammarState | None = None) -> Iterator[Step]:
        """One sequence's steps, without end: each token chosen by `choose_step` (passing `grammar` on)."""
        raise NotImplementedError

    def _beam(self, prompt_ids: list[int], params: SamplingParams) -> list[int]:
        raise OwnLLMError(f"the {self.backend} backend has no beam search", kind="unsupported",
                          param="strategy")

    def sequence_logprob(self, prompt_ids: list[int], completion_ids: list[int]) -> float:
        raise NotImplementedError

    # --- the interface ---------------------------------------------------------------------
    @property
    def eos_token_ids(self) -> set[int]:
        ids = getattr(self, "_eos_ids", None)
        if ids is None:
            ids = {self.tokenizer.eos_token_id} - {None}
            self._eos_ids = ids
        return ids

    @property
    def vocab_size(self) -> int:
        """Token ids the model takes: 0 <= id < vocab_size."""
        return len(self.tokenizer)

    def encode(self, prompt: str | list[int], param: str = "prompt") -> list[int]:
        """Token ids of a prompt: text (valid Unicode, not empty) or ids (checked against the vocabulary)."""
        if isinstance(prompt, list):
            self.check_token_ids(prompt, param)
            ids = prompt
        else:
            check_text(prompt, param)
            ids = self.tokenizer.encode(prompt, add_special_tokens=True) if prompt else []
        if not ids:
            raise OwnLLMError("the prompt is empty", param=param)
        return ids

    def check_token_ids(self, ids: list[int], param: str) -> None:
        """Token ids from outside (a prompt given as ids, logit_bias keys) must index the vocabulary: one bad id
        would otherwise fail the forward of every sequence batched with it."""
        size = self.vocab_size
        for position, token in enumerate(ids):
            if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < size:
                raise OwnLLMError(f"{param}[{position}] is {token!r}, not a token id of this model "
                                  f"(0 to {size - 1})", param=param)

    def check_request(self, prompt_ids: list[int], params: SamplingParams, *, window: int | None = None,
                      prompt_param: str = "prompt") -> None:
        """The one check before any work starts, for the CLI, the Python API, the scheduler's callers and the
        server alike (SamplingParams has checked its own ranges when it was built): a prompt, token ids the
        model has, and room in the context window — `window` is the caller's when it serves a shorter one than
        the model's (a server's batch slots); a refusal raises ContextWindowExceeded."""
        if not prompt_ids:
            raise OwnLLMError("the prompt is empty", param=prompt_param)
        if params.logit_bias:
            self.check_token_ids(sorted(params.logit_bias), "logit_bias")
        if params.constraint is not None:
            self.check_constraint(params.constraint)
        window = window or self.context_length
        if len(prompt_ids) + params.max_new_tokens > window:
            raise ContextWindowExceeded(len(prompt_ids), params.max_new_tokens, window)

    @property
    def grammars(self) -> Grammars:
        """This engine's tokenizer as the grammar engine sees it, with the constraints compiled for it (cached)."""
        grammars = getattr(self, "_grammars", None)
        if grammars is None:
            grammars = self._grammars = Grammars(self.tokenizer, self.vocab_size, self.eos_token_ids)
        return grammars

    def check_constraint(self, constraint: Constraint) -> None:
        """Compile a constraint for this model's tokenizer (once: later calls hit the cache); one that cannot be
        used raises OwnLLMError naming its param. Servers call it off their event loop before `check_request`."""
        self.grammars.compile(constraint)

    def route(self, conversation: list[Message] | str) -> str | None:
        """The adapter a conversation or prompt runs with: None (the model as loaded) unless the model is a LoRA
        adapter with a scope (ownllm.models.scope), which names the adapter for prompts within it."""
        return None

    def routes(self, conversations: list[list[Message] | str]) -> list[str | None]:
        """`route` of each conversation (embedded together where the engine has a scope)."""
        return [self.route(conversation) for conversation in conversations]

    def on_base_weights(self, conversations: list[list[Message] | str]) -> list[bool]:
        """Whether each conversation runs on the base model's own weights, bit for bit: those a scoped LoRA
        adapter leaves to the base (ownllm.models.scope); none for any other model."""
        return [False] * len(conversations)

    def recalled(self, conversation: list[Message]) -> list[Message]:
        """The training examples to put before a conversation's latest user message (ownllm.models.scope's recall):
        none unless the model is an adapter whose scope keeps them and the message is within it."""
        return []

    def render_with_recall(self, messages: list[Message], routed_by: list[Message] | None = None, *,
                           max_new_tokens: int = 0, render: Callable[[list[Message]], list[int]] | None = None
                           ) -> list[int]:
        """A conversation's prompt ids (`render`, by default `render_chat`) with the recalled examples of its
        latest user message (of `routed_by`, the user's own messages, where context was added) before that
        message, where they leave room for `max_new_tokens` in the context window; else without them."""
        render = render or self.render_chat
        recalled = self.recalled(routed_by or messages)
        if recalled:
            ids = render(with_recalled(messages, recalled))  # type: ignore[arg-type]
            if len(ids) + max_new_tokens <= self.context_length:
                return ids
        return render(messages)  # the examples are an aid: the question itself must still fit with its answer

    def _auto_route(self, prompt: str | list[int], adapter: str | None) -> str | None:
        if adapter != AUTO:
            return adapter
        if self.scope is None:
            return None
        text = prompt if isinstance(prompt, str) else self.tokenizer.decode(prompt, skip_special_tokens=True)
        return self.route(text)

    def generate(self, prompt: str | list[int], params: SamplingParams | None = None, *,
                 adapter: str | None = AUTO) -> Completion:
        """Run to the end and return the whole completion."""
        completion = None
        for event in self.stream(prompt, params, adapter=adapter):
            if isinstance(event, Completion):
                completion = event
        assert completion is not None
        return completion

    def chat(self, messages: list[Message], params: SamplingParams | None = None) -> Completion:
        prompt = self.render_with_recall(messages, max_new_tokens=(params or SamplingParams()).max_new_tokens)
        return self.generate(prompt, params, adapter=self.route(messages))

    def stream_chat(self, messages: list[Message], params: SamplingParams | None = None
                    ) -> Iterator[TextDelta | Completion]:
        prompt = self.render_with_recall(messages, max_new_tokens=(params or SamplingParams()).max_new_tokens)
        return self.stream(prompt, params, adapter=self.route(messages))

    def render_chat(self, messages: list[Message]) -> list[int]:
        return render_chat(self.tokenizer, messages)

    def stream(self, prompt: str | list[int], params: SamplingParams | None = None, *,
               adapter: str | None = AUTO) -> Iterator[TextDelta | Completion]:
        """Yield TextDelta pieces as they become final, then one Completion. `adapter`: the one the prompt runs
        with (`route`); by default the engine routes the prompt's text."""
        params = params or SamplingParams()
        prompt_ids = self._prepare(prompt, params)
        seed = params.seed_for(0)
        adapter = self._auto_route(prompt, adapter)
        if params.prompt_logprobs is not None:  # the prompt's logits at every position: the scheduler's prefill
            if params.strategy == "beam" or self.batching_mode()[0] != "batched":
                raise OwnLLMError("prompt log-probabilities come from the batched prefill: "
                                  + ("not with beam search" if params.strategy == "beam" else self.batching_mode()[1]),
                                  param="prompt_logprobs")
            (completion,) = self._generate_together([prompt_ids], params, [seed], max_batch=1, progress=None,
                                                    adapters=[adapter])
            yield TextDelta(completion.text, completion.token_ids)
            yield completion
            return
        if params.strategy == "beam":
            with self._running_with(adapter):
                events = list(self._stream_beam(prompt_ids, params, seed))  # one search, then its text
            yield from events
            return
        state = Decoding(self, prompt_ids, params, seed)
        steps = self._steps(prompt_ids, params, seed, state.grammar)
        while True:
            with self._running_with(adapter):
                step = next(steps, None)
            if step is None:
                break
            delta = state.add(step)
            if delta is not None:
                yield delta
            if state.done:
                break
        tail = state.flush()
        if tail is not None:
            yield tail
        yield state.completion()

    def generate_batch(self, prompts: list[str | list[int]], params: SamplingParams | None = None, *,
                       max_batch: int = 16, progress: Callable[[int], None] | None = None,
                       labels: list[str] | None = None, adapters: list[str | None] | None = None
                       ) -> list[Completion]:
        """Generate for many prompts: decoded together by the continuous-batching scheduler where the backend
        batches (`batching_mode`), at most `max_batch` rows at a time, a waiting prompt taking the place of one
        that finished; else one at a time (so is beam search, which is per prompt anyway). Pass every prompt in
        one call: chunks of them wait for each chunk's longest reply. `progress(1)` is called as each finishes.
        Every prompt is checked before any is generated; with `labels` (e.g. "line 3"), a refusal names its prompt.

        With a fixed seed, prompt i samples with seed + i, so each row is reproducible on its own. `adapters`:
        the adapter each prompt runs with (`route` of its conversation); by default each prompt's text is routed.
        """
        params = params or SamplingParams()
        prompt_ids = []
        for index, prompt in enumerate(prompts):
            try:
                prompt_ids.append(self._prepare(prompt, params))
            except OwnLLMError as exc:
                if labels is not None:  # the same error (its class, code and fields), saying which prompt
                    exc.message = f"{labels[index]}: {exc.message}"
                    exc.args = (exc.message,)
                raise
        seeds = [params.seed_for(i) for i in range(len(prompt_ids))]
        if not prompt_ids:
            return []
        routes = adapters if adapters is not None else [self._auto_route(prompt, AUTO) for prompt in prompts]
        if params.strategy == "beam" or self.batching_mode()[0] != "batched":
            completions = []
            for ids, seed, adapter in zip(prompt_ids, seeds, routes, strict=True):
                completions.append(self.generate(ids, _with_seed(params, seed), adapter=adapter))
                if progress:
                    progress(1)
            return completions
        return self._generate_together(prompt_ids, params, seeds, max_batch=max_batch, progress=progress,
                                       adapters=routes)

    # --- batching: what a backend can do, asked rather than guessed ----------------------------
    def batching_mode(self) -> tuple[str, str]:
        """("batched", what decodes the batch) when `batched_model` gives a forward over many sequences at once,
        else ("serial", why not): the server's start-up line and /health say it, `make_scheduler` acts on it."""
        return "serial", f"the {self.backend} backend decodes one sequence at a time"

    def batched_model(self, slots: int, max_len: int, *, four_bit: bool = False) -> BatchedModel | None:
        """A forward over `slots` sequences of up to `max_len` tokens each, decoded together, or None when this
        backend or model cannot (see `batching_mode`); `four_bit`: run a GGUF's 4-bit tensors as stored where
        that is faster (`ownllm.generate.slots.SlotModel`)."""
        return None

    def _generate_together(self, prompt_ids: list[list[int]], params: SamplingParams, seeds: list[int], *,
                           max_batch: int, progress: Callable[[int], None] | None,
                           adapters: list[str | None] | None = None) -> list[Completion]:
        """The prompts through the continuous-batching scheduler (prompt i with adapters[i]); backends that batch
        implement it with `ownllm.generate.batching.generate_together` (that module builds on this one, so it
        cannot be called from here)."""
        raise NotImplementedError

    def _prepare(self, prompt: str | list[int], params: SamplingParams) -> list[int]:
        prompt_ids = self.encode(prompt)
        self.check_request(prompt_ids, params)
        return prompt_ids

    # --- helpers ---------------------------------------------------------------------------
    def _stream_beam(self, prompt_ids: list[int], params: SamplingParams, seed: int
                     ) -> Iterator[TextDelta | Completion]:
        started = time.perf_counter()
        ids = self._beam(prompt_ids, params)
        finish = "length" if len(ids) >= params.max_new_tokens else "stop"
        ids = [i for i in ids if i not in self.eos_token_ids] if not params.ignore_eos else ids
        text = IncrementalText(self.tokenizer, params.stop)
        kept: list[int] = []
        for token_id in ids:
            kept.append(token_id)
            text.add(token_id)
            if text.stopped:
                finish = "stop"
                break
        elapsed = time.perf_counter() - started
        logprob = self.sequence_logprob(prompt_ids, kept) if kept else 0.0
        yield TextDelta(text.text, kept)
        completion = Completion(text=text.text, token_ids=kept, finish_reason=finish,
                                prompt_tokens=len(prompt_ids), seed=None, sequence_logprob=logprob,
                                decode_seconds=elapsed)
        yield completion


def _with_seed(params: SamplingParams, seed: int) -> SamplingParams:
    from dataclasses import replace

    return replace(params, seed=seed)


class Decoding:
    """One sequence being generated: stop rules, streamed text, finish reason, timings, the result — and, under a
    constraint, its own grammar state (`grammar`), which the sampler masks with and which ends the sequence when
    complete."""

    def __init__(self, engine: Engine, prompt_ids: list[int], params: SamplingParams, seed: int) -> None:
        self.engine = engine
        self.prompt_ids = prompt_ids
        self.params = params
        self.seed = seed
        self.text = IncrementalText(engine.tokenizer, params.stop)
        self.steps: list[Step] = []
        self.pending: list[int] = []
        self.finish = "length"
        self.done = False
        self.started = time.perf_counter()
        self.first_token_at: float | None = None
        self.ended_by: Step | None = None  # the end-of-sequence token that ended it, if one did
        self.prompt_steps: list[Step] = []  # prompt tokens 1.. scored, where params.prompt_logprobs asks for them
        self.grammar = engine.grammars.start(params.constraint) if params.constraint is not None else None

    def add(self, step: Step) -> TextDelta | None:
        """Take one chosen token; return the text that became final, if any."""
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        # under a constraint EOS comes only where the grammar is complete: it ends the sequence even with ignore_eos
        if step.token_id in self.engine.eos_token_ids and (not self.params.ignore_eos or self.grammar is not None):
            self.finish, self.done, self.ended_by = "stop", True, step
            return None
        self.steps.append(step)
        self.pending.append(step.token_id)
        delta = self.text.add(step.token_id)
        if self.text.stopped or (self.grammar is not None and self.grammar.finished):
            self.finish, self.done = "stop", True
        elif len(self.steps) >= self.params.max_new_tokens:
            self.done = True
        if not delta:
            return None
        out, self.pending = TextDelta(delta, self.pending), []
        return out

    def flush(self) -> TextDelta | None:
        tail = self.text.flush()
        if not tail and not self.pending:
            return None
        out, self.pending = TextDelta(tail, self.pending), []
        return out

    def completion(self) -> Completion:
        tokenizer, params = self.engine.tokenizer, self.params
        ended = time.perf_counter()
        first = self.first_token_at or ended

        def scored(step: Step) -> TokenLogprob:
            return TokenLogprob(token=tokenizer.decode([step.token_id]), token_id=step.token_id, logprob=step.logprob,
                                top=[(tokenizer.decode([i]), lp) for i, lp in step.top])

        logprobs = [scored(s) for s in self.steps] if params.logprobs is not None else None
        prompt_logprobs = None
        if params.prompt_logprobs is not None and self.prompt_ids:
            unscored = TokenLogprob(tokenizer.decode([self.prompt_ids[0]]), self.prompt_ids[0], None, [])
            prompt_logprobs = [unscored, *map(scored, self.prompt_steps)]
        return Completion(
            text=self.text.text,
            token_ids=[s.token_id for s in self.steps],
            finish_reason=self.finish,
            prompt_tokens=len(self.prompt_ids),
            seed=self.seed if params.strategy == "sample" else None,
            sequence_logprob=sum(s.logprob for s in self.steps),
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            explanations=[s.explanation for s in self.steps if s.explanation] if params.explain else None,
            prefill_seconds=first - self.started,
            decode_seconds=ended - first,
            stop_token_id=self.ended_by.token_id if self.ended_by is not None else None,
            stop_logprob=self.ended_by.logprob if self.ended_by is not None else None,
        )
