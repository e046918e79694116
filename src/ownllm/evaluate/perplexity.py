"""Perplexity with a sliding window, over plain text or over the assistant turns of chat data.

Each window of `max_length` tokens moves by `stride`; only the tokens new to a window are scored, so
every token is scored once, with up to `max_length - stride` tokens of context before it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ownllm.data.jsonl import fail_if_any, read_jsonl
from ownllm.errors import OwnLLMError
from ownllm.generate.engine import Engine
from ownllm.models.chat_template import assistant_token_mask


@dataclass(frozen=True)
class Document:
    ids: list[int]
    scored: list[bool]  # which positions count (as targets)


@dataclass
class PerplexityResult:
    perplexity: float
    mean_nll: float
    tokens_scored: int
    documents: int
    max_length: int
    stride: int
    notes: list[str] = field(default_factory=list)


def load_documents(engine: Engine, path: Path) -> list[Document]:
    """Text files (.txt, .md, a folder of them) or JSONL with `text` or `messages` per line."""
    tokenizer = engine.tokenizer
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in (".txt", ".md") and p.is_file())
        if not files:
            raise OwnLLMError(f"{path} holds no .txt or .md files", param="data")
        return [_text_document(tokenizer, f.read_text(encoding="utf-8")) for f in files]
    if not path.is_file():
        raise OwnLLMError(f"no such file: {path}", kind="not_found", param="data")
    if path.suffix.lower() != ".jsonl":
        text = path.read_text(encoding="utf-8")
        if not text.strip():
            raise OwnLLMError(f"{path} is empty", param="data")
        return [_text_document(tokenizer, text)]
    documents, problems = [], []
    for record in read_jsonl(path):
        if isinstance(record.data.get("messages"), list):
            ids, mask = assistant_token_mask(tokenizer, record.data["messages"])
            if not any(mask):
                problems.append(f"{path.name} line {record.line}: no assistant turn to score")
                continue
            documents.append(Document(ids, mask))
        elif isinstance(record.data.get("text"), str) and record.data["text"].strip():
            documents.append(_text_document(tokenizer, record.data["text"]))
        else:
            problems.append(f"{path.name} line {record.line}: needs a non-empty 'text' or a 'messages' list")
    fail_if_any(problems)
    return documents


def _text_document(tokenizer: object, text: str) -> Document:
    ids = tokenizer(text).input_ids  # type: ignore[operator]
    return Document(ids, [True] * len(ids))


def perplexity(engine: Engine, documents: list[Document], *, max_length: int | None = None,
               stride: int | None = None, progress: Callable[[int], None] | None = None) -> PerplexityResult:
    """Sliding-window perplexity.

    Args:
        engine: a transformers-backend engine (perplexity needs the logits of every position).
        documents: token ids with the positions to score.
        max_length: window length (default: min(context window, 1024); clamped to the context window).
        stride: how far the window moves (default: half the window).
        progress: called with the number of tokens scored after each window.
    """
    model = getattr(engine, "model", None)
    if model is None:
        raise OwnLLMError("perplexity needs the transformers backend", kind="unsupported", param="backend")
    notes = []
    if max_length is None:
        max_length = min(engine.context_length, 1024)
    elif max_length > engine.context_length:
        notes.append(f"max-length {max_length} is past the model's context window; clamped to "
                     f"{engine.context_length}")
        max_length = engine.context_length
    if max_length < 2:
        raise OwnLLMError("max-length must be at least 2", param="max_length")
    stride = stride or max(1, max_length // 2)
    if not 0 < stride <= max_length:
        raise OwnLLMError(f"stride must be in 1..max-length ({max_length})", param="stride")
    total_nll, scored = 0.0, 0
    for document in documents:
        with engine.scoring(document.ids):  # a scoped adapter (ownllm.models.scope): on where its text routes
            nll, count = _document_nll(model, engine.device, document, max_length, stride, progress)
        total_nll, scored = total_nll + nll, scored + count
    if scored == 0:
        raise OwnLLMError("no tokens to score (documents of one token?)", param="data")
    mean = total_nll / scored
    return PerplexityResult(math.exp(mean), mean, scored, len(documents), max_length, stride, notes)


def _document_nll(model: object, device: str, document: Document, max_length: int, stride: int,
                  progress: Callable[[int], None] | None) -> tuple[float, int]:
    ids = torch.tensor(document.ids)
    scored_mask = torch.tensor(document.scored)
    total, count, previous_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + max_length, len(ids))
        window = ids[begin:end]
        with torch.inference_mode():
            logits = model(input_ids=window[None].to(device)).logits[0].float().cpu()  # type: ignore[operator]
        logprobs = torch.log_softmax(logits[:-1], dim=-1)
        nll = -logprobs.gather(1, window[1:, None])[:, 0]  # target positions begin+1 .. end-1
        targets = torch.arange(begin + 1, end)
        keep = (targets >= max(previous_end, 1)) & scored_mask[begin + 1 : end]
        total += float(nll[keep].sum())
        count += int(keep.sum())
        if progress:
            progress(int(keep.sum()))
        previous_end = end
        if end == len(ids):
            break
    return total, count
