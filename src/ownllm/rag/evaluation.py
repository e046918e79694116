"""Retrieval evaluation: recall@k and MRR for dense, BM25 and hybrid, side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ownllm.data.jsonl import fail_if_any, read_jsonl
from ownllm.rag.index import MODES, Index


def read_retrieval_questions(path: Path) -> list[tuple[str, str]]:
    """JSONL lines with `question` and `source` (the file name, or a path ending, that holds the answer)."""
    pairs, problems = [], []
    for record in read_jsonl(path):
        question, source = record.data.get("question"), record.data.get("source")
        if not isinstance(question, str) or not isinstance(source, str) or not question or not source:
            problems.append(f"{path.name} line {record.line}: needs 'question' and 'source' strings")
            continue
        pairs.append((question, source))
    fail_if_any(problems)
    return pairs


def evaluate_retrieval(index: Index, questions: list[tuple[str, str]], *, ks: tuple[int, ...] = (1, 5, 10)
                       ) -> dict[str, dict[str, Any]]:
    results: dict[str, dict[str, Any]] = {}
    depth = max(ks)
    for mode in MODES:
        ranks = []
        for question, expected in questions:
            hits = index.search(question, k=depth, mode=mode)
            rank = next((h.rank for h in hits if h.chunk.source.endswith(expected)), None)
            ranks.append(rank)
        metrics: dict[str, Any] = {f"recall@{k}": sum(1 for r in ranks if r and r <= k) / len(ranks) for k in ks}
        metrics["mrr"] = sum(1 / r for r in ranks if r) / len(ranks)
        results[mode] = metrics
    return results
