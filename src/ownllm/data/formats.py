"""Training-data formats, detected per file and normalised to chat messages (or preference pairs, or text).

Accepted, one JSON object per line: OpenAI chat (`messages`), ShareGPT (`conversations` with `from`/`value`),
Alpaca (`instruction`, optional `input`, `output`), prompt/completion, and preference pairs (`prompt`,
`chosen`, `rejected`, or OpenAI's `input`/`preferred_output`/`non_preferred_output`); or a folder / files of
plain text or Markdown for continued pretraining.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

Format = Literal["chat", "sharegpt", "alpaca", "completion", "preference", "text"]
FORMATS: tuple[Format, ...] = ("chat", "sharegpt", "alpaca", "completion", "preference", "text")
ROLES = {"system", "user", "assistant", "tool"}
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system", "tool": "tool", "function": "tool"}


@dataclass(frozen=True)
class Example:
    line: int
    messages: list[dict[str, str]] | None = None  # chat-shaped formats
    chosen: str | None = None  # preference pairs: the prompt is in `messages`
    rejected: str | None = None
    text: str | None = None  # plain text

    def content_key(self) -> str:
        """What two examples must share to be duplicates."""
        if self.text is not None:
            return self.text
        parts = [f"{m['role']}:{m['content']}" for m in self.messages or []]
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


def _check_messages(messages: Any, where: str, problems: list[str]) -> list[dict[str, str]] | None:
    if not isinstance(messages, list) or not messages:
        problems.append(f"{where}: 'messages' must be a non-empty list")
        return None
    clean = []
    for index, message in enumerate(messages):
        field = f"{where}: messages[{index}]"
        if not isinstance(message, dict):
            problems.append(f"{field} must be an object with 'role' and 'content'")
            return None
        unknown = set(message) - {"role", "content", "name", "weight"}
        if unknown:
            problems.append(f"{field} has unknown key(s) {sorted(unknown)}")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            problems.append(f"{field}.role must be one of {sorted(ROLES)}, got {role!r}")
            return None
        if not isinstance(content, str) or not content.strip():
            problems.append(f"{field}.content is empty or not a string")
            return None
        clean.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in clean):
        problems.append(f"{where}: no assistant turn (nothing to learn from)")
        return None
    return clean


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
        messages = _check_messages(record.get("messages"), where, problems)
        return Example(line, messages=messages) if messages else None
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
        if isinstance(prompt, list):
            messages = [m for m in prompt if isinstance(m, dict)]
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
