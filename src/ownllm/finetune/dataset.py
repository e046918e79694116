"""Training rows: token ids with labels that are -100 everywhere but the assistant's replies (its tool calls
included: conversations with tools render as the server renders them, ownllm.models.tool_template).

SmolLM2's chat template has no generation markers, so the mask comes from rendering the conversation turn by
turn (`assistant_token_mask`); plain text (continued pretraining) learns every token.
"""

from __future__ import annotations

from dataclasses import replace
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
    return [variants[0] for variants in load_varied_rows(path, tokenizer, max_length, epochs=0)]


def load_varied_rows(path: Path, tokenizer: Any, max_length: int, epochs: int) -> list[list[dict[str, list[int]]]]:
    """`load_rows`, each row as seen in each of `epochs` epochs (`system_variants`; 0: the row as written only).
    The even epochs' rows are the one encoding as written; a variant that leaves nothing to learn within
    `max_length` (a longer system message) is seen as written too."""
    _, examples, problems = read_examples(path)
    if problems:
        raise OwnLLMError(f"{path}: {len(problems)} unusable line(s), first: {problems[0]}", param="data",
                          hint=f"run: ownllm data check {path}")
    exact, near = find_duplicates(examples)
    duplicate_lines = {line for line, _ in exact + near}
    kept = [e for e in examples if e.line not in duplicate_lines]
    varied = system_variants([e.messages or [] for e in kept], epochs) if epochs else [[] for _ in kept]
    rows = []
    for example, seen in zip(kept, varied, strict=True):
        written = encode(example, tokenizer, max_length)
        if not _learns(written):
            continue
        row = [written]
        for messages in seen[1:]:
            variant = written if messages is example.messages else encode(replace(example, messages=messages),
                                                                          tokenizer, max_length)
            row.append(variant if _learns(variant) else written)
        rows.append(row)
    if not rows:
        raise OwnLLMError(f"{path}: nothing to learn (no assistant tokens within max_length)", param="data")
    return rows


def _learns(row: dict[str, list[int]]) -> bool:
    return any(label != IGNORE for label in row["labels"][1:])


def system_variants(conversations: list[list[dict[str, Any]]], epochs: int) -> list[list[list[dict[str, Any]]]]:
    """Each conversation as it is seen in each of `epochs` epochs: as written in the even ones, and in the odd ones
    under another system message the data uses, or none (the template's default), in turn, so that the facts it
    teaches do not hang on the system message they were written under: users ask under their own. Data without a
    system message stays as written (a generic one in its place measured no better). For fact-style data only
    (finetune.scoping.fact_style): a style dataset's system message is what tells its answers apart."""
    systems = {system_message(conversation) for conversation in conversations}
    if systems == {None}:
        return [[conversation] * epochs for conversation in conversations]
    options = sorted(systems | {None}, key=lambda text: text or "")
    varied = []
    for index, conversation in enumerate(conversations):
        own = system_message(conversation)
        others = [text for text in options if text != own]
        varied.append([conversation if epoch % 2 == 0 else _with_system(conversation, others[(index + epoch // 2)
                                                                                           % len(others)])
                       for epoch in range(epochs)])
    return varied


def system_message(conversation: list[dict[str, Any]]) -> str | None:
    """A conversation's leading system message, when it is plain text."""
    first = conversation[0] if conversation else {}
    return first.get("content") if first.get("role") == "system" and isinstance(first.get("content"), str) else None


def _with_system(conversation: list[dict[str, Any]], system: str | None) -> list[dict[str, Any]]:
    rest = conversation[1:] if conversation and conversation[0].get("role") == "system" else conversation
    return ([{"role": "system", "content": system}] if system is not None else []) + rest


class EpochRows:
    """Training rows whose content depends on the epoch (`system_variants`): row i of epoch k is `rows[i][k]`, in
    turn once k runs past them (an even number of variants keeps even epochs as written when `max_steps` runs
    more epochs); `VariantEpochs` (a trainer callback) sets the epoch as each one begins."""

    def __init__(self, rows: list[list[dict[str, Any]]]) -> None:
        self.rows = rows
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        variants = self.rows[index]
        return variants[self.epoch % len(variants)]

    def __add__(self, other: list[dict[str, Any]]) -> EpochRows:
        return EpochRows(self.rows + [[row] for row in other])

    def epoch_rows(self, epoch: int) -> list[dict[str, Any]]:
        return [variants[epoch % len(variants)] for variants in self.rows]


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
