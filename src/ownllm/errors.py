"""The one error type users see: a message written for them, never a traceback."""

from __future__ import annotations

import os
from typing import Literal

ErrorKind = Literal["invalid_request", "not_found", "unsupported", "resource", "interrupted", "training_failed"]


class OwnLLMError(Exception):
    """A problem the user can fix: what was wrong, the value given, what to do.

    Args:
        message: one line naming the problem.
        kind: invalid_request | not_found | unsupported | resource (the server answers 400/404/501/503);
            interrupted (a run stopped by Ctrl-C, exit 130) | training_failed.
        param: the option or field at fault, when there is one.
        hint: what to do next.
        code: a machine-readable name for the problem where clients branch on it (the server's error `code`).
    """

    def __init__(
        self,
        message: str,
        *,
        kind: ErrorKind = "invalid_request",
        param: str | None = None,
        hint: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.kind = kind
        self.param = param
        self.hint = hint
        self.code = code

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class ContextWindowExceeded(OwnLLMError):
    """A prompt plus the tokens asked for do not fit the context window (every front door raises this one)."""

    def __init__(self, prompt_tokens: int, max_new_tokens: int, window: int, *, param: str = "max_new_tokens") -> None:
        super().__init__(
            f"prompt ({prompt_tokens} tokens) + max-new-tokens ({max_new_tokens}) = {prompt_tokens + max_new_tokens} "
            f"is past the context window of {window} tokens",
            param=param, hint="shorten the prompt or lower max-new-tokens", code="context_length_exceeded")
        self.prompt_tokens, self.max_new_tokens, self.window = prompt_tokens, max_new_tokens, window

    def openai_message(self, where: str) -> str:
        """OpenAI's wording, which clients (and people who know that API) recognise."""
        return (f"This model's maximum context length is {self.window} tokens. However, you requested "
                f"{self.prompt_tokens + self.max_new_tokens} tokens ({self.prompt_tokens} in {where}, "
                f"{self.max_new_tokens} in the completion). Please reduce the length of {where} or completion.")


def check_text(text: str, what: str) -> None:
    """Text from outside (an argument, stdin, a request) must be valid Unicode: bytes that are not UTF-8 arrive in
    Python as lone surrogates, which no tokenizer can take."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise OwnLLMError(f"{what} is not valid UTF-8 text (at character {exc.start + 1})", param=what) from None


def is_valid_text(text: str) -> bool:
    """`check_text` as a yes/no, for checks that collect problems rather than stop at the first."""
    try:
        check_text(text, "text")
    except OwnLLMError:
        return False
    return True


def env_switch(name: str, *, default: bool) -> bool:
    """An on/off environment variable (1/0, true/false, yes/no, on/off; unset or empty: `default`); any other value
    is an error naming it."""
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    if value not in {"1", "true", "yes", "on", "0", "false", "no", "off"}:
        raise OwnLLMError(f"{name}={os.environ[name]!r}: use 1 or 0", param=name)
    return value in {"1", "true", "yes", "on"}
