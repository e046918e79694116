"""Scoring tool calls without a grammar (issue 14): reading calls the lenient way tool parsers do, judging them
against the offered tools, and reading a tool-call set with every line checked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ownllm.errors import OwnLLMError
from ownllm.evaluate.tool_calls import (
    ToolCallResult,
    is_tool_call_set,
    read_calls,
    read_tool_call_set,
    summarize_tool_calls,
    valid_calls,
)

ROOT = Path(__file__).resolve().parents[2]
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"]}}}


def test_calls_are_read_leniently_but_must_be_json() -> None:
    assert read_calls('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>') == [
        {"name": "get_weather", "arguments": {"city": "Oslo"}}]
    assert read_calls('Sure! <tool_call>{"name":"a","arguments":{}}</tool_call>\n<tool_call> {"name": "b", '
                      '"arguments": {"x": 1}} </tool_call>') == [{"name": "a", "arguments": {}},
                                                                   {"name": "b", "arguments": {"x": 1}}]
    assert read_calls("The weather in Oslo is sunny.") is None
    assert read_calls('<tool_call>{"name": "get_weather", "arguments": {"city": </tool_call>') is None
    assert read_calls('<tool_call>{"name": "get_weather", "arguments": "Oslo"}</tool_call>') is None
    assert read_calls('<tool_call>{"name": "get_weather", "arguments": {}}') is None  # never closed


def test_a_valid_call_names_an_offered_tool_with_arguments_that_validate() -> None:
    assert valid_calls([{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}], [WEATHER])
    assert not valid_calls([{"name": "get_weather", "arguments": {"city": "Oslo"}}], [WEATHER])
    assert not valid_calls([{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "kelvin"}}], [WEATHER])
    assert not valid_calls([{"name": "get_time", "arguments": {}}], [WEATHER])
    assert not valid_calls(None, [WEATHER]) and not valid_calls([], [WEATHER])


def test_the_summary_keeps_calls_and_prose_apart() -> None:
    rows = [ToolCallResult(1, "q", "", True, True, True), ToolCallResult(2, "q", "", True, True, False),
            ToolCallResult(3, "q", "", True, False, False), ToolCallResult(4, "q", "", False, True, True)]
    summary = summarize_tool_calls(rows)
    assert summary == {"items": 4, "call_items": 3, "valid_call": 2 / 3, "right_call": 1 / 3, "prose_kept": 1.0}


def test_the_shipped_held_out_set_reads_with_its_references() -> None:
    path = ROOT / "examples" / "data" / "tools-heldout.jsonl"
    items = read_tool_call_set(path)
    assert is_tool_call_set(path) and not is_tool_call_set(ROOT / "examples" / "data" / "facts-heldout.jsonl")
    calls = [item for item in items if item.expected]
    assert len(calls) == 20 and len(items) - len(calls) == 4
    assert all(item.messages[-1]["role"] == "user" for item in items)  # the reference is not in the prompt
    assert all(set(item.expected[0]["arguments"]) == {"city", "unit"} for item in calls)


def test_a_bad_set_names_every_bad_line(tmp_path: Path) -> None:
    good = {"messages": [{"role": "user", "content": "Weather in Oslo?"}, {"role": "assistant", "content": None,
            "tool_calls": [{"id": "c1", "type": "function", "function": {
                "name": "get_weather", "arguments": json.dumps({"city": "Oslo", "unit": "celsius"})}}]}],
            "tools": [WEATHER]}
    bad_call = json.loads(json.dumps(good))
    bad_call["messages"][1]["tool_calls"][0]["function"]["name"] = "get_time"
    ends_with_user = {**good, "messages": good["messages"][:1]}
    path = tmp_path / "set.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in (good, bad_call, ends_with_user)))
    with pytest.raises(OwnLLMError) as caught:
        read_tool_call_set(path)
    assert "set.jsonl line 2" in str(caught.value) and "unknown tool 'get_time'" in str(caught.value)
