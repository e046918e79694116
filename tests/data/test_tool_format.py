"""OpenAI's fine-tuning format for function calling (issue 14): lines with `tools`, assistant turns with `tool_calls`,
`tool` turns. The doctor checks them line by line; training renders them as the server renders a request with tools
and learns the assistant's tokens only, its calls included."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from ownllm.data.doctor import prepare, read_examples
from ownllm.finetune.dataset import IGNORE, encode
from tests.conftest import assert_user_error, run_cli

ROOT = Path(__file__).resolve().parents[2]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def line(calls: list[dict[str, Any]] | None = None, *, tools: Any = (WEATHER,), result: str | None = "18C",
         **extra: Any) -> dict[str, Any]:
    calls = calls if calls is not None else [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]
    messages: list[dict[str, Any]] = [{"role": "user", "content": "Weather in Paris?"},
                                      {"role": "assistant", "content": None, "tool_calls": calls}]
    if result is not None:
        messages += [{"role": "tool", "tool_call_id": "call_1", "content": result},
                     {"role": "assistant", "content": "It is 18C in Paris."}]
    return {"messages": messages, **({"tools": list(tools)} if tools is not None else {}), **extra}


def _tool(parameters: dict[str, Any]) -> dict[str, Any]:
    return {"type": "function", "function": {"name": "get_weather", "parameters": parameters}}


def _deep(levels: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object"}
    node = schema
    for _ in range(levels):
        node["properties"] = {"city": {"type": "object"}}
        node = node["properties"]["city"]
    return schema


def write(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_a_function_calling_line_is_read_with_its_tools(tmp_path: Path) -> None:
    fmt, examples, problems = read_examples(write(tmp_path / "tools.jsonl", [line()]))
    assert fmt == "chat" and not problems
    example = examples[0]
    assert example.tools == [WEATHER] and example.parallel_tool_calls is True
    assert example.messages[1]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert example.messages[2] == {"role": "tool", "content": "18C", "tool_call_id": "call_1"}


@pytest.mark.parametrize(("row", "needle"), [
    (line([{"function": {"name": "get_time", "arguments": "{}"}}]), "unknown tool 'get_time'"),
    (line([{"function": {"name": "get_weather", "arguments": "{city: Paris}"}}]), "arguments is not JSON"),
    (line([{"function": {"name": "get_weather", "arguments": '["Paris"]'}}]), "must be a JSON object"),
    (line([{"function": {"name": "get_weather", "arguments": '{"town": "Paris"}'}}]),
     "do not match the parameters of 'get_weather': 'city' is a required property"),
    (line(tools=None), "the line has no 'tools'"),
    (line(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]),
     "parameters must be a JSON schema of an object"),
    (line(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object",
                                                                             "required": "city"}}}]),
     "not a valid JSON schema"),
    (line(tools=[WEATHER, WEATHER]), "'get_weather' is given twice"),
    ({**line(), "functions": [WEATHER["function"]]}, "'functions' is OpenAI's retired format"),
    (line([{"id": f"call_{i}", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}
           for i in (1, 2)], parallel_tool_calls=False), "'parallel_tool_calls' is false"),
    ({**line(), "messages": [*line()["messages"][:2], {"role": "tool", "tool_call_id": "call_9", "content": "x"}]},
     "tool_call_id 'call_9' answers no earlier call"),
    ({**line(), "messages": [{"role": "user", "content": "Hi"}, {"role": "tool", "content": "18C"},
                             {"role": "assistant", "content": "Hello"}]}, "no earlier assistant turn calls a tool"),
    (line(tools=[_tool({"type": "object", "properties": {"city": {"$ref": "http://example.invalid/x.json"}}})]),
     "does not resolve inside the schema (other documents are not fetched)"),
    (line(tools=[_tool({"type": "object", "properties": {"city": {"$ref": "#/$defs/nope"}}})]), "'#/$defs/nope'"),
    (line(tools=[_tool({"type": "object", "$defs": {"a": {"$ref": "#/$defs/a"}},
                        "properties": {"city": {"$ref": "#/$defs/a"}}})]), "refers to itself without end"),
    (line(tools=[_tool(_deep(400))]), "nested too deeply"),
    (line(tools=[{"type": "function", "function": {"name": "get weather"}}]), "letters, digits, _ or -"),
    (line([{"id": "call_1", "function": {"name": "get_weather", "arguments": '{"city": "Z\\ud800"}'}}]),
     "arguments is not valid UTF-8 text"),
])
def test_bad_function_calling_lines_are_named(tmp_path: Path, row: dict[str, Any], needle: str) -> None:
    _, examples, problems = read_examples(write(tmp_path / "bad.jsonl", [line(), row]))
    assert len(examples) == 1 and len(problems) == 1, problems
    assert problems[0].startswith("bad.jsonl line 2: ") and needle in problems[0], problems[0]


def test_the_cli_check_names_file_line_and_field(tmp_path: Path) -> None:
    bad = write(tmp_path / "calls.jsonl", [line([{"function": {"name": "get_weather", "arguments": "{oops"}}])])
    result = run_cli("data", "check", str(bad))
    assert_user_error(result, "calls.jsonl line 1", "messages[1].tool_calls[0].function.arguments is not JSON")


def test_prepare_keeps_the_tools(tmp_path: Path) -> None:
    cities = ["Paris", "Rome", "Oslo", "Lima", "Cairo", "Tokyo", "Delhi", "Quito", "Dakar", "Perth", "Turin", "Bern"]
    rows = [line([{"id": "call_1", "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}],
                 result=None) | {"messages": [{"role": "user", "content": f"How is the weather in {city}?"},
                                              {"role": "assistant", "content": None, "tool_calls": [
                                                  {"id": "c", "function": {"name": "get_weather",
                                                                           "arguments": json.dumps({"city": city})}}]}]}
            for city in cities]
    out = tmp_path / "prepared"
    prepare(write(tmp_path / "tools.jsonl", rows), out, val_ratio=0.2, seed=0)
    written = [json.loads(text) for name in ("train.jsonl", "validation.jsonl")
               for text in (out / name).read_text().splitlines()]
    assert len(written) == 12 and all(row["tools"] == [WEATHER] for row in written)
    assert all(row["messages"][1]["tool_calls"][0]["function"]["name"] == "get_weather" for row in written)


def test_training_learns_the_calls_and_replies_as_the_server_renders_them(default_model: str, tmp_path: Path
                                                                         ) -> None:
    from ownllm.generate.tools import plan_tools, render_messages, template_knows_tools
    from ownllm.models.chat_template import render_chat
    from ownllm.models.load import load_tokenizer

    tokenizer = load_tokenizer(default_model)
    _, examples, _ = read_examples(write(tmp_path / "tools.jsonl", [line()]))
    row = encode(examples[0], tokenizer, 2048)
    learned = tokenizer.decode([token for token in row["labels"] if token != IGNORE])
    assert learned == ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n'
                       "It is 18C in Paris.<|im_end|>\n")
    # the prompt part is exactly what the server renders for the same conversation with tool_choice "auto"
    messages, template_tools = render_messages(examples[0].messages[:1], plan_tools([WEATHER]),
                                               template_knows_tools(tokenizer))
    served = render_chat(tokenizer, messages, tools=template_tools, add_generation_prompt=True)
    assert row["input_ids"][:len(served)] == served
    assert all(label == IGNORE for label in row["labels"][:len(served)])


def test_the_shipped_tool_data_is_clean_and_reproducible(tmp_path: Path) -> None:
    for name in ("tools-train.jsonl", "tools-heldout.jsonl"):
        _, examples, problems = read_examples(ROOT / "examples" / "data" / name)
        assert examples and not problems
    import subprocess
    import sys

    copy = tmp_path / "data"
    copy.mkdir()
    script = copy / "make_tool_data.py"
    script.write_text((ROOT / "examples" / "data" / "make_tool_data.py").read_text())
    subprocess.run([sys.executable, str(script)], check=True, capture_output=True)
    for name in ("tools-train.jsonl", "tools-heldout.jsonl"):
        assert (copy / name).read_text() == (ROOT / "examples" / "data" / name).read_text()
