"""The prompt that puts retrieved chunks in front of the question, numbered for citations."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ownllm.models.chat_template import Message

IDK = "I don't know."
SYSTEM = ("Answer the question using only the numbered sources. Cite the sources you use like [1]. "
          f"If the sources do not contain the answer, reply exactly: {IDK}")


def source_label(chunk: Any) -> str:
    """Where a chunk comes from, for people: "file.pdf, page 3, Heading"."""
    where = Path(chunk.source).name
    if chunk.page:
        where += f", page {chunk.page}"
    if chunk.heading:
        where += f", {chunk.heading}"
    return where


def format_sources(hits: Sequence[Any]) -> str:
    """The hits as numbered sources, "[n] (label) text", numbered from 1: the numbers the model cites."""
    return "\n\n".join(f"[{n}] ({source_label(h.chunk)}) {h.chunk.text}" for n, h in enumerate(hits, 1))


def build_messages(question: str, hits: Sequence[Any]) -> list[Message]:
    """One question answered from the sources: the instructions, then the sources and the question."""
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"Sources:\n{format_sources(hits)}\n\nQuestion: {question}"}]


def sources_system_prompt(hits: Sequence[Any]) -> str:
    """The instructions with the sources, as one system prompt for a conversation."""
    return f"{SYSTEM}\n\nSources:\n{format_sources(hits)}"


def with_sources(conversation: Sequence[Message], hits: Sequence[Any]) -> list[Message]:
    """A conversation (a chat request's turns) answered from the sources: the system prompt with the sources
    replaces the conversation's own system messages, so the model gets one set of instructions."""
    return [{"role": "system", "content": sources_system_prompt(hits)},
            *[m for m in conversation if m["role"] != "system"]]
