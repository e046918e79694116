"""Request bodies of the OpenAI-compatible API (and TGI's /generate), as pydantic models.

Standard fields come first, in OpenAI's documented order; ownllm's extensions follow. Unknown fields are
accepted and logged (clients send vendor extensions). Each request converts itself to SamplingParams once.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ownllm.generate.params import SamplingParams

log = logging.getLogger(__name__)


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")

    @model_validator(mode="after")
    def _log_extra(self) -> _Open:
        if self.model_extra:
            log.info("ignoring unknown request fields: %s", ", ".join(sorted(self.model_extra)))
        return self


class ChatMessage(_Open):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.get("text", "") for part in self.content if part.get("type") == "text")
        return self.content or ""


class StreamOptions(BaseModel):
    include_usage: bool = False


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object"] = "text"


class RagOptions(BaseModel):
    k: int = Field(4, ge=1, le=20)
    min_score: float = 0.3


class _Sampling(_Open):
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # ownllm extensions
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, gt=0)
    ignore_eos: bool = False  # as in vLLM: for benchmarks that need a fixed output length

    def _params(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
        temperature = 1.0 if self.temperature is None else self.temperature  # OpenAI's default samples at T=1
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams.from_options(
            strategy="greedy" if temperature == 0 else "sample", temperature=temperature or None,
            top_p=self.top_p, top_k=self.top_k, repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            max_new_tokens=max_tokens, stop=stop or None, seed=self.seed, logprobs=logprobs,
            ignore_eos=self.ignore_eos or None)


class ChatCompletionRequest(_Sampling):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    # ownllm extension: answer from the server's --rag-store
    rag: bool | RagOptions | None = None

    def to_sampling_params(self, default_max_tokens: int) -> SamplingParams:
        limit = self.max_completion_tokens or self.max_tokens or default_max_tokens
        return self._params(limit, (self.top_logprobs or 0) if self.logprobs else None)


class CompletionRequest(_Sampling):
    model: str
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False

    def to_sampling_params(self, default_max_tokens: int) -> SamplingParams:
        return self._params(self.max_tokens or default_max_tokens, self.logprobs)

    def prompts(self) -> list[str | list[int]]:
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if prompt and all(isinstance(p, int) for p in prompt):
            return [list(prompt)]  # type: ignore[arg-type]
        return list(prompt)  # type: ignore[arg-type]


class EmbeddingRequest(_Open):
    input: str | list[str]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None


class TokenizeRequest(_Open):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        return self


class TGIParameters(_Open):
    max_new_tokens: int = Field(20, ge=1)
    temperature: float | None = Field(None, gt=0)
    top_k: int | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    do_sample: bool = False
    repetition_penalty: float | None = Field(None, gt=0)
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)
    details: bool = False

    def to_sampling_params(self) -> SamplingParams:
        sample = self.do_sample or self.temperature is not None or self.top_p is not None or bool(self.top_k)
        return SamplingParams.from_options(
            strategy="sample" if sample else "greedy", temperature=self.temperature, top_k=self.top_k,
            top_p=self.top_p, repetition_penalty=self.repetition_penalty, max_new_tokens=self.max_new_tokens,
            stop=self.stop or None, seed=self.seed, logprobs=0 if self.details else None)


class TGIRequest(_Open):
    inputs: str = Field(min_length=1)
    parameters: TGIParameters = Field(default_factory=TGIParameters)
    stream: bool = False
