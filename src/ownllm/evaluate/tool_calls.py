"""Tool calls without constraints: offered tools as the server offers them (`tool_choice: "auto"`), does the model
write a call that parses, names an offered tool and has arguments that validate, and is it the call the reference
makes? This is what fine-tuning for tools changes; the server's grammar makes every call valid by construction, so
the rate is measured here with the grammar off, reading calls the lenient way tool parsers do (vLLM's and
llama.cpp's Hermes parsers: any `<tool_call>` ... `</tool_call>` block holding JSON).

A set is a JSONL file in OpenAI's fine-tuning format for function calling: per line `messages`, `tools` (and
optionally `parallel_tool_calls`); the last assistant turn, when it carries `tool_calls`, is the reference and not
part of the prompt. A line whose reference is a plain reply expects no call.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ownllm.data.formats import normalise
from ownllm.data.jsonl import fail_if_any, read_jsonl
from ownllm.generate.engine import Engine
from ownllm.generate.params import SamplingParams
from ownllm.json_schema import instance_problem
from ownllm.models.tool_template import CALL_CLOSE, CALL_OPEN, render_tool_chat

_BLOCK = re.compile(re.escape(CALL_OPEN) + r"\s*(.*?)\s*" + re.escape(CALL_CLOSE), re.DOTALL)


@dataclass(frozen=True)
class ToolCallItem:
    line: int
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]]
    parallel: bool
    expected: list[dict[str, Any]]  # [{"name", "arguments": {...}}]; empty: a plain reply is expected

    @property
    def question(self) -> str:
        return next((m["content"] for m in reversed(self.messages) if m["role"] == "user"), "")


def is_tool_call_set(path: Path) -> bool:
    """Whether a question-set file is a tool-call set (its first line offers `tools`)."""
    first = next(iter(read_jsonl(path)), None)
    return first is not None and isinstance(first.data, dict) and "tools" in first.data


def read_tool_call_set(path: Path) -> list[ToolCallItem]:
    """The items of a tool-call set; every line is checked as training data is (unknown tools, arguments that are
    not JSON or do not validate), and all problems are raised together."""
    items, problems = [], []
    for record in read_jsonl(path):
        where = f"{path.name} line {record.line}"
        if not isinstance(record.data, dict) or not record.data.get("tools"):
            problems.append(f"{where}: needs 'messages' and 'tools'")
            continue
        example = normalise(record.data, "chat", record.line, path.name, problems)
        if example is None:
            continue
        messages = list(example.messages or [])
        if messages[-1]["role"] != "assistant":
            problems.append(f"{where}: the last turn must be the assistant's reference reply or call")
            continue
        reference = messages.pop()
        expected = [{"name": call["function"]["name"], "arguments": json.loads(call["function"]["arguments"])}
                    for call in reference.get("tool_calls") or []]
        items.append(ToolCallItem(record.line, messages, list(example.tools or []), example.parallel_tool_calls,
                                  expected))
    fail_if_any(problems)
    return items


def read_calls(text: str) -> list[dict[str, Any]] | None:
    """The calls in a reply, or None when it makes none or one is not JSON `{"name", "arguments": {...}}`."""
    blocks = _BLOCK.findall(text)
    if not blocks:
        return None
    calls = []
    for block in blocks:
        try:
            call = json.loads(block)
        except json.JSONDecodeError:
            return None
        if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not isinstance(
                call.get("arguments"), dict):
            return None
        calls.append({"name": call["name"], "arguments": call["arguments"]})
    return calls


def valid_calls(calls: list[dict[str, Any]] | None, tools: list[dict[str, Any]]) -> bool:
    """Every call names an offered tool and its arguments validate against that tool's parameters."""
    if not calls:
        return False
    schemas = {tool["function"]["name"]: tool["function"].get("parameters") or {"type": "object"} for tool in tools}
    return all(call["name"] in schemas and instance_problem(call["arguments"], schemas[call["name"]]) is None
               for call in calls)


@dataclass
class ToolCallResult:
    line: int
    question: str
    reply: str
    call_expected: bool  # the reference makes a call (else it answers in prose)
    valid: bool  # a call was expected and a valid one was made, or none was expected and none was made
    right: bool  # the reference's calls exactly (names and arguments), or prose where the reference is prose


def score_tool_calls(engine: Engine, items: list[ToolCallItem], params: SamplingParams | None = None, *,
                     batch_size: int = 16, progress: Callable[[int], None] | None = None) -> list[ToolCallResult]:
    """Greedy replies (no grammar) to every item, each judged as a call or a plain reply."""
    params = params or SamplingParams(max_new_tokens=96)
    prompts = [engine.render_with_recall(item.messages, max_new_tokens=params.max_new_tokens,
                                         render=functools.partial(render_tool_chat, engine.tokenizer, tools=item.tools,
                                                                  parallel=item.parallel))
               for item in items]
    completions = engine.generate_batch(prompts, params, max_batch=batch_size, progress=progress,
                                        adapters=engine.routes([item.messages for item in items]))
    results = []
    for item, completion in zip(items, completions, strict=True):
        calls = read_calls(completion.text)
        if item.expected:
            valid = valid_calls(calls, item.tools)
            right = valid and sorted(map(_canonical, calls or [])) == sorted(map(_canonical, item.expected))
        else:  # prose expected: any block at all is a wrong call
            valid = right = CALL_OPEN not in completion.text
        results.append(ToolCallResult(item.line, item.question, completion.text, bool(item.expected), valid, right))
    return results


def summarize_tool_calls(results: list[ToolCallResult]) -> dict[str, Any]:
    """Over the items whose reference calls: the share with a valid call and with exactly the reference's call;
    over those whose reference is prose: the share answered without a call."""
    calls = [r for r in results if r.call_expected]
    prose = [r for r in results if not r.call_expected]

    def share(rows: list[ToolCallResult], key: str) -> float:
        return sum(getattr(r, key) for r in rows) / len(rows) if rows else 0.0

    return {"items": len(results), "call_items": len(calls), "valid_call": share(calls, "valid"),
            "right_call": share(calls, "right"), "prose_kept": share(prose, "valid") if prose else None}


def _canonical(call: dict[str, Any]) -> str:
    return json.dumps(call, sort_keys=True, ensure_ascii=False)
