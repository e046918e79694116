"""What retrieval found for one question, numbered as sources, and whether to answer from it at all.

`Index.context` makes one; `Index.ask` (`ownllm rag ask`) and the server's chat with `rag` both answer through it,
so they use the same sources, the same prompt, and abstain the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ownllm.models.chat_template import Message
from ownllm.rag.chunking import Chunk
from ownllm.rag.prompt import IDK, build_messages, sources_system_prompt, with_sources

DEFAULT_K = 4
DEFAULT_MIN_SCORE = 0.3  # a cosine similarity: below it, retrieval is taken to have found nothing relevant

__all__ = ["DEFAULT_K", "DEFAULT_MIN_SCORE", "IDK", "Hit", "RagContext"]


@dataclass(frozen=True)
class Hit:
    """A chunk a search found: its score (cosine similarity, BM25 weight or fused rank score, by search mode) and
    its rank, from 1."""

    chunk: Chunk
    score: float
    rank: int


@dataclass(frozen=True)
class RagContext:
    """The k best chunks for a question and the decision to answer from them or to say `IDK`.

    Attributes:
        question: what was searched for.
        hits: the chunks found, best first; source n of the prompt is `hits[n - 1]`.
        best_similarity: cosine similarity of the closest chunk in the store to the question (whatever the
            search mode: hybrid and BM25 scores are ranks and keyword weights, not a measure of relevance).
        abstain: nothing found, or nothing close enough (best_similarity below min_score): the answer is `IDK`,
            without asking the model.
    """

    question: str
    hits: list[Hit]
    best_similarity: float
    abstain: bool

    @property
    def system_prompt(self) -> str:
        """The instructions with the numbered sources, for a conversation's system message."""
        return sources_system_prompt(self.hits)

    def messages(self, conversation: Sequence[Message] | None = None) -> list[Message]:
        """The model's prompt. Alone: the instructions, then the sources and the question. With a conversation (whose
        last user message is the question): its turns under `system_prompt`, which replaces its system messages."""
        if conversation is None:
            return build_messages(self.question, self.hits)
        return with_sources(conversation, self.hits)

    @property
    def sources(self) -> list[dict[str, Any]]:
        """The numbered sources as JSON-able dicts: index (the n the model cites), source, page, heading, score."""
        return [{"index": n, "source": h.chunk.source, "page": h.chunk.page, "heading": h.chunk.heading,
                 "score": h.score} for n, h in enumerate(self.hits, 1)]
