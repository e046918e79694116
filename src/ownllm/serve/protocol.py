"""Request bodies of the OpenAI-compatible API (and TGI's /generate), as pydantic models.

Standard fields come first, in OpenAI's documented order; ownllm's extensions follow. Unknown fields are
accepted and logged (clients send vendor extensions). Types are strict (`"stream": "yes"` is not true, `"n": 2.0`
is not 2), numbers are finite and bounded to what the engine takes, and text must be valid Unicode: a request
either passes here or gets a 400 naming the field, before any work. Each request converts itself to SamplingParams
once.
"""

from __future__ import annotations

import json
import logging
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, field_validator, model_validator

from ownllm.errors import OwnLLMError
from ownllm.generate.constraints import Constraint
from ownllm.generate.params import MAX_LOGIT_BIAS_ENTRIES, SEED_RANGE, SamplingParams
from ownllm.generate.tools import MAX_TOOLS, ToolPlan, plan_tools
from ownllm.models.tool_template import TOOL_NAME  # OpenAI's name rule, for function and schema names alike
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


class CalledFunction(_Open):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class MessageToolCall(_Open):
    """A call an earlier assistant turn made (sent back with the conversation)."""

    id: str
    type: Literal["function"] = "function"
    function: CalledFunction


class ChatMessage(_Open):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None  # assistant turns that called tools (content may be null)
    tool_call_id: str | None = None  # tool turns: the call this is the result of

    @model_validator(mode="after")
    def _consistent(self) -> ChatMessage:
        # as OpenAI answers them: these are 400s, not conversations the model should see
        if self.content is None and self.role in ("system", "user", "developer", "tool"):
            raise ValueError(f"content is required in {self.role} messages")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("tool messages need the tool_call_id of the call they answer")
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        return self

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text or "" for part in self.content)
        return self.content or ""

    def to_message(self) -> dict[str, Any]:
        """The message as the chat path takes it: role and text, plus the tool fields when there are any."""
        message: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        if self.tool_calls:
            message["tool_calls"] = [call.model_dump(include={"id", "type", "function"}) for call in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


class FunctionSpec(_Open):
    name: str = Field(pattern=f"^{TOOL_NAME.pattern}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of an object; none: no arguments
    strict: StrictBool | None = None  # the arguments are held to the schema either way


class ToolSpec(_Open):
    type: Literal["function"]
    function: FunctionSpec


class ChosenFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: ChosenFunction


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


JSON_OBJECT_HINT = "Reply with a single valid JSON object and nothing else."


class JsonSchemaFormat(BaseModel):
    """`response_format.json_schema`, as OpenAI defines it (`name` may be left out here). The schema is enforced
    token by token whether or not `strict` is set; without one, any JSON object."""

    model_config = ConfigDict(populate_by_name=True)

    name: str | None = Field(None, pattern=f"^{TOOL_NAME.pattern}$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: StrictBool | None = None

    @field_validator("schema_")
    @classmethod
    def _writable(cls, schema: dict[str, Any] | None) -> dict[str, Any] | None:
        if schema is not None:
            try:
                Constraint.json_schema(schema)  # JSON's NaN and Infinity parse, but are no part of a schema
            except OwnLLMError as exc:
                raise ValueError(exc.message) from None
        return schema


class ResponseFormat(BaseModel):
    """`response_format`: text (no constraint), json_object (any JSON object) or json_schema (JSON valid against
    the schema). The JSON kinds are enforced by the sampler: the reply always parses, unless max_tokens cuts it
    short (finish_reason "length")."""

    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format of type json_schema needs 'json_schema' ({\"name\", \"schema\"})")
        return self

    def constraint(self) -> Constraint | None:
        """What the reply must be, named in errors as the request field it came from."""
        if self.type == "text":
            return None
        if self._schema is None:
            return Constraint.any_json_object().named("response_format")
        return Constraint.json_schema(self._schema).named("response_format.json_schema.schema")

    def hint(self) -> str | None:
        """A system message that tells the model what the sampler will hold it to (it writes better JSON when it
        knows), or None for text."""
        if self.type == "text":
            return None
        if self._schema is None:
            return JSON_OBJECT_HINT
        description = self.json_schema.description if self.json_schema is not None else None
        about = f" ({description})" if description else ""
        return (f"Reply with JSON{about} that follows this JSON schema, and nothing else: "
                f"{json.dumps(self._schema, ensure_ascii=False)}")

    @property
    def _schema(self) -> dict[str, Any] | None:
        return self.json_schema.schema_ if self.type == "json_schema" and self.json_schema is not None else None


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
    min_p: Float | None = Field(None, ge=0, le=1)  # as vLLM's and llama.cpp's servers
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

    def _params(self, max_tokens: int, logprobs: int | None, constraint: Constraint | None = None
                ) -> SamplingParams:
        temperature = 1.0 if self.temperature is None else self.temperature  # OpenAI's default samples at T=1
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams.from_options(
            strategy="greedy" if temperature == 0 else "sample", temperature=temperature or None,
            top_p=self.top_p, top_k=self.top_k, min_p=self.min_p, repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            max_new_tokens=max_tokens, stop=stop or None, seed=self.seed, logprobs=logprobs,
            ignore_eos=self.ignore_eos or None, constraint=constraint,
            logit_bias={int(k): v for k, v in self.logit_bias.items()} if self.logit_bias else None)


class ChatCompletionRequest(_Sampling):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)

    @field_validator("messages")
    @classmethod
    def _results_answer_calls(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        called: set[str] = set()
        for index, message in enumerate(messages):
            called.update(call.id for call in message.tool_calls or [])
            if message.role == "tool" and message.tool_call_id not in called:
                raise ValueError(f"messages[{index}].tool_call_id {message.tool_call_id!r} answers no tool call of "
                                 f"an earlier assistant message")
        return messages
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    # as OpenAI's API: an empty list is refused (leave tools out to offer none)
    tools: Annotated[list[ToolSpec], Field(min_length=1, max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: StrictBool = True
    # ownllm extension: answer from the server's --rag-store
    rag: StrictBool | RagOptions | None = None

    def tool_plan(self) -> ToolPlan | None:
        """What the tools ask of the model (None: no tools offered); checked once, OwnLLMError naming the field."""
        if "_tool_plan" not in self.__dict__:
            tools = [t.model_dump(exclude_none=True) for t in self.tools] if self.tools is not None else None
            choice = self.tool_choice.model_dump() if isinstance(self.tool_choice, BaseModel) else self.tool_choice
            plan = plan_tools(tools, choice, self.parallel_tool_calls)
            if plan is not None and plan.calls_allowed and self.response_format is not None and \
                    self.response_format.type != "text":
                raise OwnLLMError("give tools or a JSON response_format, not both (or tool_choice \"none\")",
                                  param="response_format")
            self.__dict__["_tool_plan"] = plan
        return self.__dict__["_tool_plan"]

    def to_sampling_params(self, default_max_tokens: int) -> SamplingParams:
        limit = self.max_completion_tokens or self.max_tokens or default_max_tokens
        constraint = self.response_format.constraint() if self.response_format is not None else None
        plan = self.tool_plan()
        if plan is not None and (plan.calls_allowed or constraint is None):
            constraint = plan.constraint()
        return self._params(limit, (self.top_logprobs or 0) if self.logprobs else None, constraint)


class CompletionRequest(_Sampling):
    model: str
    prompt: str | list[str] | list[TokenId] | list[list[TokenId]]
    max_tokens: MaxTokens | None = 16
    logprobs: StrictInt | None = Field(None, ge=0, le=5)
    echo: StrictBool = False
    # OpenAI's: generate best_of completions of each prompt and return the n with the highest log-probability per
    # token (all of them count as completion tokens)
    best_of: StrictInt | None = Field(None, ge=1, le=16)
    response_format: ResponseFormat | None = None  # an extension (as vLLM's): the completion follows it

    def candidates(self) -> int:
        """Completions generated per prompt: best_of (at least n, and not streamed, as OpenAI's API has it), or n."""
        if self.best_of is None:
            return self.n
        if self.best_of < self.n:
            raise OwnLLMError(f"best_of ({self.best_of}) must be at least n ({self.n})", param="best_of")
        if self.stream and self.best_of > self.n:
            raise OwnLLMError("best_of above n cannot be streamed: the best are known only once all are done",
                              param="best_of")
        return self.best_of

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, prompt: Any) -> Any:
        if isinstance(prompt, list) and not prompt:
            raise ValueError("give at least one prompt")
        return prompt

    def to_sampling_params(self, default_max_tokens: int) -> SamplingParams:
        constraint = self.response_format.constraint() if self.response_format is not None else None
        params = self._params(self.max_tokens or default_max_tokens, self.logprobs, constraint)
        if self.echo and self.logprobs is not None:  # OpenAI's: the echoed prompt's tokens come scored too
            params.prompt_logprobs = self.logprobs
        return params

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


class ClassifyRequest(_Open):
    """POST /v1/classify (an ownllm extension): label text with a classification run served by `--classifier`."""

    model: str
    input: str | list[str] = Field(union_mode="left_to_right")

    @field_validator("input")
    @classmethod
    def _texts(cls, value: str | list[str]) -> str | list[str]:
        texts = [value] if isinstance(value, str) else value
        if not texts:
            raise ValueError("give at least one text")
        if len(texts) > 256:
            raise ValueError(f"at most 256 inputs per request, got {len(texts)}")
        blank = next((index for index, text in enumerate(texts) if not text.strip()), None)
        if blank is not None:
            where = "" if isinstance(value, str) else f"[{blank}]"
            raise ValueError(f"input{where} is empty: every input must be non-empty text")
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


class DetokenizeRequest(_Open):
    """POST /detokenize (vLLM's): token ids back to text."""

    model: str | None = None
    tokens: list[TokenId]


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
