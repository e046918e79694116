"""Training rows: token ids with labels that are -100 everywhere but the assistant's replies (its tool calls
included: conversations with tools render as the server renders them, ownllm.models.tool_template).

SmolLM2's chat template has no generation markers, so the mask comes from rendering the conversation turn by
turn (`assistant_token_mask`); plain text (continued pretraining) learns every token.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ownllm.data.doctor import find_duplicates, read_examples
from ownllm.data.formats import Example
from ownllm.errors import OwnLLMError
from ownllm.models.chat_template import assistant_token_mask
from ownllm.models.tool_template import tool_token_mask, uses_tools

IGNORE = -100


def encode(example: Example, tokenizer: Any, max_length: int) -> dict[str, list[int]]:
    if example.text is not None:
        ids = tokenizer(example.text).input_ids
        labels = list(ids)
    else:
        if example.chosen is not None:
            raise OwnLLMError("preference pairs (prompt, chosen, rejected) train with method: dpo, not "
                              "supervised fine-tuning", param="data", hint="set method: dpo in the config")
        if uses_tools(example.messages, example.tools):  # rendered as the server renders a request with tools
            ids, mask = tool_token_mask(tokenizer, example.messages, example.tools,
                                        parallel=example.parallel_tool_calls)
        else:
            ids, mask = assistant_token_mask(tokenizer, example.messages)
        labels = [token if keep else IGNORE for token, keep in zip(ids, mask, strict=True)]
    return {"input_ids": ids[:max_length], "labels": labels[:max_length]}


def load_rows(path: Path, tokenizer: Any, max_length: int) -> list[dict[str, list[int]]]:
    """Usable, deduplicated examples of a file, encoded; the data doctor's problems stop the run first."""
    _, examples, problems = read_examples(path)
    if problems:
        raise OwnLLMError(f"{path}: {len(problems)} unusable line(s), first: {problems[0]}", param="data",
                          hint=f"run: ownllm data check {path}")
    exact, near = find_duplicates(examples)
    duplicate_lines = {line for line, _ in exact + near}
    rows = [encode(e, tokenizer, max_length) for e in examples if e.line not in duplicate_lines]
    rows = [r for r in rows if any(label != IGNORE for label in r["labels"][1:])]
    if not rows:
        raise OwnLLMError(f"{path}: nothing to learn (no assistant tokens within max_length)", param="data")
    return rows


def load_preference_rows(path: Path, method: str = "DPO") -> list[dict[str, Any]]:
    """Preference pairs in TRL's conversational form: prompt messages, chosen and rejected replies (`method`
    names what needs them, in the error for a file without any)."""
    _, examples, problems = read_examples(path)
    if problems:
        raise OwnLLMError(f"{path}: {len(problems)} unusable line(s), first: {problems[0]}", param="data",
                          hint=f"run: ownllm data check {path}")
    rows = [{"prompt": e.messages, "chosen": [{"role": "assistant", "content": e.chosen}],
             "rejected": [{"role": "assistant", "content": e.rejected}]} for e in examples if e.chosen is not None]
    if not rows:
        raise OwnLLMError(f"{path}: {method} needs preference pairs (prompt, chosen, rejected)", param="data")
    return rows


def pack(rows: list[dict[str, list[int]]], max_length: int) -> list[dict[str, list[int]]]:
    """Concatenate examples and cut the stream into rows of exactly `max_length` (the last may be shorter)."""
    ids = [token for row in rows for token in row["input_ids"]]
    labels = [label for row in rows for label in row["labels"]]
    return [{"input_ids": ids[i : i + max_length], "labels": labels[i : i + max_length]}
            for i in range(0, len(ids), max_length)]


class Collator:
    """Right-pads a batch: pad id for inputs, -100 for labels, and the attention mask."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, rows: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            ids[i, :n] = torch.tensor(row["input_ids"])
            labels[i, :n] = torch.tensor(row["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}
