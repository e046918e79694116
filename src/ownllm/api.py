"""The Python API: `ownllm.load(name)` gives an object with the CLI's verbs as methods."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from ownllm.errors import OwnLLMError
from ownllm.generate.constraints import Constraint
from ownllm.generate.engine import Completion, Engine, TextDelta
from ownllm.generate.open import open_engine
from ownllm.generate.params import SamplingParams
from ownllm.models.chat_template import Message
from ownllm.models.tokens import TokenReport, token_report

Schema = dict[str, Any] | type  # a JSON schema, or a pydantic model class


class LLM:
    """A loaded model. Generation options are SamplingParams' fields, as keywords; `schema`, `regex`, `grammar` and
    `choice` constrain what the model may write (at most one of them).

    Example:
        >>> m = ownllm.load("smollm2-135m-instruct")
        >>> m.generate("The capital of France is", max_new_tokens=8).text
        >>> m.chat([{"role": "user", "content": "Hi!"}], strategy="sample", seed=1).text
        >>> m.chat([{"role": "user", "content": "Is water wet?"}], choice=["yes", "no"]).text
        'yes'
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @property
    def context_length(self) -> int:
        """Tokens the model attends over: prompt plus generated tokens must fit in it."""
        return self.engine.context_length

    def generate(self, prompt: str | list[int], *, schema: Schema | None = None, regex: str | None = None,
                 grammar: str | None = None, choice: list[str] | None = None, **options: Any) -> Completion:
        """Continue `prompt` (text, or token ids) and return the whole completion.

        Options are SamplingParams' fields (strategy, max_new_tokens, temperature, top_k, top_p, stop, seed,
        logprobs, explain, constraint, ...); an unknown or out-of-range one raises OwnLLMError naming it.

        Constraints (at most one), enforced token by token:
            schema: a JSON schema dict, or a pydantic model class (whose objects then take no undeclared keys, as
                OpenAI's strict schemas): the reply is one JSON value valid against it, and `.parsed` holds it
                parsed (a dict, or an instance of the class).
            regex: the reply matches it as a whole.
            grammar: a Lark grammar (or GBNF, when its rules are written with `::=`) the reply follows.
            choice: the reply is exactly one of these strings.
        The reply ends ("stop") when the constraint is complete; if max_new_tokens runs out first, finish_reason is
        "length" and `.parsed` is None. A constraint that does not compile raises OwnLLMError naming it before
        anything is generated.

        Example:
            >>> c = m.generate("The capital of France is", max_new_tokens=8)
            >>> c.text, c.finish_reason, c.completion_tokens
            (' Paris.\\n\\nThe answer is:', 'length', 8)
            >>> from pydantic import BaseModel
            >>> class Person(BaseModel):
            ...     name: str
            ...     age: int
            >>> m.generate("A person, as JSON:", schema=Person, max_new_tokens=40).parsed
            Person(name='John', age=30)
            >>> m.generate("The zip code of Beverly Hills, CA is", regex=r"[0-9]{5}").text
            '12345'
        """
        constraint, parse = _constraint(schema, regex, grammar, choice)
        completion = self.engine.generate(prompt, _params(options, constraint))
        return _parsed(completion, parse)

    def stream(self, prompt: str | list[int], *, schema: Schema | None = None, regex: str | None = None,
               grammar: str | None = None, choice: list[str] | None = None, **options: Any) -> Iterator[str]:
        """Yield the completion's text piece by piece as it becomes final (stop strings never leak out). Takes the
        same options and constraints as `generate`.

        Example:
            >>> for piece in m.stream("Once upon a time", max_new_tokens=32, strategy="sample", seed=0):
            ...     print(piece, end="", flush=True)
        """
        constraint, _ = _constraint(schema, regex, grammar, choice)
        for event in self.engine.stream(prompt, _params(options, constraint)):
            if isinstance(event, TextDelta) and event.text:
                yield event.text

    def chat(self, messages: list[Message], *, schema: Schema | None = None, regex: str | None = None,
             grammar: str | None = None, choice: list[str] | None = None, **options: Any) -> Completion:
        """Answer a conversation, rendered with the model's own chat template. Takes the same options and
        constraints as `generate` (with `schema`, the reply's `.parsed` is the parsed object).

        Example:
            >>> m.chat([{"role": "system", "content": "Answer in one word."},
            ...         {"role": "user", "content": "Capital of Italy?"}], max_new_tokens=8).text
            'Italy is indeed a sovereign state in the'
            >>> schema = {"type": "object", "properties": {"capital": {"type": "string"}}, "required": ["capital"]}
            >>> m.chat([{"role": "user", "content": "Capital of Italy, as JSON?"}], schema=schema).parsed
            {'capital': 'ITALIA'}
        """
        constraint, parse = _constraint(schema, regex, grammar, choice)
        return _parsed(self.engine.chat(messages, _params(options, constraint)), parse)

    def tokenize(self, text: str, *, price_per_1m: float | None = None) -> TokenReport:
        """How the model splits `text` into tokens (ids, pieces, count; a cost estimate if a price is given).

        Example:
            >>> m.tokenize("Hello world").count
            2
        """
        return token_report(self.engine.tokenizer, text, price_per_1m=price_per_1m)


def _constraint(schema: Schema | None, regex: str | None, grammar: str | None, choice: list[str] | None
                ) -> tuple[Constraint | None, Any]:
    """The Constraint the keywords ask for, and how to parse a finished reply (None: not at all)."""
    given = {name: value for name, value in (("schema", schema), ("regex", regex), ("grammar", grammar),
                                             ("choice", choice)) if value is not None}
    if len(given) > 1:
        raise OwnLLMError(f"give at most one of schema, regex, grammar and choice, got {', '.join(given)}",
                          param=next(iter(given)))
    if regex is not None:
        return Constraint.regex(regex).named("regex"), None
    if grammar is not None:
        return Constraint.grammar(grammar).named("grammar"), None
    if choice is not None:
        return Constraint.choice(choice).named("choice"), None
    if schema is None:
        return None, None
    if isinstance(schema, type):
        from pydantic import BaseModel

        if not issubclass(schema, BaseModel):
            raise OwnLLMError(f"schema must be a JSON schema (dict) or a pydantic model class, got the class "
                              f"{schema.__name__}", param="schema")
        document = schema.model_json_schema()
        if schema.model_config.get("extra") != "allow":
            document = _closed(document)
        return Constraint.json_schema(document).named("schema"), schema.model_validate_json
    if not isinstance(schema, dict):
        raise OwnLLMError(f"schema must be a JSON schema (dict) or a pydantic model class, got "
                          f"{type(schema).__name__}", param="schema")
    return Constraint.json_schema(schema).named("schema"), json.loads


_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")  # name -> schema
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_ONE = ("items", "additionalProperties", "not", "contains")


def _closed(schema: Any) -> Any:
    """A pydantic model's schema with no room for properties it does not declare (as OpenAI's strict schemas): left
    open, a small model spends its tokens inventing more keys, which the model class then drops anyway."""
    if not isinstance(schema, dict):
        return schema
    closed = dict(schema)
    for key in _SCHEMA_MAPS:
        if isinstance(closed.get(key), dict):
            closed[key] = {name: _closed(value) for name, value in closed[key].items()}
    for key in _SCHEMA_LISTS:
        if isinstance(closed.get(key), list):
            closed[key] = [_closed(value) for value in closed[key]]
    for key in _SCHEMA_ONE:
        if isinstance(closed.get(key), dict):
            closed[key] = _closed(closed[key])
    if (closed.get("type") == "object" or "properties" in closed) and "additionalProperties" not in closed:
        closed["additionalProperties"] = False
    return closed


def _params(options: dict[str, Any], constraint: Constraint | None) -> SamplingParams:
    if constraint is not None:
        if options.get("constraint") is not None:
            raise OwnLLMError("give either constraint or schema/regex/grammar/choice, not both", param="constraint")
        options = {**options, "constraint": constraint}
    return SamplingParams.from_options(**options)


def _parsed(completion: Completion, parse: Any) -> Completion:
    """Fill `.parsed` for a schema-constrained reply that finished (one cut off by max_new_tokens stays None)."""
    if parse is not None and completion.finish_reason == "stop":
        try:
            completion.parsed = parse(completion.text)
        except ValueError as exc:  # only a stop string can end a reply before its grammar does
            raise OwnLLMError(f"the reply does not parse against the schema ({exc}); did a stop string cut it "
                              f"short?", param="schema") from None
    return completion


def load(model: str, *, backend: str = "auto", dtype: str = "auto", device: str = "auto") -> LLM:
    """Load a model by alias, pulled name, HF folder, fine-tuning run folder, .gguf file or hub id.

    Args:
        model: what to load; an unknown name raises OwnLLMError listing the local models and aliases.
        backend: auto (llama.cpp for a .gguf when llama-cpp-python is installed, else transformers),
            transformers or llama.cpp.
        dtype: transformers backend: auto (measured on this machine), fp32, bf16 or fp16.
        device: auto, cpu or cuda.

    Example:
        >>> import ownllm
        >>> m = ownllm.load("smollm2-135m-instruct")
        >>> m.generate("The capital of France is", max_new_tokens=5).text
    """
    return LLM(open_engine(model, backend=backend, dtype=dtype, device=device))
