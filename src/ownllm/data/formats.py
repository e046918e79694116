"""Training-data formats, detected per file and normalised to chat messages (or preference pairs, or text).

Accepted, one JSON object per line: OpenAI chat (`messages`, with OpenAI's function-calling fields: a `tools` list,
assistant turns with `tool_calls`, `tool` turns with `tool_call_id`), ShareGPT (`conversations` with `from`/`value`),
Alpaca (`instruction`, optional `input`, `output`), prompt/completion, and preference pairs (`prompt`,
`chosen`, `rejected`, or OpenAI's `input`/`preferred_output`/`non_preferred_output`); or a folder / files of
plain text or Markdown for continued pretraining.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Literal

from ownllm.errors import is_valid_text
from ownllm.json_schema import instance_problem, schema_problem
from ownllm.models.tool_template import EMPTY_PARAMETERS, TOOL_NAME

Format = Literal["chat", "sharegpt", "alpaca", "completion", "preference", "text"]
FORMATS: tuple[Format, ...] = ("chat", "sharegpt", "alpaca", "completion", "preference", "text")
ROLES = {"system", "user", "assistant", "tool"}
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system", "tool": "tool", "function": "tool"}


@dataclass(frozen=True)
class Example:
    line: int
    messages: list[dict[str, Any]] | None = None  # chat-shaped formats (OpenAI's message dicts)
    chosen: str | None = None  # preference pairs: the prompt is in `messages`
    rejected: str | None = None
    text: str | None = None  # plain text
    tools: list[dict[str, Any]] | None = None  # function calling: the tools offered in this conversation
    parallel_tool_calls: bool = True

    def content_key(self) -> str:
        """What two examples must share to be duplicates."""
        if self.text is not None:
            return self.text
        parts = [f"{m['role']}:{m.get('content') or ''}" + (f":{json.dumps(m['tool_calls'], sort_keys=True)}"
                                                             if m.get("tool_calls") else "")
                 for m in self.messages or []]
        if self.tools:  # one word for the whole list: the same tools on every line must not make lines near-duplicates
            parts.append("tools:" + hashlib.sha256(json.dumps(self.tools, sort_keys=True).encode()).hexdigest()[:16])
        return "\n".join([*parts, f"chosen:{self.chosen}", f"rejected:{self.rejected}"]
                         if self.chosen is not None else parts)


def detect(record: dict[str, Any]) -> Format | None:
    if "messages" in record:
        return "chat"
    if "conversations" in record:
        return "sharegpt"
    if ("chosen" in record and "rejected" in record) or "preferred_output" in record:
        return "preference"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "prompt" in record and "completion" in record:
        return "completion"
    if "text" in record:
        return "text"
    return None


def _check_messages(messages: Any, where: str, problems: list[str],
                    tools: dict[str, dict[str, Any]] | None = None, *, name: str = "messages",
                    needs_reply: bool = True) -> list[dict[str, Any]] | None:
    """The messages of a line, checked; `tools` (name → parameters schema) are the tools the line offers; `name`:
    the field they came in; `needs_reply`: an assistant turn must be among them (not a preference pair's prompt,
    answered by its `chosen` and `rejected`)."""
    if not isinstance(messages, list) or not messages:
        problems.append(f"{where}: '{name}' must be a non-empty list")
        return None
    clean: list[dict[str, Any]] = []
    call_ids: set[str] = set()
    for index, message in enumerate(messages):
        field = f"{where}: {name}[{index}]"
        if not isinstance(message, dict):
            problems.append(f"{field} must be an object with 'role' and 'content'")
            return None
        unknown = set(message) - {"role", "content", "name", "weight", "tool_calls", "tool_call_id"}
        if unknown:
            problems.append(f"{field} has unknown key(s) {sorted(unknown)}")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            problems.append(f"{field}.role must be one of {sorted(ROLES)}, got {role!r}")
            return None
        if role == "assistant" and message.get("tool_calls") is not None:
            calls = _check_calls(message["tool_calls"], f"{field}.tool_calls", tools, problems)
            if calls is None:
                return None
            if content is not None and not isinstance(content, str):
                problems.append(f"{field}.content must be a string or null")
                return None
            call_ids.update(call["id"] for call in calls if call.get("id"))
            clean.append({"role": role, "content": content or None, "tool_calls": calls})
            continue
        if not isinstance(content, str) or not content.strip():
            problems.append(f"{field}.content is empty or not a string")
            return None
        if not is_valid_text(content):
            problems.append(f"{field}.content is not valid UTF-8 text")
            return None
        if role == "tool":
            call_id = message.get("tool_call_id")
            if tools is not None and not call_ids:
                problems.append(f"{field} is a tool result, but no earlier assistant turn calls a tool")
                return None
            if call_ids and call_id not in call_ids:
                problems.append(f"{field}.tool_call_id {call_id!r} answers no earlier call "
                                f"(calls: {', '.join(sorted(call_ids))})")
                return None
            clean.append({"role": role, "content": content, **({"tool_call_id": call_id} if call_id else {})})
            continue
        clean.append({"role": role, "content": content})
    if needs_reply and not any(m["role"] == "assistant" for m in clean):
        problems.append(f"{where}: no assistant turn (nothing to learn from)")
        return None
    return clean


def _check_tools(value: Any, where: str, problems: list[str]) -> dict[str, dict[str, Any]] | None:
    """A line's `tools` (OpenAI's `[{"type": "function", "function": {name, description, parameters}}]`) as
    name → parameters schema."""
    if not isinstance(value, list) or not value:
        problems.append(f"{where}: 'tools' must be a non-empty list of {{\"type\": \"function\", \"function\": "
                        f"{{...}}}}")
        return None
    tools: dict[str, dict[str, Any]] = {}
    for index, tool in enumerate(value):
        field = f"{where}: tools[{index}]"
        function = tool.get("function") if isinstance(tool, dict) and tool.get("type", "function") == "function" \
            else None
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str) or not name:
            problems.append(f"{field} must be {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}")
            return None
        if not TOOL_NAME.fullmatch(name):  # the server's (and OpenAI's) rule: a model must not learn other names
            problems.append(f"{field}.function.name must be 1 to 64 letters, digits, _ or -, got {name!r}")
            return None
        if name in tools:
            problems.append(f"{field}: the tool {name!r} is given twice")
            return None
        parameters = function.get("parameters")
        if parameters is None:  # as the server reads it: a tool without arguments
            parameters = dict(EMPTY_PARAMETERS)
        if not isinstance(parameters, dict) or parameters.get("type", "object") != "object":
            problems.append(f"{field}.function.parameters must be a JSON schema of an object (\"type\": \"object\")")
            return None
        problem = schema_problem(parameters)
        if problem:
            problems.append(f"{field}.function.parameters: {problem}")
            return None
        tools[name] = parameters
    return tools


def _check_calls(value: Any, field: str, tools: dict[str, dict[str, Any]] | None, problems: list[str]
                 ) -> list[dict[str, Any]] | None:
    if not isinstance(value, list) or not value:
        problems.append(f"{field} must be a non-empty list of calls")
        return None
    calls = []
    for index, call in enumerate(value):
        where = f"{field}[{index}]"
        function = call.get("function") if isinstance(call, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str) or not name:
            problems.append(f"{where} must be {{\"id\", \"type\": \"function\", \"function\": {{\"name\", "
                            f"\"arguments\"}}}}")
            return None
        if tools is None:
            problems.append(f"{where} calls {name!r}, but the line has no 'tools'")
            return None
        if name not in tools:
            problems.append(f"{where} calls the unknown tool {name!r} (the line's tools: {', '.join(tools)})")
            return None
        arguments = function.get("arguments")
        try:
            parsed = json.loads(arguments) if isinstance(arguments, str) else arguments
        except json.JSONDecodeError as exc:
            problems.append(f"{where}.function.arguments is not JSON ({exc.msg} at character {exc.pos})")
            return None
        if not isinstance(parsed, dict):
            problems.append(f"{where}.function.arguments must be a JSON object")
            return None
        mismatch = instance_problem(parsed, tools[name])
        if mismatch:
            problems.append(f"{where}.function.arguments do not match the parameters of {name!r}: {mismatch}")
            return None
        text = json.dumps(parsed, ensure_ascii=False)
        if not is_valid_text(text):
            problems.append(f"{where}.function.arguments is not valid UTF-8 text")
            return None
        call_id = call.get("id")
        calls.append({**({"id": call_id} if isinstance(call_id, str) and call_id else {}), "type": "function",
                      "function": {"name": name, "arguments": text}})
    return calls


def _from_openai_preference(record: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's DPO lines ({"input": {"messages"}, "preferred_output", "non_preferred_output"}) as prompt/chosen/
    rejected; anything malformed comes out missing, so the usual messages name the field."""

    def reply(name: str) -> Any:
        value = record.get(name)
        last = value[-1] if isinstance(value, list) and value else None
        return last.get("content") if isinstance(last, dict) else None

    given = record.get("input")
    return {"prompt": given.get("messages") if isinstance(given, dict) else None,
            "chosen": reply("preferred_output"), "rejected": reply("non_preferred_output")}


def normalise(record: dict[str, Any], fmt: Format, line: int, source: str, problems: list[str]) -> Example | None:
    """One line as an Example, or None with the reasons appended to `problems`."""
    where = f"{source} line {line}"

    def text_field(name: str) -> str | None:
        value = record.get(name)
        if not isinstance(value, str) or not value.strip():
            problems.append(f"{where}: '{name}' is missing, empty or not a string")
            return None
        return value

    if fmt == "chat":
        if "functions" in record:
            problems.append(f"{where}: 'functions' is OpenAI's retired format; give 'tools' "
                            f"([{{\"type\": \"function\", \"function\": {{...}}}}]) and 'tool_calls' instead")
            return None
        tools = _check_tools(record["tools"], where, problems) if record.get("tools") is not None else None
        if record.get("tools") is not None and tools is None:
            return None
        parallel = record.get("parallel_tool_calls", True)
        if not isinstance(parallel, bool):
            problems.append(f"{where}: 'parallel_tool_calls' must be true or false")
            return None
        messages = _check_messages(record.get("messages"), where, problems, tools)
        if not messages:
            return None
        if not parallel and any(len(m.get("tool_calls") or ()) > 1 for m in messages):
            problems.append(f"{where}: several calls in one turn, but 'parallel_tool_calls' is false")
            return None
        return Example(line, messages=messages, tools=record["tools"] if tools else None,
                       parallel_tool_calls=parallel)
    if fmt == "sharegpt":
        turns = record.get("conversations")
        if not isinstance(turns, list):
            problems.append(f"{where}: 'conversations' must be a list")
            return None
        converted = []
        for index, turn in enumerate(turns):
            role = _SHAREGPT_ROLES.get(str(turn.get("from"))) if isinstance(turn, dict) else None
            if role is None:
                problems.append(f"{where}: conversations[{index}].from must be one of {sorted(_SHAREGPT_ROLES)}")
                return None
            converted.append({"role": role, "content": turn.get("value")})
        messages = _check_messages(converted, where, problems)
        return Example(line, messages=messages) if messages else None
    if fmt == "alpaca":
        instruction, output = text_field("instruction"), text_field("output")
        if instruction is None or output is None:
            return None
        extra = record.get("input") or ""
        prompt = f"{instruction}\n\n{extra}" if isinstance(extra, str) and extra.strip() else instruction
        return Example(line, messages=[{"role": "user", "content": prompt}, {"role": "assistant", "content": output}])
    if fmt == "completion":
        prompt, completion = text_field("prompt"), text_field("completion")
        if prompt is None or completion is None:
            return None
        return Example(line, messages=[{"role": "user", "content": prompt},
                                       {"role": "assistant", "content": completion}])
    if fmt == "preference":
        if "preferred_output" in record:
            record = _from_openai_preference(record)
        prompt, chosen, rejected = record.get("prompt"), text_field("chosen"), text_field("rejected")
        if isinstance(prompt, list):  # a conversation, answered by `chosen` or `rejected`: it ends with the user
            checked = _check_messages(prompt, where, problems, name="prompt", needs_reply=False)
            if checked is None:
                return None
            if checked[-1]["role"] != "user":
                problems.append(f"{where}: 'prompt' must end with a user message (the turn the replies answer)")
                return None
            messages = checked
        elif isinstance(prompt, str) and prompt.strip():
            messages = [{"role": "user", "content": prompt}]
        else:
            problems.append(f"{where}: 'prompt' is missing or empty")
            return None
        if chosen is None or rejected is None:
            return None
        if chosen == rejected:
            problems.append(f"{where}: 'chosen' and 'rejected' are the same")
            return None
        return Example(line, messages=messages, chosen=chosen, rejected=rejected)
    value = text_field("text")
    return Example(line, text=value) if value else None
