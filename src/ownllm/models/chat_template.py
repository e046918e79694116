"""The one chat-template path: messages → the model's own template → token ids."""

from __future__ import annotations

from typing import Any, TypedDict

from ownllm.errors import OwnLLMError, check_text

ROLES = ("system", "user", "assistant", "tool")


class Message(TypedDict):
    role: str
    content: str


def check_messages(messages: list[Message]) -> None:
    if not messages:
        raise OwnLLMError("no messages given", param="messages")
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise OwnLLMError(f"messages[{index}] must be an object with 'role' and 'content'",
                              param=f"messages[{index}]")
        if message.get("role") not in ROLES:
            raise OwnLLMError(
                f"messages[{index}].role must be one of {', '.join(ROLES)}, got {message.get('role')!r}",
                param=f"messages[{index}].role",
            )
        if not isinstance(message.get("content"), str):
            raise OwnLLMError(f"messages[{index}].content must be a string", param=f"messages[{index}].content")
        check_text(message["content"], f"messages[{index}].content")


def render_chat_text(tokenizer: Any, messages: list[Message], *, add_generation_prompt: bool = True,
                     tools: list[dict[str, Any]] | None = None) -> str:
    """The conversation in the model's own template; `tools` (OpenAI's function specs) go to templates that read
    them (see ownllm.generate.tools for those that do not)."""
    check_messages(messages)
    if not getattr(tokenizer, "chat_template", None):
        raise OwnLLMError(
            "this model has no chat template",
            kind="unsupported",
            hint="use `ownllm generate` with a plain prompt, or a chat/instruct model",
        )
    extra = {"tools": tools} if tools else {}
    return tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=add_generation_prompt, **extra
    )


def render_chat(tokenizer: Any, messages: list[Message], *, add_generation_prompt: bool = True,
                tools: list[dict[str, Any]] | None = None) -> list[int]:
    """Token ids of the conversation in the model's own template, ready for the assistant's turn."""
    text = render_chat_text(tokenizer, messages, add_generation_prompt=add_generation_prompt, tools=tools)
    # The template already wrote any BOS it wants; adding special tokens again would double it.
    return tokenizer.encode(text, add_special_tokens=False)


def assistant_token_mask(tokenizer: Any, messages: list[Message], *, tools: list[dict[str, Any]] | None = None
                         ) -> tuple[list[int], list[bool]]:
    """Token ids of the whole conversation and, for each, whether it belongs to an assistant reply.

    Templates such as SmolLM2's have no generation markers, so the spans are found by rendering the
    conversation up to each assistant turn (with the generation prompt) and up to its end. `tools` go to templates
    that read them (ownllm.models.tool_template renders conversations with tools).
    """
    ids = render_chat(tokenizer, messages, add_generation_prompt=False, tools=tools)
    mask = [False] * len(ids)
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(render_chat(tokenizer, messages[:index], add_generation_prompt=True, tools=tools)) if index else 0
        upto = render_chat(tokenizer, messages[: index + 1], add_generation_prompt=False, tools=tools)
        end = len(upto)
        if ids[:end] != upto:
            raise OwnLLMError("this chat template renders earlier turns differently as the conversation grows; "
                              "cannot tell which tokens are the assistant's", kind="unsupported")
        for position in range(start, min(end, len(ids))):
            mask[position] = True
    return ids, mask
