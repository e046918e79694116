"""Constrained decoding (issue 14). First the grammars alone, with the real tokenizer and no model forward: for each
of 30+ JSON schemas the compiled grammar accepts valid instances and refuses invalid ones (jsonschema says which is
which), regexes, Lark, GBNF and choices likewise, bad constraints fail naming their param. Then generation with the
real model: greedy and sampled, n > 1, single-stream and through the batch scheduler (rows with different schemas
and one without, in one batch), each output valid for its own request; a constraint that cannot finish in the token
budget ends with "length"."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ownllm.errors import OwnLLMError
from ownllm.generate.constraints import Constraint, Grammars
from ownllm.generate.params import SamplingParams
from ownllm.generate.sampling import pick_token
from tests.generate.json_schemas import PERSON, SCHEMAS

PROPERTY = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))
# Characters a model may write inside a JSON string (unassigned and private-use code points and DEL aside, which
# llguidance's JSON strings do not take raw); json.dumps escapes the control characters.
TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cn", "Co"), exclude_characters="\x7f"),
               max_size=12)


def validator(schema: dict[str, Any]) -> jsonschema.Validator:
    return jsonschema.Draft202012Validator(schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)


def as_text(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)  # the layout the grammar writes: one line, ", " and ": "


@pytest.fixture(scope="module")
def grammars(default_model: str) -> Grammars:
    from ownllm.models.load import load_tokenizer

    tokenizer = load_tokenizer(default_model)
    return Grammars(tokenizer, len(tokenizer), {tokenizer.eos_token_id})


# --- the grammars alone -------------------------------------------------------------------------------------------
def test_the_schema_set_is_large_and_its_instances_are_what_they_claim() -> None:
    assert len(SCHEMAS) >= 30
    for name, _, schema, valid, invalid in SCHEMAS:
        check = validator(schema)
        assert all(check.is_valid(v) for v in valid), name
        assert not any(check.is_valid(v) for v in invalid), name


@pytest.mark.parametrize(("schema", "valid", "invalid"), [(s, v, i) for _, _, s, v, i in SCHEMAS],
                         ids=[name for name, *_ in SCHEMAS])
def test_schema_grammar_accepts_valid_and_refuses_invalid(grammars: Grammars, schema: dict, valid: list,
                                                          invalid: list) -> None:
    constraint = Constraint.json_schema(schema)
    for instance in valid:
        assert grammars.matches(constraint, as_text(instance)), as_text(instance)
    for instance in invalid:
        assert not grammars.matches(constraint, as_text(instance)), as_text(instance)


def test_schema_grammar_writes_one_line_in_the_schema_order(grammars: Grammars) -> None:
    person = Constraint.json_schema(PERSON)
    assert grammars.matches(person, '{"name": "Ann", "age": 3}')
    assert not grammars.matches(person, '{"age": 3, "name": "Ann"}')  # valid JSON, but not the order written
    assert not grammars.matches(person, '{\n  "name": "Ann",\n  "age": 3\n}')  # no room for a whitespace loop
    assert not grammars.matches(person, '{"name": "Ann", "age": 3')  # unfinished: not accepted


@PROPERTY
@given(name=TEXT, age=st.integers(-10**12, 10**12))
def test_property_any_name_and_age_is_a_person(grammars: Grammars, name: str, age: int) -> None:
    assert grammars.matches(Constraint.json_schema(PERSON), as_text({"name": name, "age": age}))


@PROPERTY
@given(rating=st.integers(-1000, 1000), celsius=st.floats(-100, 100, allow_nan=False))
def test_property_numbers_are_held_to_their_ranges(grammars: Grammars, rating: int, celsius: float) -> None:
    """Every value in range is accepted and none outside. A bounded number is written without an exponent (the
    grammar's form: 1e-05 is 0.00001 there); an unbounded one may have one."""
    rating_schema = next(s for name, _, s, *_ in SCHEMAS if name == "integer range")
    celsius_schema = next(s for name, _, s, *_ in SCHEMAS if name == "number range")
    rating_ok = grammars.matches(Constraint.json_schema(rating_schema), as_text({"rating": rating}))
    assert rating_ok == validator(rating_schema).is_valid({"rating": rating})
    positional = '{"celsius": ' + np.format_float_positional(celsius, trim="-") + "}"
    celsius_ok = grammars.matches(Constraint.json_schema(celsius_schema), positional)
    assert celsius_ok == validator(celsius_schema).is_valid({"celsius": celsius}), positional
    assert grammars.matches(Constraint.json_schema({"type": "number"}), json.dumps(celsius))


@PROPERTY
@given(username=TEXT)
def test_property_string_lengths_count_characters(grammars: Grammars, username: str) -> None:
    schema = next(s for name, _, s, *_ in SCHEMAS if name == "string lengths")
    value = {"username": username}
    assert grammars.matches(Constraint.json_schema(schema), as_text(value)) == validator(schema).is_valid(value)


def test_regex_lark_gbnf_and_choice(grammars: Grammars) -> None:
    phone = Constraint.regex(r"[0-9]{3}-[0-9]{4}")
    assert grammars.matches(phone, "555-1234")
    assert not grammars.matches(phone, "555-12345") and not grammars.matches(phone, "5551234")
    lark = Constraint.lark('start: "Answer: " value\nvalue: %json {"type": "integer", "minimum": 0}')
    assert grammars.matches(lark, "Answer: 42") and not grammars.matches(lark, "Answer: -1")
    gbnf = Constraint.gbnf('root ::= "yes" | "no" | "maybe " [0-9]')
    assert grammars.matches(gbnf, "maybe 7") and not grammars.matches(gbnf, "perhaps")
    assert Constraint.grammar('root ::= "x"').kind == "gbnf" and Constraint.grammar('start: "x"').kind == "lark"
    choice = Constraint.choice(["yes", "no", 'say "hi"', "ü"])
    assert all(grammars.matches(choice, option) for option in ["yes", "no", 'say "hi"', "ü"])
    assert not grammars.matches(choice, "yesno") and not grammars.matches(choice, "Yes")


@pytest.mark.parametrize(("build", "param", "words"), [
    (lambda: Constraint.json_schema({"$ref": "#/$defs/Nope"}), "schema", "/$defs/Nope"),
    (lambda: Constraint.json_schema({"type": "strang"}), "schema", "strang"),
    (lambda: Constraint.json_schema({"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}},
                                     "properties": {"x": {"$ref": "#/$defs/a"}}}), "schema", "without end"),
    (lambda: Constraint.json_schema({"type": "array", "uniqueItems": True}), "schema", "uniqueItems"),
    (lambda: Constraint.json_schema({"type": "string", "pattern": "(("}), "schema", "unclosed group"),
    (lambda: Constraint.regex("[0-9"), "regex", "regular expression"),
    (lambda: Constraint.lark("start: undefined_rule"), "grammar", "undefined_rule"),
    (lambda: Constraint.gbnf("root ::= ("), "grammar", "GBNF"),
])
def test_constraints_that_do_not_compile_name_their_param(grammars: Grammars, build: Any, param: str,
                                                         words: str) -> None:
    constraint = build()
    for compile_it in (constraint.check, lambda: grammars.compile(constraint)):  # without and with the tokenizer
        with pytest.raises(OwnLLMError) as caught:
            compile_it()
        assert caught.value.param == param and words in str(caught.value), str(caught.value)
    named = constraint.named("response_format.json_schema.schema")
    with pytest.raises(OwnLLMError) as caught:
        grammars.compile(named)
    assert caught.value.param == "response_format.json_schema.schema"
    assert str(caught.value).startswith("response_format.json_schema.schema: ")


@pytest.mark.parametrize(("build", "param"), [
    (lambda: Constraint.choice([]), "choice"),
    (lambda: Constraint.choice(["a", "a"]), "choice"),
    (lambda: Constraint.choice(["a", ""]), "choice"),
    (lambda: Constraint.choice("abc"), "choice"),
    (lambda: Constraint.json_schema([1, 2]), "schema"),
    (lambda: Constraint.json_schema("{not json"), "schema"),
    (lambda: Constraint.json_schema({"maximum": float("nan")}), "schema"),
    (lambda: Constraint.regex(""), "regex"),
    (lambda: Constraint.lark(3), "grammar"),
    (lambda: SamplingParams(constraint="start: x"), "constraint"),
    (lambda: SamplingParams(strategy="beam", constraint=Constraint.regex("a")), "strategy"),
])
def test_malformed_constraints_are_refused_when_built(build: Any, param: str) -> None:
    with pytest.raises(OwnLLMError) as caught:
        build()
    assert caught.value.param == param


def test_constraints_are_hashable_and_compiled_once(grammars: Grammars) -> None:
    a = Constraint.json_schema({"type": "object", "properties": {"x": {"type": "integer"}}})
    b = Constraint.json_schema({"type": "object", "properties": {"x": {"type": "integer"}}}).named("response_format")
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1  # where it came from is no part of what it is
    assert grammars.compile(a) is grammars.compile(b)
    assert a.schema == {"type": "object", "properties": {"x": {"type": "integer"}}}
    assert Constraint.choice(["x", "y"]).choices == ["x", "y"]


def test_pydantic_models_become_closed_schemas() -> None:
    """As OpenAI's strict schemas: no undeclared keys (a small model would invent them), unless the model allows
    extra fields; a field that happens to be called "properties" stays a field."""
    from pydantic import BaseModel, ConfigDict

    from ownllm.api import _constraint

    class Inner(BaseModel):
        properties: int

    class Outer(BaseModel):
        inner: Inner
        many: list[Inner]

    class Open(BaseModel):
        model_config = ConfigDict(extra="allow")
        x: int

    schema = _constraint(Outer, None, None, None)[0].schema
    assert schema["additionalProperties"] is False and schema["$defs"]["Inner"]["additionalProperties"] is False
    assert set(schema["$defs"]["Inner"]["properties"]) == {"properties"}
    assert _constraint(Open, None, None, None)[0].schema["additionalProperties"] is True


def test_padded_vocabulary_columns_are_never_allowed(default_model: str) -> None:
    """Embedding tables are often wider than the tokenizer: the extra columns get -inf, whatever their logits."""
    from ownllm.models.load import load_tokenizer

    tokenizer = load_tokenizer(default_model)
    width = len(tokenizer) + 64
    padded = Grammars(tokenizer, width, {tokenizer.eos_token_id})
    state = padded.start(Constraint.choice(["yes", "no"]))
    allowed = state.allowed(width)
    assert allowed.shape == (width,) and not allowed[len(tokenizer):].any() and allowed.any()
    logits = torch.zeros(width)
    logits[len(tokenizer):] = 1e4  # the padding is what an unmasked argmax would pick
    for params in (SamplingParams(), SamplingParams(strategy="sample", seed=1, top_k=5, top_p=0.9)):
        token, _ = pick_token(logits, params, torch.tensor([], dtype=torch.long), torch.Generator().manual_seed(0),
                              allowed=allowed)
        assert allowed[token]


def test_explain_shows_the_masked_distribution(engine: Any) -> None:
    params = SamplingParams(max_new_tokens=4, explain=12, constraint=Constraint.choice(["yes", "no"]))
    completion = engine.chat([{"role": "user", "content": "Is the sky blue?"}], params)
    assert completion.text in ("yes", "no") and completion.finish_reason == "stop"
    first = completion.explanations[0]
    masked = [row for row in first.rows if row.logit == float("-inf")]
    assert masked, "12 candidates for a choice of two words: most are masked"
    assert all(row.prob == row.prob_temperature == row.prob_top_p == 0 for row in masked)
    assert sum(row.prob for row in first.rows) == pytest.approx(1, abs=1e-4)  # the allowed tokens hold all the mass


# --- generation with the real model -------------------------------------------------------------------------------
def chat_ids(engine: Any, prompt: str) -> list[int]:
    return engine.render_chat([{"role": "system", "content": "Reply with JSON only."},
                               {"role": "user", "content": prompt}])


def bounded(name: str) -> tuple[str, dict[str, Any]]:
    """The prompt and schema of SCHEMAS' entry `name`."""
    return next((p, s) for n, p, s, *_ in SCHEMAS if n == name)


# schemas whose every instance fits in a few tokens (enums, small ranges, fixed patterns): always done in budget
BOUNDED = ["boolean flag", "enum color", "enum mixed", "null only", "string pattern", "integer range", "multiple of",
           "string lengths"]


def assert_valid(schema: dict[str, Any], text: str) -> None:
    validator(schema).validate(json.loads(text))


def test_greedy_schema_through_the_api_parses(engine: Any) -> None:
    from pydantic import BaseModel

    from ownllm.api import LLM

    class Person(BaseModel):
        name: str
        age: int

    model = LLM(engine)
    reply = model.chat([{"role": "user", "content": "Describe a person with a name and an age, as JSON."}],
                       schema=Person, max_new_tokens=48)
    assert reply.finish_reason == "stop", reply.text
    assert isinstance(reply.parsed, Person) and Person.model_validate_json(reply.text) == reply.parsed
    as_dict = model.chat([{"role": "user", "content": "Describe a person, as JSON."}], schema=PERSON,
                         max_new_tokens=48)
    assert as_dict.finish_reason == "stop" and as_dict.parsed == json.loads(as_dict.text)
    assert_valid(PERSON, as_dict.text)
    with pytest.raises(OwnLLMError) as caught:
        model.generate("Hi", schema=PERSON, regex="[0-9]+")
    assert caught.value.param == "schema"


def test_sampled_schema_is_valid_and_reproducible(engine: Any) -> None:
    prompt, schema = bounded("enum mixed")
    params = SamplingParams(strategy="sample", temperature=1.0, top_p=0.95, seed=7, max_new_tokens=32,
                            constraint=Constraint.json_schema(schema))
    first = engine.generate(chat_ids(engine, prompt), params)
    assert first.finish_reason == "stop", first.text
    assert_valid(schema, first.text)
    assert engine.generate(chat_ids(engine, prompt), params).text == first.text


def test_n_sequences_each_follow_their_own_grammar(engine: Any) -> None:
    """generate_batch of one prompt three times, sampled: three grammar states, through the batch scheduler."""
    prompt, schema = bounded("string lengths")
    params = SamplingParams(strategy="sample", seed=11, max_new_tokens=32, constraint=Constraint.json_schema(schema))
    replies = engine.generate_batch([chat_ids(engine, prompt)] * 3, params)
    for reply in replies:
        assert reply.finish_reason == "stop", reply.text
        assert_valid(schema, reply.text)


def test_batch_rows_with_different_schemas_and_one_without(engine: Any) -> None:
    """Eight rows, each with its own schema, and a ninth with none, decoded together by the scheduler the server
    runs: every constrained row is valid for its own schema, the free row is free (and not JSON-bound)."""
    from ownllm.generate.batching import BatchScheduler, Request
    from ownllm.generate.engine import Completion

    rows = [bounded(name) for name in BOUNDED] + [("Write one sentence about the sea.", None)]
    results: dict[int, Any] = {}
    scheduler = BatchScheduler(engine, max_batch=len(rows), max_queue=len(rows), max_len=256)

    def sink(index: int) -> Any:
        def keep(event: Any) -> None:
            if isinstance(event, Completion | BaseException):
                results[index] = event
        return keep

    requests = []
    for index, (prompt, schema) in enumerate(rows):
        constraint = Constraint.json_schema(schema) if schema is not None else None
        params = SamplingParams(max_new_tokens=40 if schema is not None else 12, constraint=constraint)
        ids = chat_ids(engine, prompt) if schema is not None else engine.render_chat(
            [{"role": "user", "content": prompt}])
        requests.append(Request(ids, params, 0, sink(index)))
    scheduler.submit_all(requests)
    scheduler.run_until_done()
    assert len(results) == len(rows)
    for index, (_, schema) in enumerate(rows):
        reply = results[index]
        assert not isinstance(reply, BaseException), reply
        if schema is None:
            assert reply.completion_tokens > 0
            continue
        assert reply.finish_reason == "stop", (BOUNDED[index], reply.text)
        assert_valid(schema, reply.text)


def test_regex_choice_lark_and_gbnf_generation(engine: Any) -> None:
    def reply(prompt: str, constraint: Constraint, **options: Any) -> Any:
        return engine.chat([{"role": "user", "content": prompt}],
                           SamplingParams(max_new_tokens=24, constraint=constraint, **options))

    phone = reply("Make up a phone number.", Constraint.regex(r"[0-9]{3}-[0-9]{4}"))
    assert phone.finish_reason == "stop" and len(phone.text) == 8 and phone.text[3] == "-", phone.text
    picked = reply("Is the sky blue?", Constraint.choice(["yes", "no"]), strategy="sample", seed=3)
    assert picked.finish_reason == "stop" and picked.text in ("yes", "no")
    lark = reply("How old is the universe in billions of years?",
                 Constraint.lark('start: "About " n " billion years."\nn: %json {"type": "integer", "minimum": 1, '
                                 '"maximum": 99}'))
    assert lark.finish_reason == "stop" and lark.text.startswith("About ") and lark.text.endswith(" billion years.")
    gbnf = reply("Say a color.", Constraint.gbnf('root ::= "red" | "green" | "blue"'))
    assert gbnf.finish_reason == "stop" and gbnf.text in ("red", "green", "blue")


def test_a_constraint_that_cannot_finish_ends_with_length(engine: Any) -> None:
    from ownllm.api import LLM

    many = {"type": "array", "items": {"type": "string"}, "minItems": 50}
    reply = LLM(engine).chat([{"role": "user", "content": "List fifty words."}], schema=many, max_new_tokens=8)
    assert reply.finish_reason == "length" and reply.completion_tokens == 8
    assert reply.parsed is None
    with pytest.raises(json.JSONDecodeError):
        json.loads(reply.text)  # a prefix, and said to be one


def test_bad_constraints_fail_in_the_request_check_before_generation(engine: Any) -> None:
    ids = chat_ids(engine, "Hi")
    bad = Constraint.json_schema({"type": "object", "properties": {"a": {"$ref": "#/$defs/Missing"}}})
    with pytest.raises(OwnLLMError) as caught:
        engine.check_request(ids, SamplingParams(constraint=bad.named("response_format")))
    assert caught.value.param == "response_format" and "/$defs/Missing" in str(caught.value)
    with pytest.raises(OwnLLMError):
        next(iter(engine.stream(ids, SamplingParams(constraint=bad))))  # nothing streamed first


@pytest.mark.skipif(not __import__("ownllm.generate.llamacpp", fromlist=["x"]).llama_cpp_available(),
                    reason="llama-cpp-python (extra `llama`) is not installed")
def test_llama_cpp_backend_follows_constraints(default_model: str) -> None:
    from ownllm.generate.open import open_engine

    llama = open_engine(default_model, backend="llama.cpp")
    prompt, schema = bounded("integer range")
    params = SamplingParams(max_new_tokens=24, constraint=Constraint.json_schema(schema))
    single = llama.generate(chat_ids(llama, prompt), params)
    assert single.finish_reason == "stop"
    assert_valid(schema, single.text)
    for reply in llama.generate_batch([chat_ids(llama, prompt)] * 2, params):
        assert reply.finish_reason == "stop"
        assert_valid(schema, reply.text)
