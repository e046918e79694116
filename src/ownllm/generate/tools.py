"""Tool calling in OpenAI's shape: which tools a request offers, how the prompt describes them, the grammar that
holds the model to a call (or lets it answer in prose), and reading calls back out of the text, whole or streamed.

The output format is Hermes' (Qwen2.5's template asks for the same): each call is a block

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

and parallel calls are several blocks, one per line. Prose is any text that does not start with `<tool_call>`, so
`tool_choice: "auto"` can still answer in words; `required` and a named tool allow only blocks. The JSON inside a
block is written on one line, as `json.dumps` writes it (the grammar fixes the layout), so a streamed call can be
cut into name and argument fragments as it arrives.

Models whose chat template knows tools (it reads `tools`: Qwen2.5, Hermes-style) get the tools through the template;
others (SmolLM2) get a system instruction describing them, and earlier calls and results written as text in the
turns, as llama.cpp does for templates without tool support.
"""

from __future__ import annotations

import copy
import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from ownllm.errors import OwnLLMError
from ownllm.generate.constraints import JSON_LAYOUT, Constraint
from ownllm.models.tool_template import CALL_ARGUMENTS as _ARGUMENTS
from ownllm.models.tool_template import (
    CALL_CLOSE,
    CALL_OPEN,
    EMPTY_PARAMETERS,
    TOOL_NAME,
    call_text,
    render_tool_messages,
    template_knows_tools,
    tool_instruction,
)
from ownllm.models.tool_template import CALL_HEAD as _HEAD
from ownllm.models.tool_template import CALL_TAIL as _TAIL

__all__ = ["CALL_CLOSE", "CALL_OPEN", "call_text", "template_knows_tools"]  # re-exported: the format's names
MAX_TOOLS = 128


@dataclass(frozen=True)
class Tool:
    """One function the model may call: its name, what it does, and the JSON schema of its arguments (an object)."""

    name: str
    description: str = ""
    parameters: Mapping[str, Any] = field(default_factory=lambda: dict(EMPTY_PARAMETERS))

    def spec(self) -> dict[str, Any]:
        """OpenAI's `{"type": "function", "function": {...}}`, as chat templates that know tools read it."""
        function: dict[str, Any] = {"name": self.name}
        if self.description:
            function["description"] = self.description
        function["parameters"] = dict(self.parameters)
        return {"type": "function", "function": function}

    def call_schema(self) -> dict[str, Any]:
        """The schema the grammar holds one call's JSON to, `{"name": <this name>, "arguments": {...}}`, with the
        parameters' own definitions lifted to the top so that their `#/$defs/...` references still resolve."""
        parameters = _rebase_refs(copy.deepcopy(dict(self.parameters)))
        definitions = {key: parameters.pop(key) for key in ("$defs", "definitions") if key in parameters}
        # Arguments the schema does not name are allowed by it but useless to the caller, and small models ramble
        # on with made-up ones: left unsaid, only the named ones may be written (still valid against the schema).
        # Only where the schema lists them itself: with no `properties`, or with its shape given through `$ref` or
        # a combination, "no other property" would leave nothing (or less than the schema allows) to write.
        if "properties" in parameters and not COMBINATIONS & set(parameters):
            parameters.setdefault("additionalProperties", False)
        return {"type": "object", "properties": {"name": {"const": self.name}, "arguments": parameters},
                "required": ["name", "arguments"], "additionalProperties": False, **definitions}


ChoiceMode = Literal["none", "auto", "required"]
COMBINATIONS = {"$ref", "anyOf", "oneOf", "allOf", "not", "if", "dependentSchemas", "patternProperties"}
_DEFINITIONS = ("#/$defs/", "#/definitions/")


def _rebase_refs(node: Any) -> Any:
    """The parameters move under `properties.arguments` of the call's schema (their definitions stay at the top):
    a local `$ref` into the parameters themselves (`#`, `#/properties/...`) is rewritten to point there still."""
    if isinstance(node, dict):
        rebased = {key: _rebase_refs(value) for key, value in node.items()}
        ref = node.get("$ref")
        if isinstance(ref, str) and (ref == "#" or ref.startswith("#/")) and not ref.startswith(_DEFINITIONS):
            rebased["$ref"] = "#/properties/arguments" + ref[1:]
        return rebased
    if isinstance(node, list):
        return [_rebase_refs(value) for value in node]
    return node


@dataclass(frozen=True)
class ToolPlan:
    """What one request asks of the model: the tools it may call, whether it must call one, and whether it may call
    several at once. Built (and checked) by `plan_tools`."""

    tools: tuple[Tool, ...]
    required: bool = False
    parallel: bool = True
    calls_allowed: bool = True  # False for tool_choice "none": the model sees the tools but answers in prose

    def constraint(self) -> Constraint:
        """The grammar the sampler holds the reply to (llguidance's Lark, each call's JSON embedded with `%json`)."""
        grammar = tools_grammar(self.tools, required=self.required, parallel=self.parallel) if self.calls_allowed \
            else PROSE_GRAMMAR
        return Constraint.lark(grammar).named("tools")

    def instruction(self) -> str:
        """The system text that describes the tools and the call format (for templates that do not know tools)."""
        return tool_instruction([t.spec() for t in self.tools], required=self.required, parallel=self.parallel,
                                calls_allowed=self.calls_allowed)


def plan_tools(tools: Sequence[Mapping[str, Any]] | None, tool_choice: Any = None, parallel: bool = True
               ) -> ToolPlan | None:
    """Check a request's `tools` and `tool_choice` (OpenAI's shapes, as plain dicts) and say what the model is held
    to; None when no tool is offered. Problems raise OwnLLMError naming the
    field: duplicate names, parameters that are not an object schema or that cannot be compiled, a choice naming a
    tool that is not offered, a choice without tools."""
    if not tools:
        if tool_choice not in (None, "none"):
            raise OwnLLMError("tool_choice is given but tools is not: name the tools the model may call",
                              param="tool_choice")
        return None
    if len(tools) > MAX_TOOLS:
        raise OwnLLMError(f"at most {MAX_TOOLS} tools, got {len(tools)}", param="tools")
    parsed: list[Tool] = []
    for index, item in enumerate(tools):
        parsed.append(_tool(item, f"tools[{index}]"))
        if parsed[-1].name in (t.name for t in parsed[:-1]):
            raise OwnLLMError(f"tools[{index}]: the name {parsed[-1].name!r} is given twice",
                              param=f"tools[{index}].function.name")
    mode, named = _choice(tool_choice)
    if mode == "none":  # as OpenAI: the tools stay in view (earlier calls refer to them), no call is made
        return ToolPlan(tuple(parsed), parallel=parallel, calls_allowed=False)
    if named is not None:
        chosen = [t for t in parsed if t.name == named]
        if not chosen:
            raise OwnLLMError(f"tool_choice names the tool {named!r}, which is not in tools "
                              f"({', '.join(t.name for t in parsed)})", param="tool_choice")
        # exactly one call, as vLLM's named function calling makes: the model is told which call to make, and a
        # small one otherwise goes on writing more calls of it until max_tokens cuts the reply ("length")
        return ToolPlan(tuple(chosen), required=True, parallel=False)
    return ToolPlan(tuple(parsed), required=mode == "required", parallel=parallel)


def _tool(item: Mapping[str, Any], where: str) -> Tool:
    if not isinstance(item, Mapping) or item.get("type", "function") != "function":
        raise OwnLLMError(f"{where} must be {{\"type\": \"function\", \"function\": {{...}}}}", param=f"{where}.type")
    function = item.get("function")
    if not isinstance(function, Mapping) or not isinstance(function.get("name"), str) or not TOOL_NAME.fullmatch(
            function["name"]):
        raise OwnLLMError(f"{where}.function.name must be 1 to 64 letters, digits, _ or -",
                          param=f"{where}.function.name")
    parameters = function.get("parameters")
    if parameters is None:
        parameters = dict(EMPTY_PARAMETERS)
    if not isinstance(parameters, Mapping) or parameters.get("type", "object") != "object" or (
            "properties" in parameters and not isinstance(parameters["properties"], Mapping)):
        raise OwnLLMError(f"{where}.function.parameters must be a JSON schema of an object (\"type\": \"object\")",
                          param=f"{where}.function.parameters")
    description = function.get("description") or ""
    if not isinstance(description, str):
        raise OwnLLMError(f"{where}.function.description must be a string", param=f"{where}.function.description")
    tool = Tool(function["name"], description, dict(parameters))
    # a schema llguidance cannot use is refused here, naming this tool, before any generation
    param = f"{where}.function.parameters"
    try:
        Constraint.json_schema(tool.call_schema()).named(param).check()
    except OwnLLMError as exc:
        raise OwnLLMError(str(exc), param=param) from None
    except RecursionError:  # (Python's own words, "maximum recursion depth exceeded", say nothing of the schema)
        raise OwnLLMError(f"{param}: the JSON schema is nested too deeply", param=param) from None
    except Exception as exc:  # anything else the grammar engine raises about a schema is still the schema's fault
        raise OwnLLMError(f"{param}: the JSON schema cannot be used: {exc}", param=param) from None
    return tool


def _choice(tool_choice: Any) -> tuple[ChoiceMode, str | None]:
    if tool_choice is None:
        return "auto", None
    if tool_choice in ("none", "auto", "required"):
        return tool_choice, None
    if isinstance(tool_choice, Mapping) and tool_choice.get("type") == "function":
        function = tool_choice.get("function")
        if isinstance(function, Mapping) and isinstance(function.get("name"), str):
            return "required", function["name"]
    raise OwnLLMError('tool_choice must be "none", "auto", "required" or {"type": "function", "function": '
                      '{"name": ...}}', param="tool_choice")


# prose: anything, as long as it does not open (after blank space) with a call
_PROSE_RULE = f"PROSE: /(.|\\n)+/ & ~/[ \\t\\r\\n]*{CALL_OPEN}(.|\\n)*/"
# tool_choice "none": no call anywhere in the reply, and no tool result made up either
PROSE_GRAMMAR = "\n".join([
    "%llguidance {}", "start: ONLY_PROSE",
    f"ONLY_PROSE: /(.|\\n)+/ & ~/(.|\\n)*{CALL_OPEN}(.|\\n)*/ & ~/[ \\t\\r\\n]*<tool_response(.|\\n)*/"])


def tools_grammar(tools: Sequence[Tool], *, required: bool, parallel: bool) -> str:
    """llguidance Lark: one `<tool_call>` block (or several, one per line, when `parallel`), each holding the JSON of
    a call to one of `tools`; unless `required`, prose (any text not starting with `<tool_call>`) instead."""
    layout = {"x-guidance": JSON_LAYOUT}
    rules = [f"call_{index}: %json {json.dumps({**tool.call_schema(), **layout}, ensure_ascii=False)}"
             for index, tool in enumerate(tools)]
    calls = 'call ("\\n" call)*' if parallel else "call"
    start = "calls" if required else "PROSE | calls"
    return "\n".join([
        "%llguidance {}",
        f"start: {start}",
        f"calls: {calls}",
        f'call: "{CALL_OPEN}\\n" ({" | ".join(f"call_{i}" for i in range(len(tools)))}) "\\n{CALL_CLOSE}"',
        *rules,
        _PROSE_RULE,
    ])


# --- the prompt ----------------------------------------------------------------------------------------------
def render_messages(messages: Sequence[Mapping[str, Any]], plan: ToolPlan | None, knows_tools: bool
                    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """The conversation as the chat template should get it, and the `tools=` to pass it (None: pass none); see
    ownllm.models.tool_template, the rendering fine-tuning shares."""
    if plan is None:
        return render_tool_messages(messages, None, knows_tools)
    return render_tool_messages(messages, [t.spec() for t in plan.tools], knows_tools, required=plan.required,
                                parallel=plan.parallel, calls_allowed=plan.calls_allowed)


# --- reading calls back ----------------------------------------------------------------------------------------
@dataclass
class ToolCall:
    """One call read from the text: `arguments` is its JSON text exactly as written (complete once `complete`)."""

    name: str
    arguments: str = ""
    complete: bool = False
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")


def scan_calls(text: str) -> tuple[list[ToolCall], bool] | None:
    """The calls in `text` so far (the last one possibly partial: its name only once whole, its arguments as far as
    written), and whether the text can still grow into valid calls; None when it is not (or cannot become) calls.
    Text that is blank or a beginning of `<tool_call>` is ([], True): not yet known."""
    text = text.lstrip(" \t\r\n")
    if len(text) < len(CALL_OPEN):
        return ([], True) if CALL_OPEN.startswith(text) else None
    if not text.startswith(CALL_OPEN):
        return None
    calls: list[ToolCall] = []
    position = 0
    while True:
        for literal in ((_HEAD,) if not calls else ("\n", _HEAD)):
            rest = text[position:position + len(literal)]
            if rest != literal:
                return (calls, True) if literal.startswith(rest) else None
            position += len(literal)
        end = text.find('"', position)
        if end < 0:
            return calls, True
        call = ToolCall(text[position:end])
        calls.append(call)
        position = end + 1
        rest = text[position:position + len(_ARGUMENTS) - 1]
        if rest != _ARGUMENTS[1:len(rest) + 1]:
            return None
        if len(rest) < len(_ARGUMENTS) - 1:
            return calls, True
        position += len(_ARGUMENTS) - 1
        end = _json_end(text, position)
        call.arguments = text[position:end if end is not None else len(text)]
        if end is None:
            return calls, True
        position = end
        rest = text[position:position + len(_TAIL)]
        if rest != _TAIL[:len(rest)]:
            return None
        if len(rest) < len(_TAIL):
            return calls, True
        call.complete = True
        position += len(_TAIL)
        if position == len(text):
            return calls, True


def _json_end(text: str, start: int) -> int | None:
    """Where the JSON object that starts at `start` ends (one past its closing brace), or None if not yet closed."""
    depth, in_string, escaped = 0, False, False
    for index in range(start, len(text)):
        char = text[index]
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "{[":
            depth += 1
        elif char in "}]":
            depth -= 1
            if depth == 0:
                return index + 1
    return None


def parse_tool_calls(text: str) -> list[ToolCall] | None:
    """The calls a whole reply makes, or None when it is prose (or calls cut short: see `scan_calls`)."""
    scanned = scan_calls(text)
    if scanned is None or not scanned[0] or not all(call.complete for call in scanned[0]):
        return None
    calls = scanned[0]
    for call in calls:
        try:
            json.loads(call.arguments)
        except json.JSONDecodeError:
            return None
    return calls


@dataclass
class CallStart:
    """A call's first piece: its index among the reply's calls, id and whole name."""

    index: int
    id: str
    name: str


@dataclass
class ArgumentsDelta:
    index: int
    text: str


@dataclass
class ProseDelta:
    text: str


class ToolCallStream:
    """Cuts a reply arriving in pieces into prose or call events: text is held back while it may still be the
    start of a call; a call's name goes out once whole, its arguments as they arrive. The arguments' fragments,
    joined, are exactly what `parse_tool_calls` reads from the whole text."""

    def __init__(self) -> None:
        self.text = ""
        self.prose: bool | None = None  # None: not known yet
        self.calls: list[ToolCall] = []
        self._sent: list[int] = []  # per call: how much of its arguments went out

    def feed(self, piece: str) -> list[CallStart | ArgumentsDelta | ProseDelta]:
        self.text += piece
        if self.prose:
            return [ProseDelta(piece)] if piece else []
        scanned = scan_calls(self.text)
        if scanned is None:
            if self.calls:  # the grammar prevents this; a call cut off is reported at the end
                return []
            self.prose = True
            return [ProseDelta(self.text)]
        events: list[CallStart | ArgumentsDelta | ProseDelta] = []
        for index, call in enumerate(scanned[0]):
            if index == len(self.calls):
                self.prose = False
                self.calls.append(call)
                self._sent.append(0)
                events.append(CallStart(index, call.id, call.name))
            kept = self.calls[index]
            kept.arguments, kept.complete = call.arguments, call.complete
            if len(kept.arguments) > self._sent[index]:
                events.append(ArgumentsDelta(index, kept.arguments[self._sent[index]:]))
                self._sent[index] = len(kept.arguments)
        return events

    def finish(self) -> list[ProseDelta]:
        """At the end: text still held back (blank, or a beginning of `<tool_call>` that never went on) is prose."""
        if self.prose is None and self.text:
            self.prose = True
            return [ProseDelta(self.text)]
        return []

    @property
    def complete_calls(self) -> list[ToolCall] | None:
        """The reply's calls when it made calls and all of them are complete."""
        if self.prose is False and self.calls and all(call.complete for call in self.calls):
            return self.calls
        return None
