"""Tool calls on the wire: a chat request's tools into the prompt, and the model's calls out as OpenAI's
`message.tool_calls` (whole) or `delta.tool_calls` (streamed). The format and grammar are ownllm.generate.tools'."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from ownllm.errors import OwnLLMError
from ownllm.generate.engine import Completion, Engine, TextDelta
from ownllm.generate.tools import (
    ArgumentsDelta,
    CallStart,
    ProseDelta,
    ToolCall,
    ToolCallStream,
    ToolPlan,
    render_messages,
    template_knows_tools,
)
from ownllm.models.chat_template import render_chat
from ownllm.serve import formats
from ownllm.serve.errors import APIError


def render_prompt(engine: Engine, messages: list[dict[str, Any]], plan: ToolPlan | None) -> list[int]:
    """Token ids of a conversation that may hold tool calls and results, with the plan's tools described (through
    the model's template when it knows tools, else in the system message)."""
    try:
        rendered, tools = render_messages(messages, plan, template_knows_tools(engine.tokenizer))
        return render_chat(engine.tokenizer, rendered, tools=tools)  # type: ignore[arg-type]
    except OwnLLMError as exc:
        raise APIError(400, str(exc), param=exc.param or "messages") from None


def wire_calls(calls: list[ToolCall]) -> list[dict[str, Any]]:
    return [{"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
            for call in calls]


def apply_to_response(response: dict[str, Any], completions: list[Completion]) -> dict[str, Any]:
    """A chat response whose replies are calls: `content: null`, `tool_calls`, finish_reason "tool_calls". A reply
    cut short by max_tokens keeps finish_reason "length" and only the calls it finished (never a partial one)."""
    for choice, completion in zip(response["choices"], completions, strict=True):
        reader = ToolCallStream()
        reader.feed(completion.text)
        if reader.prose is not False:
            continue
        calls = [call for call in reader.calls if call.complete]
        if not calls:  # cut off inside its first call: the text as it is, finish_reason says why
            continue
        choice["message"]["content"] = None
        choice["message"]["tool_calls"] = wire_calls(calls)
        if completion.finish_reason == "stop" and len(calls) == len(reader.calls):
            choice["finish_reason"] = "tool_calls"
    return response


async def chat_stream(model: str, prompt_tokens: int, n: int, events: AsyncIterator[tuple[int, Any]],
                      include_usage: bool) -> AsyncIterator[dict[str, Any]]:
    """The chunks of a streamed reply that may call tools: prose goes out as content; a call's first delta has its
    index, id, type and whole name, later ones its argument fragments; the last chunk of a choice has its
    finish_reason ("tool_calls" when it called tools and finished)."""
    chunk_id, created = formats.new_id("chatcmpl"), int(time.time())

    def chunk(index: int, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return formats.chat_chunk(chunk_id, model, created, [
            {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}], None, include_usage)

    readers = [ToolCallStream() for _ in range(n)]
    for index in range(n):
        yield chunk(index, {"role": "assistant", "content": ""})
    completions: list[Completion] = []
    async for index, event in events:
        reader = readers[index]
        if isinstance(event, TextDelta):
            pieces = reader.feed(event.text) if event.text else []
        else:
            completions.append(event)
            pieces = reader.finish()
        for piece in pieces:
            if isinstance(piece, ProseDelta):
                yield chunk(index, {"content": piece.text})
            elif isinstance(piece, CallStart):
                yield chunk(index, {"tool_calls": [{"index": piece.index, "id": piece.id, "type": "function",
                                                    "function": {"name": piece.name, "arguments": ""}}]})
            elif isinstance(piece, ArgumentsDelta):
                yield chunk(index, {"tool_calls": [{"index": piece.index, "function": {"arguments": piece.text}}]})
        if isinstance(event, Completion):
            finish = event.finish_reason
            if finish == "stop" and reader.complete_calls is not None:
                finish = "tool_calls"
            yield chunk(index, {}, finish)
    if include_usage:
        yield formats.chat_chunk(chunk_id, model, created, [], formats.usage(prompt_tokens, completions), True)
