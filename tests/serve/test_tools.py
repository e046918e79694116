"""Tool calling on the server (issue 14), through the official `openai` client against the real server: `required`
and a named tool always yield calls whose arguments validate, streamed and not (the streamed fragments rebuild the
same arguments); `auto` still answers an unrelated question in prose; parallel calls; a conversation that sends the
calls and their results back; bad tools are a 400 naming the field, before anything is generated."""

from __future__ import annotations

import json
from typing import Any

import httpx
import jsonschema
import pytest

pytestmark = pytest.mark.slow
MODEL = "smollm2-135m-instruct"
WEATHER_PARAMETERS = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                       "unit": {"enum": ["celsius", "fahrenheit"]}},
                      "required": ["city", "unit"]}
ADD_PARAMETERS = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                  "required": ["a", "b"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The current weather in a city",
                                           "parameters": WEATHER_PARAMETERS}},
         {"type": "function", "function": {"name": "add", "description": "Add two integers",
                                           "parameters": ADD_PARAMETERS, "strict": True}}]
PARAMETERS = {"get_weather": WEATHER_PARAMETERS, "add": ADD_PARAMETERS}


def ask(prompt: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": prompt}]


def assert_valid_calls(message: Any) -> list[Any]:
    assert message.content is None and message.tool_calls, message
    for call in message.tool_calls:
        assert call.id.startswith("call_") and call.type == "function"
        jsonschema.validate(json.loads(call.function.arguments), PARAMETERS[call.function.name])
    return message.tool_calls


def streamed_calls(chunks: list[Any]) -> tuple[dict[int, dict[str, Any]], list[str]]:
    """Each call's id, name and joined argument fragments, and the finish reasons seen; checks the first delta of
    each call has index, id, type and the whole name, and later ones only arguments."""
    calls: dict[int, dict[str, Any]] = {}
    finishes = []
    for chunk in chunks:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        if choice.finish_reason:
            finishes.append(choice.finish_reason)
        for delta in choice.delta.tool_calls or []:
            if delta.index not in calls:
                assert delta.id and delta.id.startswith("call_") and delta.type == "function", delta
                calls[delta.index] = {"id": delta.id, "name": delta.function.name, "arguments": ""}
            else:
                assert delta.id is None and not delta.function.name, delta
            calls[delta.index]["arguments"] += delta.function.arguments or ""
    return calls, finishes


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "add"}}])
def test_forced_calls_validate_streamed_and_not(server, choice: Any) -> None:
    client = server.client()
    options = {"model": MODEL, "messages": ask("What is 2 plus 3? And the weather in Paris?"), "tools": TOOLS,
               "tool_choice": choice, "parallel_tool_calls": False, "max_tokens": 48, "temperature": 0}
    reply = client.chat.completions.create(**options)
    assert reply.choices[0].finish_reason == "tool_calls", reply
    (call,) = assert_valid_calls(reply.choices[0].message)
    if isinstance(choice, dict):
        assert call.function.name == "add"
    chunks = list(client.chat.completions.create(**options, stream=True))
    calls, finishes = streamed_calls(chunks)
    assert finishes == ["tool_calls"]
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [(call.function.name, call.function.arguments)]
    assert not any(c.choices and c.choices[0].delta.content for c in chunks)


def test_a_named_choice_makes_one_call_even_where_parallel_calls_are_allowed(server) -> None:
    """(regression: the default model went on writing more calls of the named tool until max_tokens cut the reply,
    which then said "length" with 64 tokens spent on a 35-token call)"""
    reply = server.client().chat.completions.create(
        model=MODEL, messages=ask("What is the weather like in Paris, in celsius?"), tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, max_tokens=64, temperature=0)
    choice = reply.choices[0]
    (call,) = assert_valid_calls(choice.message)
    assert call.function.name == "get_weather" and choice.finish_reason == "tool_calls"
    assert reply.usage.completion_tokens < 64


def test_auto_answers_an_unrelated_question_in_prose(server) -> None:
    client = server.client()
    options = {"model": MODEL, "messages": ask("What is the capital of France?"), "tools": TOOLS,
               "max_tokens": 24, "temperature": 0}
    reply = client.chat.completions.create(**options)
    message = reply.choices[0].message
    assert message.tool_calls is None and message.content and "<tool_call>" not in message.content, message
    assert reply.choices[0].finish_reason in ("stop", "length")
    chunks = list(client.chat.completions.create(**options, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == message.content
    assert streamed_calls(chunks)[0] == {}


def test_parallel_calls_each_validate(server) -> None:
    reply = server.client().chat.completions.create(
        model=MODEL, messages=ask("Weather in Paris and in Rome?"), tools=TOOLS, tool_choice="required",
        max_tokens=96, temperature=0)
    choice = reply.choices[0]
    calls = assert_valid_calls(choice.message)
    # a reply cut short by max_tokens keeps only its finished calls, and says "length"
    assert choice.finish_reason == "tool_calls" or (choice.finish_reason == "length" and len(calls) >= 1)
    assert len({c.id for c in calls}) == len(calls)


def test_a_conversation_sends_calls_and_results_back(server) -> None:
    messages = [
        *ask("What is the weather in Paris?"),
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_abc", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_abc", "content": "18 degrees and sunny"},
    ]
    reply = server.client().chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, max_tokens=24,
                                                    temperature=0)
    message = reply.choices[0].message
    assert message.tool_calls is None and message.content, message
    tokens = httpx.post(f"{server.url}/tokenize", json={"messages": messages}, timeout=30)
    assert tokens.status_code == 200, tokens.text
    # tool_choice "none": the tools stay in view, the reply is prose (not a call written out as text)
    for stream in (False, True):
        forbidden = server.client().chat.completions.create(model=MODEL, messages=messages, tools=TOOLS,
                                                            tool_choice="none", max_tokens=24, temperature=0,
                                                            stream=stream)
        if stream:
            chunks = list(forbidden)
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            assert not any(c.choices and c.choices[0].delta.tool_calls for c in chunks)
        else:
            assert forbidden.choices[0].message.tool_calls is None
            text = forbidden.choices[0].message.content or ""
        assert text.strip() and not text.lstrip().startswith("<tool_call>"), text


@pytest.mark.parametrize(("body", "param", "words"), [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "nope"),
    ({"tool_choice": "required"}, "tool_choice", "tools"),
    ({"tools": []}, "tools", "at least 1"),
    ({"tools": [TOOLS[0], TOOLS[0]]}, "tools[1].function.name", "twice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]},
     "tools[0].function.parameters", "object"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"$ref": "#/$defs/Nope"}}}}}]},
     "tools[0].function.parameters", "Nope"),
    ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools[0].function.name", "pattern"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "$defs": {"a": {"$ref": "#/$defs/a"}}, "properties": {"x": {"$ref": "#/$defs/a"}},
        "required": ["x"]}}}], "tool_choice": "required"}, "tools[0].function.parameters", "without end"),
    # (review: a pattern too large for llguidance's lexer failed at the first token, streamed after a 200)
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "string", "pattern": "^(a{1000}){1000}$"}},
        "required": ["a"]}}}], "tool_choice": "required"}, "tools[0].function.parameters", "too large"),
    ({"tools": TOOLS, "tool_choice": "maybe"}, "tool_choice", ""),
    ({"messages": [{"role": "user", "content": None}]}, "messages[0]", "content is required"),
    ({"messages": [*ask("Hi"), {"role": "tool", "content": "18C"}]}, "messages[1]", "tool_call_id"),
    ({"messages": [*ask("Hi"), {"role": "tool", "tool_call_id": "zzz", "content": "18C"}]}, "messages",
     "answers no tool call"),
    ({"messages": [{"role": "user", "content": "Hi", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "add", "arguments": "{}"}}]}]}, "messages[0]",
     "only assistant"),
])
def test_bad_tools_are_400_before_generation(server, body: dict[str, Any], param: str, words: str) -> None:
    base = {"model": MODEL, "messages": ask("Hi"), "max_tokens": 8, "stream": True}
    response = httpx.post(f"{server.url}/v1/chat/completions", json={**base, **body}, timeout=60)
    assert response.status_code == 400, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error", error
    assert words in error["message"], error
