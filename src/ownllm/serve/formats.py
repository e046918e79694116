"""OpenAI's response objects, built from engine results."""

from __future__ import annotations

import time
import uuid
from typing import Any

from ownllm.generate.engine import Completion, TokenLogprob
from ownllm.generate.text import token_offsets


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completions: list[Completion], n: int | None = None) -> dict[str, Any]:
    """OpenAI's usage object. `completions` are `n` choices per prompt, in order (None: all of one prompt); a prompt
    counts once, and so do its tokens the prefix cache had (`prompt_tokens_details.cached_tokens`): the least any of
    its choices got, since the later choices of a new prompt start from the first one's KV, which no cache held."""
    completion_tokens = sum(c.completion_tokens for c in completions)
    size = max(1, n or len(completions))
    groups = [completions[start : start + size] for start in range(0, len(completions), size)]
    cached = min(prompt_tokens, sum(min(c.cached_tokens for c in group) for group in groups))
    return {"prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached}}


def _token_bytes(token: str) -> list[int]:
    return list(token.encode("utf-8"))


def chat_logprobs(items: list[TokenLogprob] | None) -> dict[str, Any] | None:
    if items is None:
        return None
    return {"content": [{"token": i.token, "logprob": i.logprob, "bytes": _token_bytes(i.token),
                         "top_logprobs": [{"token": t, "logprob": lp, "bytes": _token_bytes(t)} for t, lp in i.top]}
                        for i in items], "refusal": None}


def completion_logprobs(completion: Completion, echo: str | None, tokenizer: Any) -> dict[str, Any] | None:
    """The legacy completions' logprobs object. With `echo` (the prompt's text, sent back before the completion),
    the prompt's tokens come first where they were scored (`Completion.prompt_logprobs`), the first with null
    log-probabilities, as OpenAI's API gives them. Offsets index the returned text: from the text decoded so far
    (a token holding part of a character decodes alone to "\ufffd"), never decreasing."""
    items = completion.logprobs
    if items is None:
        return None
    prompt = completion.prompt_logprobs if echo is not None and completion.prompt_logprobs is not None else []
    offsets = _prompt_offsets(tokenizer, [i.token_id for i in prompt], echo or "")
    offsets += token_offsets(tokenizer, [i.token_id for i in items], len(echo or ""))
    every = [*prompt, *items]
    return {"tokens": [i.token for i in every], "token_logprobs": [i.logprob for i in every],
            "top_logprobs": [None if i.logprob is None else dict(i.top) for i in every], "text_offset": offsets}


def _prompt_offsets(tokenizer: Any, ids: list[int], echo: str) -> list[int]:
    """Offsets of a prompt's tokens in its echoed text: decoded with special tokens where that gives the text (a
    prompt that spells out `<|im_start|>`), else without them (a BOS the tokenizer added); within the text."""
    if not ids:
        return []
    skip = tokenizer.decode(ids, skip_special_tokens=False) != echo
    return [min(offset, len(echo)) for offset in token_offsets(tokenizer, ids, 0, skip)]


def chat_response(model: str, prompt_tokens: int, completions: list[Completion], extra: dict | None = None
                  ) -> dict[str, Any]:
    """A chat.completion: `completions` are the choices of one prompt."""
    return {
        "id": new_id("chatcmpl"), "object": "chat.completion", "created": int(time.time()), "model": model,
        "system_fingerprint": None,
        "choices": [{"index": i, "message": {"role": "assistant", "content": c.text, "refusal": None},
                     "logprobs": chat_logprobs(c.logprobs), "finish_reason": c.finish_reason}
                    for i, c in enumerate(completions)],
        "usage": usage(prompt_tokens, completions), **(extra or {}),
    }


def chat_chunk(chunk_id: str, model: str, created: int, choices: list[dict[str, Any]],
               usage_value: dict[str, int] | None = None, include_usage: bool = False) -> dict[str, Any]:
    chunk: dict[str, Any] = {"id": chunk_id, "object": "chat.completion.chunk", "created": created, "model": model,
                             "system_fingerprint": None, "choices": choices}
    if include_usage:
        chunk["usage"] = usage_value
    return chunk


def text_response(model: str, prompt_tokens: int, items: list[tuple[str | None, Completion]],
                  generated: list[Completion], candidates: int, tokenizer: Any) -> dict[str, Any]:
    """`items`: (echoed prompt or None, completion) per choice returned; `generated`: every completion made,
    `candidates` per prompt (more than returned where best_of asked: usage counts them all, as OpenAI bills)."""
    return {
        "id": new_id("cmpl"), "object": "text_completion", "created": int(time.time()), "model": model,
        "system_fingerprint": None,
        "choices": [{"index": i, "text": (echo or "") + c.text, "logprobs": completion_logprobs(c, echo, tokenizer),
                     "finish_reason": c.finish_reason} for i, (echo, c) in enumerate(items)],
        "usage": usage(prompt_tokens, generated, candidates),
    }


def best_of(completions: list[Completion], n: int) -> list[Completion]:
    """The n of one prompt's completions with the highest log-probability per token (OpenAI's best_of), best
    first; ties keep the order they were made in. The end-of-sequence token that ended one counts as one of its
    tokens (else an empty completion would score 0, above any other)."""
    if len(completions) <= n:
        return completions

    def per_token(completion: Completion) -> float:
        ended = completion.stop_logprob is not None
        total = completion.sequence_logprob + (completion.stop_logprob or 0.0)
        return total / max(1, completion.completion_tokens + ended)

    return sorted(completions, key=per_token, reverse=True)[:n]


def model_card(model_id: str, created: int, owned_by: str = "ownllm", **extra: Any) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": owned_by, **extra}
