"""The Engine: one interface (generate, stream, chat, logprobs) over every backend.

Backends only produce a stream of `Step`s (one chosen token each, with its log-probability);
everything users see — stop strings, streaming text, finish reasons, context checks — is here,
once, so the CLI, the Python API, the server and evaluation all behave the same.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ownllm.errors import OwnLLMError
from ownllm.generate.params import SamplingParams
from ownllm.generate.sampling import StepExplanation
from ownllm.generate.text import IncrementalText
from ownllm.models.chat_template import Message, render_chat


@dataclass(frozen=True)
class Step:
    token_id: int
    logprob: float  # log-probability of the token under the model (T=1, before any filtering)
    top: list[tuple[int, float]] = field(default_factory=list)
    explanation: StepExplanation | None = None


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    token_id: int
    logprob: float
    top: list[tuple[str, float]]


@dataclass(frozen=True)
class TextDelta:
    """A piece of streamed text, with the tokens produced since the previous delta."""

    text: str
    token_ids: list[int]


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or a stop string) | "length"
    prompt_tokens: int
    seed: int | None
    sequence_logprob: float
    logprobs: list[TokenLogprob] | None = None
    explanations: list[StepExplanation] | None = None
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def tokens_per_second(self) -> float:
        steps = max(self.completion_tokens - 1, 0)
        return steps / self.decode_seconds if self.decode_seconds > 0 else 0.0


class Engine:
    """Base of every backend. Subclasses implement `_steps` (and `_beam` if they support beams)."""

    name: str
    tokenizer: Any
    context_length: int
    backend: str = "?"

    # --- what backends provide -------------------------------------------------------------
    def _steps(self, prompt_ids: list[int], params: SamplingParams, seed: int) -> Iterator[Step]:
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

    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, list):
            ids = prompt
        else:
            if not prompt:
                raise OwnLLMError("the prompt is empty", param="prompt")
            ids = self.tokenizer.encode(prompt, add_special_tokens=True)
        if not ids:
            raise OwnLLMError("the prompt is empty", param="prompt")
        return ids

    def check_fits(self, prompt_tokens: int, max_new_tokens: int) -> None:
        if prompt_tokens + max_new_tokens > self.context_length:
            raise OwnLLMError(
                f"prompt ({prompt_tokens} tokens) + max-new-tokens ({max_new_tokens}) = "
                f"{prompt_tokens + max_new_tokens} is past the context window of {self.context_length} tokens",
                param="max_new_tokens",
                hint="shorten the prompt or lower max-new-tokens",
            )

    def generate(self, prompt: str | list[int], params: SamplingParams | None = None) -> Completion:
        """Run to the end and return the whole completion."""
        completion = None
        for event in self.stream(prompt, params):
            if isinstance(event, Completion):
                completion = event
        assert completion is not None
        return completion

    def chat(self, messages: list[Message], params: SamplingParams | None = None) -> Completion:
        return self.generate(self.render_chat(messages), params)

    def stream_chat(self, messages: list[Message], params: SamplingParams | None = None
                    ) -> Iterator[TextDelta | Completion]:
        return self.stream(self.render_chat(messages), params)

    def render_chat(self, messages: list[Message]) -> list[int]:
        return render_chat(self.tokenizer, messages)

    def stream(self, prompt: str | list[int], params: SamplingParams | None = None
               ) -> Iterator[TextDelta | Completion]:
        """Yield TextDelta pieces as they become final, then one Completion."""
        params = params or SamplingParams()
        prompt_ids = self.encode(prompt)
        self.check_fits(len(prompt_ids), params.max_new_tokens)
        seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(4), "little")
        if params.strategy == "beam":
            yield from self._stream_beam(prompt_ids, params, seed)
            return
        text = IncrementalText(self.tokenizer, params.stop)
        steps: list[Step] = []
        finish = "length"
        started = time.perf_counter()
        first_token_at = started
        pending: list[int] = []
        for step in self._steps(prompt_ids, params, seed):
            if not steps:
                first_token_at = time.perf_counter()
            if step.token_id in self.eos_token_ids and not params.ignore_eos:
                finish = "stop"
                break
            steps.append(step)
            pending.append(step.token_id)
            delta = text.add(step.token_id)
            if delta:
                yield TextDelta(delta, pending)
                pending = []
            if text.stopped:
                finish = "stop"
                break
            if len(steps) >= params.max_new_tokens:
                break
        tail = text.flush()
        if tail or pending:
            yield TextDelta(tail, pending)
        yield self._completion(prompt_ids, steps, text.text, finish, params, seed,
                               first_token_at - started, time.perf_counter() - first_token_at)

    # --- helpers ---------------------------------------------------------------------------
    def _completion(self, prompt_ids: list[int], steps: list[Step], text: str, finish: str,
                    params: SamplingParams, seed: int, prefill: float, decode: float) -> Completion:
        logprobs = None
        if params.logprobs is not None:
            logprobs = [
                TokenLogprob(
                    token=self.tokenizer.decode([s.token_id]),
                    token_id=s.token_id,
                    logprob=s.logprob,
                    top=[(self.tokenizer.decode([i]), lp) for i, lp in s.top],
                )
                for s in steps
            ]
        explanations = [s.explanation for s in steps if s.explanation] if params.explain else None
        return Completion(
            text=text,
            token_ids=[s.token_id for s in steps],
            finish_reason=finish,
            prompt_tokens=len(prompt_ids),
            seed=seed if params.strategy == "sample" else None,
            sequence_logprob=sum(s.logprob for s in steps),
            logprobs=logprobs,
            explanations=explanations,
            prefill_seconds=prefill,
            decode_seconds=decode,
        )

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
