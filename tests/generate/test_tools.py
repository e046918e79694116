"""Tool calling (issue 14) without a model forward: checking `tools`/`tool_choice`, the prompt for templates with and
without tools, the grammar (with the real tokenizer: calls and prose where allowed, nothing else), and reading calls
back, whole and streamed in any cut."""

from __future__ import annotations

import json
from typing import Any

import pytest

from ownllm.errors import OwnLLMError
from ownllm.generate.constraints import Grammars
from ownllm.generate.tools import (
    ArgumentsDelta,
    CallStart,
    ProseDelta,
    ToolCallStream,
    call_text,
    parse_tool_calls,
    plan_tools,
    render_messages,
    template_knows_tools,
)

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city"]}}}
ADD = {"type": "function", "function": {
    "name": "add", "parameters": {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
                                  "required": ["a", "b"], "additionalProperties": False}}}
PARIS = call_text("get_weather", '{"city": "Paris"}')
SUM = call_text("add", '{"a": 2, "b": 3.5}')


@pytest.fixture(scope="module")
def grammars(default_model: str) -> Grammars:
    from ownllm.models.load import load_tokenizer

    tokenizer = load_tokenizer(default_model)
    return Grammars(tokenizer, len(tokenizer), {tokenizer.eos_token_id})


def accepts(grammars: Grammars, choice: Any, text: str, parallel: bool = True) -> bool:
    plan = plan_tools([WEATHER, ADD], choice, parallel)
    assert plan is not None
    return grammars.matches(plan.constraint(), text)


def test_auto_allows_prose_and_calls(grammars: Grammars) -> None:
    assert accepts(grammars, "auto", "The capital of France is Paris.")
    assert accepts(grammars, "auto", "<b>bold</b> prose may start with a tag")
    assert accepts(grammars, "auto", PARIS)
    assert accepts(grammars, None, SUM)
    assert not accepts(grammars, "auto", "<tool_call>\nnot json\n</tool_call>")
    assert not accepts(grammars, "auto", "  " + PARIS.replace('"Paris"', "3"))  # a call, but arguments invalid


def test_required_and_named_allow_only_calls(grammars: Grammars) -> None:
    assert not accepts(grammars, "required", "The capital of France is Paris.")
    assert accepts(grammars, "required", PARIS)
    named = {"type": "function", "function": {"name": "add"}}
    assert accepts(grammars, named, SUM)
    assert not accepts(grammars, named, PARIS)
    assert not accepts(grammars, "required", call_text("get_weather", '{"city": "Paris", "extra": 1}'))
    assert not accepts(grammars, "required", call_text("nope", "{}"))


def test_parallel_calls_are_blocks_one_per_line(grammars: Grammars) -> None:
    both = PARIS + "\n" + SUM
    assert accepts(grammars, "required", both)
    assert not accepts(grammars, "required", both, parallel=False)
    calls = parse_tool_calls(both)
    assert calls is not None and [c.name for c in calls] == ["get_weather", "add"]
    assert [json.loads(c.arguments) for c in calls] == [{"city": "Paris"}, {"a": 2, "b": 3.5}]
    assert calls[0].id.startswith("call_") and calls[0].id != calls[1].id


@pytest.mark.parametrize("text", ["plain prose", "<tool_call>\n{\"name\": \"add\", \"argu", PARIS[:-3], ""])
def test_prose_and_cut_calls_are_not_calls(text: str) -> None:
    assert parse_tool_calls(text) is None


@pytest.mark.parametrize("size", [1, 2, 3, 7, 1000])
def test_streamed_pieces_rebuild_the_whole_calls(size: int) -> None:
    text = "\n" + PARIS + "\n" + call_text("add", '{"a": 1, "b": "}\\"{"}')
    reader = ToolCallStream()
    events = [e for start in range(0, len(text), size) for e in reader.feed(text[start:start + size])]
    events += reader.finish()
    starts = [e for e in events if isinstance(e, CallStart)]
    assert [(s.index, s.name) for s in starts] == [(0, "get_weather"), (1, "add")]
    assert not any(isinstance(e, ProseDelta) for e in events)
    whole = parse_tool_calls(text)
    assert whole is not None
    for index, call in enumerate(whole):
        fragments = "".join(e.text for e in events if isinstance(e, ArgumentsDelta) and e.index == index)
        assert fragments == call.arguments
    assert reader.complete_calls is not None and len(reader.complete_calls) == 2


def test_streamed_prose_is_held_only_while_it_may_be_a_call() -> None:
    reader = ToolCallStream()
    assert reader.feed(" <tool") == []
    assert reader.feed("bar> is a tag") == [ProseDelta(" <toolbar> is a tag")]
    assert reader.feed(" and more") == [ProseDelta(" and more")]
    held = ToolCallStream()
    assert held.feed("<tool_c") == [] and held.finish() == [ProseDelta("<tool_c")]


def test_bad_tools_name_their_field() -> None:
    cases: list[tuple[Any, Any, str]] = [
        ([WEATHER], {"type": "function", "function": {"name": "add"}}, "tool_choice"),
        (None, "required", "tool_choice"),
        ([WEATHER, WEATHER], None, "tools[1].function.name"),
        ([{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}], None,
         "tools[0].function.parameters"),
        ([{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
            "x": {"$ref": "#/$defs/missing"}}}}}], None, "tools[0].function.parameters"),
        ([{"type": "function", "function": {"name": "bad name"}}], None, "tools[0].function.name"),
        ([WEATHER], "sometimes", "tool_choice"),
    ]
    for tools, choice, param in cases:
        with pytest.raises(OwnLLMError) as error:
            plan_tools(tools, choice)
        assert error.value.param == param, (tools, choice, error.value)
    deep: dict[str, Any] = {"type": "string"}
    for _ in range(300):  # (review: Python's "maximum recursion depth exceeded" was the message)
        deep = {"type": "object", "properties": {"x": deep}}
    with pytest.raises(OwnLLMError, match="nested too deeply") as error:
        plan_tools([{"type": "function", "function": {"name": "f", "parameters": deep}}])
    assert error.value.param == "tools[0].function.parameters"


def test_none_shows_the_tools_but_allows_prose_only(grammars: Grammars) -> None:
    plan = plan_tools([WEATHER], "none")
    assert plan is not None and not plan.calls_allowed
    assert grammars.matches(plan.constraint(), "It is sunny in Paris.")
    assert not grammars.matches(plan.constraint(), PARIS) and not grammars.matches(plan.constraint(), "\n" + PARIS)
    assert not grammars.matches(plan.constraint(), "Let me check.\n" + PARIS)  # nowhere in the reply
    assert not grammars.matches(plan.constraint(), "<tool_response>\n18C\n</tool_response>")
    rendered, _ = render_messages([{"role": "user", "content": "Weather in Paris?"}], plan, knows_tools=False)
    assert "get_weather" in rendered[0]["content"] and rendered[0]["content"].endswith("answer in plain text.")


def test_refs_into_the_parameters_and_schemas_without_properties_still_work(grammars: Grammars) -> None:
    tree = {"type": "function", "function": {"name": "tree", "parameters": {
        "type": "object", "properties": {"v": {"type": "integer"}, "child": {"$ref": "#"}}, "required": ["v"]}}}
    plan = plan_tools([tree], "required")
    assert grammars.matches(plan.constraint(), call_text("tree", '{"v": 1, "child": {"v": 2}}'))
    assert not grammars.matches(plan.constraint(), call_text("tree", '{"v": 1, "child": {"name": "tree"}}'))
    alias = {"type": "function", "function": {"name": "pair", "parameters": {
        "type": "object", "properties": {"a": {"type": "string"}, "b": {"$ref": "#/properties/a"}},
        "required": ["a", "b"]}}}
    assert grammars.matches(plan_tools([alias], "required").constraint(), call_text("pair", '{"a": "x", "b": "y"}'))
    for parameters, arguments in [({"type": "object", "required": ["q"]}, '{"q": 1}'),
                                  ({"type": "object", "anyOf": [{"properties": {"q": {"type": "string"}},
                                                                 "required": ["q"]}]}, '{"q": "x"}'),
                                  ({"$ref": "#/definitions/Q", "definitions": {"Q": {
                                      "type": "object", "properties": {"q": {"type": "string"}},
                                      "required": ["q"]}}}, '{"q": "x"}')]:
        plan = plan_tools([{"type": "function", "function": {"name": "f", "parameters": parameters}}], "required")
        assert grammars.matches(plan.constraint(), call_text("f", arguments)), parameters


def test_no_tools_offers_nothing_and_definitions_still_resolve(grammars: Grammars) -> None:
    assert plan_tools(None, None) is None and plan_tools([], "none") is None
    point = {"type": "function", "function": {"name": "move", "parameters": {
        "type": "object", "$defs": {"point": {"type": "object", "properties": {"x": {"type": "integer"}},
                                              "required": ["x"]}},
        "properties": {"to": {"$ref": "#/$defs/point"}}, "required": ["to"]}}}
    plan = plan_tools([point], "required")
    assert plan is not None and grammars.matches(plan.constraint(), call_text("move", '{"to": {"x": 4}}'))
    assert not grammars.matches(plan.constraint(), call_text("move", '{"to": {"x": "4"}}'))


def test_generic_rendering_writes_tools_calls_and_results_as_text() -> None:
    plan = plan_tools([WEATHER, ADD], "auto")
    history = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"},
    ]
    rendered, tools = render_messages(history, plan, knows_tools=False)
    assert tools is None
    assert rendered[0]["role"] == "system" and rendered[0]["content"].startswith("Be brief.")
    assert '"name": "get_weather"' in rendered[0]["content"] and "<tool_call>" in rendered[0]["content"]
    assert rendered[2] == {"role": "assistant", "content": PARIS}
    assert rendered[3] == {"role": "user",
                           "content": '<tool_response name="get_weather">\n18 C, sunny\n</tool_response>'}
    assert all(set(m) == {"role", "content"} for m in rendered)


def test_templates_that_know_tools_get_them(default_model: str) -> None:
    from transformers import PreTrainedTokenizerFast

    from ownllm.models.chat_template import render_chat_text
    from ownllm.models.load import load_tokenizer

    tokenizer = load_tokenizer(default_model)
    assert not template_knows_tools(tokenizer)  # SmolLM2: the generic format
    hermes = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer)
    hermes.chat_template = (
        "{% if tools %}TOOLS:{% for t in tools %}{{ t.function.name }};{% endfor %}\n{% endif %}"
        "{% for m in messages %}{{ m.role }}: {{ m.content }}{% for c in m.tool_calls or [] %}"
        "CALL {{ c.function.name }} {{ c.function.arguments.city }}{% endfor %}\n{% endfor %}")
    assert template_knows_tools(hermes)
    plan = plan_tools([WEATHER, ADD], "auto")
    history = [{"role": "user", "content": "Weather?"},
               {"role": "assistant", "content": "", "tool_calls": [
                   {"id": "c", "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'}}]},
               {"role": "tool", "tool_call_id": "c", "content": "rain"}]
    rendered, tools = render_messages(history, plan, knows_tools=True)
    text = render_chat_text(hermes, rendered, tools=tools)
    # (HF renders templates with trim_blocks: the newlines after the tags go)
    assert text.startswith("TOOLS:get_weather;add;") and "CALL get_weather Rome" in text and "tool: rain" in text
