"""Incremental detokenisation with stop strings: emit only text that can no longer change."""

from __future__ import annotations

from typing import Any


class IncrementalText:
    """Feed token ids one at a time; get back the new, final text and whether a stop string hit.

    Text is held back while it ends in a partial UTF-8 character, or while its tail could still be
    the start of a stop string, so a streamed reply never shows text that a stop later removes.
    """

    def __init__(self, tokenizer: Any, stop: list[str]) -> None:
        self._tokenizer = tokenizer
        self._stop = stop
        self._hold = max((len(s) for s in stop), default=1) - 1
        self.ids: list[int] = []
        self.text = ""
        self._emitted = 0
        self.stopped = False

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self._tokenizer.decode(self.ids, skip_special_tokens=True)
        start = max(0, self._emitted - self._hold)
        hits = [i for i in (text.find(s, start) for s in self._stop) if i >= 0]
        if hits:
            self.text = text[: min(hits)]
            self.stopped = True
            return self._take(len(self.text))
        self.text = text
        safe = len(text) - self._hold
        while safe > self._emitted and text[safe - 1] == "\ufffd":
            safe -= 1
        return self._take(safe)

    def flush(self) -> str:
        return self._take(len(self.text))

    def _take(self, end: int) -> str:
        if end <= self._emitted:
            return ""
        delta = self.text[self._emitted : end]
        self._emitted = end
        return delta


def token_offsets(tokenizer: Any, ids: list[int], start: int = 0, skip_special_tokens: bool = True) -> list[int]:
    """Where each token's text begins in the text of `ids` (plus `start`): never decreasing, and a token that holds
    part of a character sits where that character begins (decoded alone it is only "\ufffd"). Each token is
    decoded in a window of the few before it (TGI's and vLLM's incremental detokenising), so a long prompt costs
    time linear in its length."""
    offsets, position = [], start
    prefix = read = 0  # ids[prefix:read] is the window decoded so far; its text is counted up to `read`
    for end in range(1, len(ids) + 1):
        offsets.append(position)
        before = tokenizer.decode(ids[prefix:read], skip_special_tokens=skip_special_tokens)
        after = tokenizer.decode(ids[prefix:end], skip_special_tokens=skip_special_tokens)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            position += len(after) - len(before)
            prefix, read = read, end
    return offsets
