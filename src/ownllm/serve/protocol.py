"""Request bodies of the OpenAI-compatible API (and TGI's /generate), as pydantic models.

Standard fields come first, in OpenAI's documented order; ownllm's extensions follow. Unknown fields are
accepted and logged (clients send vendor extensions). Types are strict (`"stream": "yes"` is not true, `"n": 2.0`
is not 2), numbers are finite and bounded to what the engine takes, and text must be valid Unicode: a request
either passes here or gets a 400 naming the field, before any work. Each request converts itself to SamplingParams
once.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, field_validator, model_validator

from ownllm.generate.params import MAX_LOGIT_BIAS_ENTRIES, SEED_RANGE, SamplingParams
from ownllm.rag.context import DEFAULT_K, DEFAULT_MIN_SCORE

log = logging.getLogger(__name__)

Float = Annotated[StrictFloat, Field(allow_inf_nan=False)]  # ints are taken as floats; NaN, Infinity and "1" not
Seed = Annotated[StrictInt, Field(ge=SEED_RANGE[0], le=SEED_RANGE[1])]
TokenId = Annotated[StrictInt, Field(ge=0)]  # the upper bound is the model's vocabulary, checked by the engine
MaxTokens = Annotated[StrictInt, Field(ge=1, le=1 << 31)]  # the context window bounds it further


def _invalid_unicode(value: Any, path: str) -> str | None:
    """The first field holding a lone surrogate (JSON's "\ud800"), which no tokenizer or encoder can take."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path
    elif isinstance(value, dict):
        for key, item in value.items():
            found = _invalid_unicode(key, path) or _invalid_unicode(item, f"{path}.{key}" if path else str(key))
            if found:
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found = _invalid_unicode(item, f"{path}[{index}]")
            if found:
                return found
    return None


class ValidUnicode(BaseModel):
    """Refuses any string (key or value, at any depth) that is not valid Unicode, naming where it is."""

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        where = _invalid_unicode(data, "")
        if where is not None:
            raise ValueError(f"{where or 'the body'} is not valid Unicode text (it holds a lone surrogate)")
        return data


class _Open(ValidUnicode):
    model_config = ConfigDict(extra="allow")

    @model_validator(mode="after")
    def _log_extra(self) -> _Open:
        if self.model_extra:
            log.info("ignoring unknown request fields: %s", ", ".join(sorted(self.model_extra)))
        return self


class ContentPart(_Open):
    type: str
    text: str | None = None

    @model_validator(mode="after")
    def _text_only(self) -> ContentPart:
        if self.type != "text":
            raise ValueError(f"content parts of type '{self.type}' are not supported: this server's models read "
                             "text only")
        if self.text is None:
            raise ValueError("a text content part needs 'text' (a string)")
        return self


class ChatMessage(_Open):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text or "" for part in self.content)
        return self.content or ""


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object"] = "text"


class RagOptions(BaseModel):
    """A chat's `rag` options: answer from the k best chunks of the server's --rag-store, or "I don't know."
    (without running the model) when none reaches min_score cosine similarity to the last user message."""

    k: StrictInt = Field(DEFAULT_K, ge=1, le=20)
    min_score: Float = Field(DEFAULT_MIN_SCORE, ge=-1, le=1)


class _Sampling(_Open):
    temperature: Float | None = Field(None, ge=0, le=2)
    top_p: Float | None = Field(None, gt=0, le=1)
    n: StrictInt = Field(1, ge=1, le=16)
    stop: str | Annotated[list[str], Field(max_length=16)] | None = None
    seed: Seed | None = None
    presence_penalty: Float = Field(0.0, ge=-2, le=2)
    frequency_penalty: Float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, Float] | None = Field(None, max_length=MAX_LOGIT_BIAS_ENTRIES)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # ownllm extensions
    top_k: StrictInt | None = Field(None, ge=0, le=1 << 31)
    repetition_penalty: Float | None = Field(None, ge=0.01, le=100)
    ignore_eos: StrictBool = False  # as in vLLM: for benchmarks that need a fixed output length

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        for key in bias or {}:
            # JSON keys are strings: only the wire format is checked here; SamplingParams checks the values
            if not (key.isascii() and key.isdigit() and len(key) <= 9):
                raise ValueError(f"logit_bias keys are token ids (\"1234\"), got '{key}'")
        return bias

    def _params(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
        temperature = 1.0 if self.temperature is None else self.temperature  # OpenAI's default samples at T=1
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams.from_options(
            strategy="greedy" if temperature == 0 else "sample", temperature=temperature or None,
            top_p=self.top_p, top_k=self.top_k, repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            max_new_tokens=max_tokens, stop=stop or None, seed=self.seed, logprobs=logprobs,
            ignore_eos=self.ignore_eos or None,
            logit_bias={int(k): v for k, v in self.logit_bias.items()} if self.logit_bias else None)


class ChatCompletionRequest(_Sampling):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    # ownllm extension: answer from the server's --rag-store
    rag: StrictBool | RagOptions | None = None

    def to_sampling_params(self, default_max_tokens: int) -> SamplingParams:
        limit = self.max_completion_tokens or self.max_tokens or default_max_tokens
        return self._params(limit, (self.top_logprobs or 0) if self.logprobs else None)


class CompletionRequest(_Sampling):
    model: str
    prompt: str | list[str] | list[TokenId] | list[list[TokenId]]
    max_tokens: MaxTokens | None = 16
    logprobs: StrictInt | None = Field(None, ge=0, le=5)
    echo: StrictBool = False

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, prompt: Any) -> Any:
        if isinstance(prompt, list) and not prompt:
            raise ValueError("give at least one prompt")
        return prompt

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
    input: str | list[str] = Field(union_mode="left_to_right")
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: StrictInt | None = Field(None, ge=1)  # the model's own size only: MiniLM was not trained to be cut
    user: str | None = None

    @field_validator("input")
    @classmethod
    def _bounded(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and len(value) > 2048:  # OpenAI's own limit
            raise ValueError(f"at most 2048 inputs per request, got {len(value)}")
        return value


class TokenizeRequest(_Open):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: StrictBool = True

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        return self


class TGIParameters(_Open):
    max_new_tokens: MaxTokens = 20
    temperature: Float | None = Field(None, gt=0, le=100)
    top_k: StrictInt | None = Field(None, ge=0, le=1 << 31)
    top_p: Float | None = Field(None, gt=0, le=1)
    do_sample: StrictBool = False
    repetition_penalty: Float | None = Field(None, ge=0.01, le=100)
    seed: Seed | None = None
    stop: list[str] = Field(default_factory=list, max_length=16)
    details: StrictBool = False

    def to_sampling_params(self) -> SamplingParams:
        sample = self.do_sample or self.temperature is not None or self.top_p is not None or bool(self.top_k)
        return SamplingParams.from_options(
            strategy="sample" if sample else "greedy", temperature=self.temperature, top_k=self.top_k,
            top_p=self.top_p, repetition_penalty=self.repetition_penalty, max_new_tokens=self.max_new_tokens,
            stop=self.stop or None, seed=self.seed, logprobs=0 if self.details else None)


class TGIRequest(_Open):
    inputs: str = Field(min_length=1)
    parameters: TGIParameters = Field(default_factory=TGIParameters)
    stream: StrictBool = False
