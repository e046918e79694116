"""Constrained decoding: output that follows a JSON schema, a regular expression, a grammar or a list of choices.

A `Constraint` says what the output must be: a frozen, hashable spec that `SamplingParams.constraint` carries
from any front door. `Grammars` compiles specs against one tokenizer with llguidance (once per spec: an LRU
cache) and gives every sequence a `GrammarState` of its own, which the one sampler (`engine.choose_step`) asks
for the tokens allowed next and tells which token was chosen. A sequence whose grammar is complete ends with
finish_reason "stop"; one whose token budget runs out first ends with "length" (its text is then a prefix).

Example (a Lark grammar on a chat request, as the server's tools would apply one):
    >>> params = SamplingParams(max_new_tokens=64, constraint=Constraint.lark('start: "yes" | "no"'))
    >>> engine.chat([{"role": "user", "content": "Is water wet?"}], params).text
    'yes'

Nothing here imports llguidance, torch or numpy at module level: SamplingParams (and so the CLI's start-up)
imports this module.
"""

from __future__ import annotations

import collections
import json
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

from ownllm.errors import OwnLLMError, check_text

if TYPE_CHECKING:
    import torch

ConstraintKind = Literal["json_schema", "regex", "lark", "gbnf", "choice"]
KINDS: dict[str, str] = {"json_schema": "JSON schema", "regex": "regular expression", "lark": "Lark grammar",
                         "gbnf": "GBNF grammar", "choice": "list of choices"}
# JSON on one line, spaced as json.dumps writes it: with free whitespace, small models fill the token budget with
# newlines and indentation instead of closing the object.
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
CACHE_SIZE = 64  # compiled grammars kept per tokenizer


@dataclass(frozen=True)
class Constraint:
    """What the generated text must be. Build one with the constructors (`Constraint.json_schema(...)`, ...).

    Two constraints are equal (and share one compiled grammar) when kind and source are; `param` and `label` only
    say, in errors, where the constraint came from.

    Args:
        kind: json_schema | regex | lark | gbnf | choice.
        source: the schema as JSON text, the pattern, the grammar text, or the choices as a JSON list.
        param: the option or request field it came from (an error's `param`).
        label: how to name it in error messages, when not by `param` (the CLI: "--schema FILE").
    """

    kind: ConstraintKind
    source: str
    param: str = field(default="constraint", compare=False)
    label: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise OwnLLMError(f"constraint kind must be one of {', '.join(KINDS)}, got {self.kind!r}", param=self.param)
        if not isinstance(self.source, str) or not self.source.strip():
            raise OwnLLMError(f"{self.where}: the {KINDS[self.kind]} is empty", param=self.param)
        check_text(self.source, self.param)

    # --- constructors ---------------------------------------------------------------------------
    @classmethod
    def json_schema(cls, schema: Mapping[str, Any] | str) -> Constraint:
        """Output that is one JSON value valid against `schema` (a dict, or its JSON text), written on one line as
        `json.dumps` writes it; an object's properties come in the schema's order, any others after them."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as exc:
                raise OwnLLMError(f"the JSON schema is not valid JSON ({exc})", param="schema") from None
        if not isinstance(schema, Mapping):
            raise OwnLLMError(f"a JSON schema must be a JSON object, got {type(schema).__name__}", param="schema")
        try:
            # key order is kept: the model writes properties in the schema's order
            text = json.dumps(schema, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise OwnLLMError(f"the JSON schema cannot be written as JSON ({exc})", param="schema") from None
        return cls("json_schema", text, param="schema")

    @classmethod
    def any_json_object(cls) -> Constraint:
        """Output that is one JSON object, any keys and values (OpenAI's `response_format: json_object`)."""
        return cls.json_schema({"type": "object"})

    @classmethod
    def regex(cls, pattern: str) -> Constraint:
        """Output that matches `pattern` as a whole (Rust `regex` syntax, as Python's for everyday patterns)."""
        return cls("regex", _text(pattern, "regex"), param="regex")

    @classmethod
    def lark(cls, grammar: str) -> Constraint:
        """Output that the Lark grammar's `start` rule derives (llguidance's Lark: `%json {...}` embeds a schema)."""
        return cls("lark", _text(grammar, "grammar"), param="grammar")

    @classmethod
    def gbnf(cls, grammar: str) -> Constraint:
        """Output that the GBNF grammar (llama.cpp's format) derives from its `root` rule."""
        return cls("gbnf", _text(grammar, "grammar"), param="grammar")

    @classmethod
    def grammar(cls, grammar: str) -> Constraint:
        """A Lark grammar, or a GBNF one when its rules are written with `::=`."""
        text = _text(grammar, "grammar")
        return cls.gbnf(text) if "::=" in text else cls.lark(text)

    @classmethod
    def choice(cls, options: Sequence[str]) -> Constraint:
        """Output that is exactly one of `options`."""
        if isinstance(options, str) or not isinstance(options, Sequence):
            raise OwnLLMError("choice takes a list of strings", param="choice")
        if not options:
            raise OwnLLMError("choice needs at least one option", param="choice")
        for index, option in enumerate(options):
            if not isinstance(option, str) or not option:
                raise OwnLLMError(f"choice[{index}] must be a non-empty string, got {option!r}", param="choice")
        if len(set(options)) != len(options):
            raise OwnLLMError("choice lists an option twice", param="choice")
        return cls("choice", json.dumps(list(options), ensure_ascii=False), param="choice")

    # --- reading it back --------------------------------------------------------------------------
    def named(self, param: str, label: str | None = None) -> Constraint:
        """The same constraint, named in errors as `param` (and `label`, for a human-facing name)."""
        return replace(self, param=param, label=label)

    @property
    def where(self) -> str:
        return self.label or self.param

    @property
    def description(self) -> str:
        return KINDS[self.kind]

    @property
    def schema(self) -> dict[str, Any] | None:
        """The JSON schema, for json_schema constraints."""
        return json.loads(self.source) if self.kind == "json_schema" else None

    @property
    def choices(self) -> list[str] | None:
        return json.loads(self.source) if self.kind == "choice" else None

    def grammar_text(self) -> str:
        """llguidance's grammar for this constraint (not yet checked against a tokenizer)."""
        from llguidance import LLMatcher

        try:
            if self.kind == "json_schema":
                return LLMatcher.grammar_from_json_schema(self.source, defaults=JSON_LAYOUT)  # type: ignore[arg-type]
            if self.kind == "regex":
                return LLMatcher.grammar_from_regex(self.source)
            if self.kind == "lark":
                return LLMatcher.grammar_from_lark(self.source)
            if self.kind == "gbnf":
                from llguidance.gbnf_to_lark import gbnf_to_lark

                return LLMatcher.grammar_from_lark(gbnf_to_lark(self.source))
            # JSON string literals are Lark string literals
            options = (json.dumps(option, ensure_ascii=False) for option in json.loads(self.source))
            return LLMatcher.grammar_from_lark("start: " + " | ".join(options))
        except Exception as exc:  # llguidance raises ValueError, its GBNF converter anything
            raise self.error(exc) from None

    def check(self) -> None:
        """Compile without a tokenizer: bad syntax, unknown references and keywords llguidance does not implement
        raise here as `Grammars.compile` would, before a model loads (the CLI checks its options with this)."""
        from llguidance import LLMatcher

        failed, messages = LLMatcher.validate_grammar_with_warnings(self.grammar_text())
        if failed:
            raise self.error(messages[0] if messages else "invalid")
        self.check_references()

    def check_references(self) -> None:
        """What llguidance finds only mid-generation, checked up front: a schema's references that loop forever, and
        regular expressions too large for its lexer (it fails at the reply's first token)."""
        from ownllm.json_schema import oversized_pattern, pattern_problem, reference_loop

        if self.kind == "json_schema":
            schema = json.loads(self.source)
            problem = reference_loop(schema) or oversized_pattern(schema)
            if problem:
                raise self.error(problem)
        elif self.kind == "regex":
            problem = pattern_problem(self.source)
            if problem:
                raise self.error(problem)

    def error(self, problem: object, failed: str = "cannot be used") -> OwnLLMError:
        """The OwnLLMError saying this constraint cannot be used (or `failed` otherwise), and why."""
        detail = one_line(problem)
        if self.kind == "regex":  # the position is in the one-rule grammar the pattern was wrapped in, not the pattern
            detail = re.sub(r"^at \d+\(\d+\): ", "", detail)
        return OwnLLMError(f"{self.where}: the {self.description} {failed}: {detail}", param=self.param)


_EXCERPT = re.compile(r"^(\d+ \|.*|\^+)$")


def one_line(problem: object) -> str:
    """llguidance's message on one line, without the source excerpts under it (the position is in the message)."""
    # (llguidance appends its parser's state to some errors: a kilobyte of counters, of no use to a client)
    lines = [line.strip() for line in str(problem).split("<state>")[0].splitlines()]
    return " ".join(line for line in lines if line and not _EXCERPT.match(line))[:400] or "invalid"


def _text(value: object, param: str) -> str:
    if not isinstance(value, str):
        raise OwnLLMError(f"{param} must be a string, got {type(value).__name__}", param=param)
    return value


class Grammars:
    """One tokenizer as llguidance sees it, and the constraints compiled against it (an LRU cache). Thread-safe:
    a server compiles in its request handlers and starts sequences in its engine thread.

    Args:
        tokenizer: the engine's Hugging Face (fast) tokenizer; llama.cpp's engine has one too, with the GGUF's ids.
        vocab_size: the width of the model's logits (padded embedding tables are wider than the tokenizer).
        eos_ids: the tokens that end a sequence: allowed only where the grammar is complete.
    """

    def __init__(self, tokenizer: Any, vocab_size: int, eos_ids: set[int], cache_size: int = CACHE_SIZE) -> None:
        self.tokenizer = tokenizer
        self.columns = max(vocab_size, len(tokenizer))
        self.eos_ids = sorted(eos_ids)
        self.cache_size = cache_size
        self._compiled: collections.OrderedDict[Constraint, Any] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._lltokenizer: Any = None

    def _ll_tokenizer(self) -> Any:
        with self._lock:
            if self._lltokenizer is None:
                import llguidance.hf

                try:
                    self._lltokenizer = llguidance.hf.from_tokenizer(
                        self.tokenizer, n_vocab=self.columns, eos_token=self.eos_ids or None)
                except Exception as exc:
                    raise OwnLLMError(f"constrained decoding needs a fast (tokenizers) tokenizer: {exc}",
                                      kind="unsupported", param="constraint") from None
            return self._lltokenizer

    def compile(self, constraint: Constraint) -> Any:
        """The constraint's pristine llguidance matcher (compiled once, then from the cache: never advance it, `start`
        gives each sequence a copy); a constraint that does not compile raises OwnLLMError naming its param."""
        with self._lock:
            matcher = self._compiled.get(constraint)
            if matcher is not None:
                self._compiled.move_to_end(constraint)
                return matcher
        from llguidance import LLMatcher

        tokenizer = self._ll_tokenizer()
        grammar = constraint.grammar_text()
        try:
            matcher = LLMatcher(tokenizer, grammar, log_level=0)
        except Exception as exc:  # API misuse only (llguidance reports grammar errors through is_error)
            raise constraint.error(exc) from None
        if matcher.is_error():
            raise constraint.error(matcher.get_error())
        constraint.check_references()
        with self._lock:
            self._compiled[constraint] = matcher
            self._compiled.move_to_end(constraint)
            while len(self._compiled) > self.cache_size:
                self._compiled.popitem(last=False)
        return matcher

    def matches(self, constraint: Constraint, text: str) -> bool:
        """Whether `text` (tokenized as the model would write it) is a complete output under the constraint: what
        the tests check schemas with, without running the model."""
        matcher = self.compile(constraint).deep_copy()
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return matcher.try_consume_tokens(ids) == len(ids) and bool(matcher.is_accepting())

    def start(self, constraint: Constraint) -> GrammarState:
        """A fresh state for one sequence (a copy of the compiled matcher: copying costs microseconds)."""
        return GrammarState(self.compile(constraint).deep_copy(), constraint, self.columns)


class GrammarState:
    """One sequence's place in its grammar: which tokens may come next, and whether the grammar is complete."""

    def __init__(self, matcher: Any, constraint: Constraint, columns: int) -> None:
        import torch

        self.matcher = matcher
        self.constraint = constraint
        self.columns = columns
        self.bitmask = torch.full((1, (columns + 31) // 32), -1, dtype=torch.int32)
        self.mask_ready = False

    def fill_mask(self) -> None:
        """Compute the bitmask of the tokens allowed next (llguidance: one bit per token, into our tensor's memory;
        what `llguidance.torch.fill_next_token_bitmask` does, without importing that module: it loads torch's
        compiler, seconds of start-up, for a kernel not used here)."""
        self.matcher.unsafe_compute_mask_ptr(self.bitmask.data_ptr(), self.bitmask.numel() * 4)
        self._mask_filled()

    def _mask_filled(self) -> None:
        if self.matcher.is_error():
            raise self.constraint.error(self.matcher.get_error(), "failed while generating")
        self.mask_ready = True

    def allowed(self, size: int) -> torch.Tensor:
        """A bool tensor of `size` (the logits' width): True for the tokens the grammar allows next."""
        import numpy as np
        import torch

        if not self.mask_ready:
            self.fill_mask()
        # bit i of 32-bit word w is token 32 * w + i: the words' bytes, little-endian, unpacked little-endian; past
        # the mask's end (padded vocabulary columns), zeros. numpy, not torch: one pass on one thread, microseconds
        # where torch's elementwise kernels wait for busy OpenMP workers.
        words = self.bitmask.numpy().astype("<i4", copy=False).view(np.uint8)
        bits = np.unpackbits(words, count=size, bitorder="little")
        if not bits.any():
            raise self.constraint.error("no token of this model can come next", "failed while generating")
        return torch.from_numpy(bits.view(np.bool_))

    def advance(self, token_id: int) -> None:
        """Follow the chosen token (one the mask allowed)."""
        self.mask_ready = False
        if not self.matcher.consume_token(token_id):
            raise self.constraint.error(f"token {token_id}: {self.matcher.get_error()}", "failed while generating")

    @property
    def finished(self) -> bool:
        """The grammar is complete: nothing but the end of the sequence may follow."""
        return bool(self.matcher.is_stopped())

    @property
    def accepting(self) -> bool:
        """What was generated so far is a complete derivation (more may still follow)."""
        return bool(self.matcher.is_accepting())


_executor: Any = None


def fill_masks(states: Sequence[GrammarState]) -> None:
    """Compute the next-token masks of many sequences at once, on llguidance's own threads (the batch scheduler,
    before each decode step): the same masks `GrammarState.allowed` would compute one by one."""
    global _executor
    pending = [s for s in states if not s.mask_ready]
    if len(pending) < 2:
        return
    import torch
    from llguidance import LLExecutor

    if _executor is None:
        _executor = LLExecutor()
    width = pending[0].bitmask.shape[1]
    if any(s.bitmask.shape[1] != width for s in pending):
        return  # states of different tokenizers: each fills its own mask when asked
    batch = torch.full((len(pending), width), -1, dtype=torch.int32)
    # llguidance.torch.fill_next_token_bitmask_par, without that module's import (see GrammarState.fill_mask)
    _executor.unsafe_compute_mask_ptr([(s.matcher, i) for i, s in enumerate(pending)], batch.data_ptr(), width * 4,
                                      len(pending))
    for index, state in enumerate(pending):
        state.bitmask.copy_(batch[index : index + 1])
        state._mask_filled()
