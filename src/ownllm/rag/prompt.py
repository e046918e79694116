"""The prompt that puts retrieved chunks in front of the question, numbered for citations."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ownllm.models.chat_template import Message

SYSTEM = ("Answer the question using only the numbered sources. Cite the sources you use like [1]. "
          "If the sources do not contain the answer, reply exactly: I don't know.")


def source_label(chunk: Any) -> str:
    where = Path(chunk.source).name
    if chunk.page:
        where += f", page {chunk.page}"
    if chunk.heading:
        where += f", {chunk.heading}"
    return where


def build_messages(question: str, hits: list[Any]) -> list[Message]:
    sources = "\n\n".join(f"[{n}] ({source_label(h.chunk)}) {h.chunk.text}" for n, h in enumerate(hits, 1))
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"Sources:\n{sources}\n\nQuestion: {question}"}]
