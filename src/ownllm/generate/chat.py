"""A chat session: history in the model's template, kept inside the context window."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ownllm.errors import OwnLLMError
from ownllm.generate.engine import Completion, Engine, TextDelta
from ownllm.generate.params import SamplingParams
from ownllm.home import atomic_write_text
from ownllm.models.chat_template import Message


@dataclass
class ChatSession:
    """History plus the rule that keeps it in the window: drop the oldest turns, and say how many.

    Args:
        engine: the engine to answer with.
        system: an optional system prompt, always kept.
        params: sampling parameters for every reply.
    """

    engine: Engine
    system: str | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    history: list[Message] = field(default_factory=list)

    def messages(self) -> list[Message]:
        head: list[Message] = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.history

    def reset(self) -> None:
        self.history.clear()

    def fit(self) -> int:
        """Drop the oldest turns until the conversation plus a full reply fits; return how many went."""
        dropped = 0
        budget = self.engine.context_length - self.params.max_new_tokens
        while len(self.engine.render_chat(self.messages())) > budget:
            if len(self.history) <= 1:
                raise OwnLLMError(
                    f"this message alone does not fit the context window of {self.engine.context_length} "
                    f"tokens with room for {self.params.max_new_tokens} new tokens",
                    param="max_new_tokens",
                    hint="send a shorter message or lower --max-new-tokens",
                )
            # A turn is a user message and the reply to it; never leave a reply without its question.
            drop = 2 if len(self.history) > 2 and self.history[1]["role"] == "assistant" else 1
            del self.history[:drop]
            dropped += drop
        return dropped

    def send(self, text: str) -> Iterator[TextDelta | Completion | int]:
        """Add a user turn and stream the reply; yields first the number of dropped messages."""
        if not text.strip():
            raise OwnLLMError("empty message", param="content")
        self.history.append({"role": "user", "content": text})
        try:
            dropped = self.fit()
        except OwnLLMError:
            self.history.pop()
            raise
        yield dropped
        reply = None
        for event in self.engine.stream_chat(self.messages(), self.params):
            if isinstance(event, Completion):
                reply = event
            yield event
        assert reply is not None
        self.history.append({"role": "assistant", "content": reply.text})

    def save(self, path: Path) -> None:
        atomic_write_text(path, json.dumps({"messages": self.messages()}, indent=2, ensure_ascii=False) + "\n")
