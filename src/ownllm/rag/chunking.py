"""Chunking by tokens with overlap, splitting at headings (sections), then paragraphs, then sentences.

Pieces (paragraphs, or sentences of paragraphs that are too long, or token windows of sentences that
are still too long) are packed into chunks of at most `size` tokens; each chunk starts with the last
whole pieces of the previous one that fit in `overlap` tokens.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from ownllm.rag.loaders import Section

_PARAGRAPHS = re.compile(r"\n\s*\n")
_SENTENCES = re.compile(r"(?<=[.!?])\s+")


@dataclass(frozen=True)
class Chunk:
    source: str
    position: int  # order within its source
    text: str
    tokens: int
    page: int | None = None
    heading: str | None = None

    @property
    def key(self) -> tuple[str, int]:
        return self.source, self.position


def _pieces(text: str, size: int, count: Callable[[str], int], split_tokens: Callable[[str, int], list[str]]
            ) -> list[tuple[str, int]]:
    out = []
    for paragraph in _PARAGRAPHS.split(text):
        paragraph = " ".join(paragraph.split())
        if not paragraph:
            continue
        tokens = count(paragraph)
        if tokens <= size:
            out.append((paragraph, tokens))
            continue
        for sentence in _SENTENCES.split(paragraph):
            tokens = count(sentence)
            if tokens <= size:
                out.append((sentence, tokens))
            else:
                out.extend((window, count(window)) for window in split_tokens(sentence, size))
    return out


def chunk_sections(sections: list[Section], *, size: int, overlap: int, count: Callable[[str], int],
                   split_tokens: Callable[[str, int], list[str]]) -> list[Chunk]:
    """Chunks of one file's sections, numbered in order.

    Args:
        sections: the file's sections (a heading, a PDF page, a row...); chunks never span two.
        size: most tokens per chunk.
        overlap: most tokens a chunk repeats from the one before.
        count: tokens in a text, with the embedding model's tokenizer.
        split_tokens: cut a text into windows of at most n tokens.
    """
    chunks: list[Chunk] = []
    for section in sections:
        current: list[tuple[str, int]] = []

        def emit(pieces: list[tuple[str, int]], section: Section = section) -> None:
            text = " ".join(p for p, _ in pieces)
            chunks.append(Chunk(section.source, len(chunks), text, count(text), section.page, section.heading))

        for piece in _pieces(section.text, size, count, split_tokens):
            if current and sum(t for _, t in current) + piece[1] > size:
                emit(current)
                carry: list[tuple[str, int]] = []
                carried = 0
                for previous in reversed(current):
                    if carried + previous[1] > overlap or carried + previous[1] + piece[1] > size:
                        break
                    carry.insert(0, previous)
                    carried += previous[1]
                current = carry
            current.append(piece)
        if current:
            emit(current)
    return chunks
