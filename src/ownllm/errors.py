"""The one error type users see: a message written for them, never a traceback."""

from __future__ import annotations

from typing import Literal

ErrorKind = Literal["invalid_request", "not_found", "unsupported", "resource", "interrupted", "training_failed"]


class OwnLLMError(Exception):
    """A problem the user can fix: what was wrong, the value given, what to do.

    Args:
        message: one line naming the problem.
        kind: invalid_request | not_found | unsupported | resource (maps to HTTP 400/404/501/507);
            interrupted (a run stopped by Ctrl-C, exit 130) | training_failed.
        param: the option or field at fault, when there is one.
        hint: what to do next.
    """

    def __init__(
        self,
        message: str,
        *,
        kind: ErrorKind = "invalid_request",
        param: str | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.kind = kind
        self.param = param
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


def check_text(text: str, what: str) -> None:
    """Text from outside (an argument, stdin, a request) must be valid Unicode: bytes that are not UTF-8 arrive in
    Python as lone surrogates, which no tokenizer can take."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise OwnLLMError(f"{what} is not valid UTF-8 text (at character {exc.start + 1})", param=what) from None
