"""Conversations with tools in the model's chat template: the one rendering that serving and fine-tuning share.

A template that knows tools (it reads `tools`: Qwen2.5, Llama 3.x, Hermes-style) gets them its own way, with earlier
calls as `tool_calls` (arguments as objects, Hugging Face's convention) and results as `tool` turns. Any other
template (SmolLM2's) gets what llama.cpp gives such models: the tools described in the system message, and calls
and results written as text in the turns. Calls are Hermes' blocks (Qwen2.5's template asks for the same):

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

with the JSON on one line as `json.dumps` writes it, so that what a model is trained on is exactly what the
server's grammar lets it write (ownllm.generate.tools holds the grammar and reads calls back).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from ownllm.models.chat_template import assistant_token_mask, render_chat

TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names
EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}  # a tool without `parameters` takes none
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
CALL_HEAD = CALL_OPEN + '\n{"name": "'
CALL_ARGUMENTS = '", "arguments": '
CALL_TAIL = "}\n" + CALL_CLOSE


def template_knows_tools(tokenizer: Any) -> bool:
    """Whether the model's chat template renders `tools` itself (Qwen2.5, Llama 3.x, Hermes-style ones do)."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("tool_use") or template.get("default")
    return isinstance(template, str) and "tools" in template


def call_text(name: str, arguments: str) -> str:
    """One call written as the model writes it (the `<tool_call>` block)."""
    return f"{CALL_HEAD}{name}{CALL_ARGUMENTS}{arguments}{CALL_TAIL}"


def arguments_text(arguments: Any) -> str:
    """Arguments (a JSON string or a value) as one line of JSON, the layout the grammar fixes."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return arguments
    return json.dumps(arguments, ensure_ascii=False)


def arguments_value(arguments: Any) -> Any:
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except json.JSONDecodeError:
            return arguments
    return arguments


def tool_instruction(tools: Sequence[Mapping[str, Any]], *, required: bool, parallel: bool,
                     calls_allowed: bool = True) -> str:
    """The system text that describes `tools` (OpenAI's `{"type": "function", "function": {...}}` specs) and the
    call format, for templates that do not know tools."""
    lines = ["You can call these tools. Each is given as JSON: its name, what it does, and the JSON schema of "
             "its arguments."]
    lines += [json.dumps(tool["function"], ensure_ascii=False) for tool in tools]
    if not calls_allowed:
        return "\n".join([*lines, "", "Do not call a tool now: answer in plain text."])
    lines += ["", "To call a tool, reply with exactly this and nothing else:",
              f'{CALL_OPEN}\n{{"name": "<tool name>", "arguments": {{<the arguments as JSON>}}}}\n{CALL_CLOSE}']
    if parallel:
        lines.append("To call several tools at once, write one such block per call, one per line.")
    if required and len(tools) == 1:
        lines.append(f"You must call the tool {tools[0]['function']['name']}.")
    elif required:
        lines.append("You must call a tool.")
    else:
        lines.append("Call a tool only when the request needs one; otherwise answer in plain text as usual.")
    return "\n".join(lines)


def render_tool_messages(messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None,
                         knows_tools: bool, *, required: bool = False, parallel: bool = True,
                         calls_allowed: bool = True) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """The conversation as the chat template should get it, and the `tools=` to pass it (None: pass none).

    `messages` are OpenAI's: assistant turns may carry `tool_calls` (and `content: None`), `tool` turns a
    `tool_call_id`. `tools` are the specs the model is offered now (None: describe none)."""
    if knows_tools:
        rendered = []
        for message in messages:
            item = {key: value for key, value in message.items() if value is not None and key != "weight"}
            item["content"] = message.get("content") or ""
            if message.get("tool_calls"):
                item["tool_calls"] = [{"type": "function", "id": call.get("id"), "function": {
                    "name": call["function"]["name"], "arguments": arguments_value(call["function"]["arguments"])}}
                    for call in message["tool_calls"]]
            rendered.append(item)
        return rendered, [dict(tool) for tool in tools] if tools else None
    names: dict[str, str] = {}
    rendered = []
    for message in messages:
        role, content = message["role"], message.get("content") or ""
        if role == "assistant" and message.get("tool_calls"):
            blocks = []
            for call in message["tool_calls"]:
                names[str(call.get("id"))] = call["function"]["name"]
                blocks.append(call_text(call["function"]["name"], arguments_text(call["function"]["arguments"])))
            content = "\n".join(([content] if content else []) + blocks)
        elif role == "tool":
            # results go back as the user's turn: templates without tools may know no "tool" role
            name = names.get(str(message.get("tool_call_id")))
            about = f' name="{name}"' if name else ""
            role, content = "user", f"<tool_response{about}>\n{content}\n</tool_response>"
        rendered.append({"role": role, "content": content})
    if tools:
        instruction = tool_instruction(tools, required=required, parallel=parallel, calls_allowed=calls_allowed)
        if rendered and rendered[0]["role"] == "system":
            rendered[0] = {"role": "system", "content": f"{rendered[0]['content']}\n\n{instruction}"}
        else:
            rendered.insert(0, {"role": "system", "content": instruction})
    return rendered, None


def render_tool_chat(tokenizer: Any, messages: Sequence[Mapping[str, Any]],
                     tools: Sequence[Mapping[str, Any]] | None, *, required: bool = False, parallel: bool = True,
                     add_generation_prompt: bool = True) -> list[int]:
    """Token ids of a conversation that may hold tool calls and results, with `tools` described."""
    rendered, template_tools = render_tool_messages(messages, tools, template_knows_tools(tokenizer),
                                                    required=required, parallel=parallel)
    return render_chat(tokenizer, rendered, add_generation_prompt=add_generation_prompt,  # type: ignore[arg-type]
                       tools=template_tools)


def uses_tools(messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None) -> bool:
    """Whether a conversation needs the tool rendering: tools offered, or calls among its turns."""
    return bool(tools) or any(message.get("tool_calls") for message in messages)


def tool_token_mask(tokenizer: Any, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None,
                    *, parallel: bool = True) -> tuple[list[int], list[bool]]:
    """Token ids of a conversation with tools, rendered as `render_tool_chat` renders it for serving (tools offered
    with `tool_choice: "auto"`), and which of them are the assistant's: its replies and its calls."""
    rendered, template_tools = render_tool_messages(messages, tools, template_knows_tools(tokenizer),
                                                    parallel=parallel)
    return assistant_token_mask(tokenizer, rendered, tools=template_tools)  # type: ignore[arg-type]
