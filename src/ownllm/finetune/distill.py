"""Replay by distillation: keep the tuned model's next-token distribution on general text close to the base's.

Greedy-answer replay teaches the base's single most likely token at each position; distillation teaches its whole
distribution (what else it considered, and how sure it was), which holds far more of what the model knew per
trained token. The base's distribution is read once before training — with LoRA the model before its first step
*is* the base — and kept as its top-k tokens plus one bucket for the rest of the vocabulary, so the KL term costs
no second model and no extra forward per step.

Also here: the training loss computes logits only where a label is learned (the vocabulary projection over every
prompt token is a fifth of a small model's work and none of it trains anything).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from ownllm.finetune.dataset import IGNORE, Collator

TOP_K = 32  # teacher tokens kept per position; past these, the base's remaining mass is one bucket


def learned_positions(labels: torch.Tensor) -> torch.Tensor:
    """[batch, length] bool: the positions whose logits predict a learned label (the label one step later)."""
    positions = torch.zeros_like(labels, dtype=torch.bool)
    positions[:, :-1] = labels[:, 1:] != IGNORE
    return positions


@contextmanager
def logits_only_at(model: Any, positions: torch.Tensor) -> Iterator[None]:
    """While active, the model's output projection sees only the hidden states at `positions`, so its logits come
    out as [selected positions, vocabulary] in row-major order."""

    def select(_module: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (args[0][positions], *args[1:])

    handle = model.get_output_embeddings().register_forward_pre_hook(select)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def teacher_targets(model: Any, rows: list[dict[str, Any]], pad_id: int, *, batch_size: int = 8,
                    mixed_bf16: bool = False) -> dict[str, torch.Tensor]:
    """The base model's top-k next-token log-probabilities at every learned position of `rows`, concatenated in
    row order ({"ids", "logprobs", "counts": positions per row}). `model` must still be the base: called before
    the first training step. `mixed_bf16`: under the bf16 autocast the training steps run in, so that the KL term
    starts near zero (the student before its first step is this forward, not an fp32 one), and twice as fast
    where this CPU's bf16 matmuls are."""
    was_training = model.training
    model.eval()
    collate = Collator(pad_id)
    # batched by length (each batch is padded to its longest row), handed back in the rows' own order
    order = sorted(range(len(rows)), key=lambda index: len(rows[index]["input_ids"]))
    per_row: list[tuple[torch.Tensor, torch.Tensor]] = [(torch.empty(0), torch.empty(0))] * len(rows)
    try:
        for start in range(0, len(rows), batch_size):
            chosen = order[start : start + batch_size]
            batch = collate([rows[index] for index in chosen])
            positions = learned_positions(batch["labels"])
            with logits_only_at(model, positions), torch.autocast(model.device.type, dtype=torch.bfloat16,
                                                                  enabled=mixed_bf16):
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            top = logits.float().log_softmax(-1).topk(TOP_K, dim=-1)
            counts = positions.sum(-1).tolist()
            for index, row_ids, row_logprobs in zip(chosen, top.indices.to(torch.int32).split(counts),
                                                    top.values.split(counts), strict=True):
                per_row[index] = (row_ids, row_logprobs)
    finally:
        model.train(was_training)
    return {"ids": torch.cat([row_ids for row_ids, _ in per_row]),
            "logprobs": torch.cat([row_logprobs for _, row_logprobs in per_row]),
            "counts": torch.tensor([len(row_ids) for row_ids, _ in per_row])}


def _learned_counts(rows: list[dict[str, Any]]) -> list[int]:
    """How many learned positions each row has: how many teacher targets it takes."""
    return [sum(label != IGNORE for label in row["labels"][1:]) for row in rows]


def teacher_fits(rows: list[dict[str, Any]], targets: dict[str, Any], vocabulary: int) -> bool:
    """Whether `targets` are well-formed top-k targets for exactly these rows (a kept copy may be damaged)."""
    try:
        ids, logprobs, counts = targets["ids"], targets["logprobs"], targets["counts"]
        return (ids.dtype == torch.int32 and logprobs.dtype == torch.float32 and ids.ndim == 2
                and ids.shape == logprobs.shape and ids.shape[1] == TOP_K
                and counts.tolist() == _learned_counts(rows)
                and int(ids.shape[0]) == sum(counts.tolist()) and bool(((ids >= 0) & (ids < vocabulary)).all())
                and bool(torch.isfinite(logprobs).all()) and bool((logprobs <= 0).all()))
    except (KeyError, AttributeError, TypeError, RuntimeError):
        return False


def attach_teacher(rows: list[dict[str, Any]], targets: dict[str, torch.Tensor]) -> None:
    """Give each row its share of `targets` (in place); a mismatch (targets of other rows) is an error."""
    counts = targets["counts"].tolist()
    if counts != _learned_counts(rows):
        raise ValueError("teacher targets do not match the replay rows")
    for row, ids, logprobs in zip(rows, targets["ids"].split(counts), targets["logprobs"].split(counts),
                                  strict=True):
        row["teacher_ids"], row["teacher_logprobs"] = ids, logprobs


def kl_to_teacher(logits: torch.Tensor, teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor) -> torch.Tensor:
    """KL(base || model) per position over the base's top-k tokens and one bucket for all others: [positions]."""
    log_total = logits.logsumexp(-1)
    model_top = logits.gather(-1, teacher_ids) - log_total[:, None]
    model_rest = logits.scatter(-1, teacher_ids, float("-inf")).logsumexp(-1) - log_total
    teacher_top = teacher_logprobs.exp()
    teacher_rest = (1 - teacher_top.sum(-1)).clamp_min(1e-9)
    return ((teacher_top * (teacher_logprobs - model_top)).sum(-1)
            + teacher_rest * (teacher_rest.log() - model_rest))


class TeacherCollator(Collator):
    """Right-padded batches as Collator makes them, plus the teacher targets of the rows that have them,
    concatenated in row order, and which rows those are."""

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = super().__call__(rows)
        taught = [row for row in rows if "teacher_ids" in row]
        batch["teacher_rows"] = torch.tensor(["teacher_ids" in row for row in rows])
        batch["teacher_ids"] = (torch.cat([r["teacher_ids"] for r in taught]).long() if taught
                                else torch.zeros((0, TOP_K), dtype=torch.long))
        batch["teacher_logprobs"] = (torch.cat([r["teacher_logprobs"] for r in taught]) if taught
                                     else torch.zeros((0, TOP_K)))
        return batch


def distill_trainer_class() -> type:
    """transformers' Trainer with a loss that is cross-entropy on the training data's learned tokens and
    `replay_weight` x KL to the base on replay rows, logits computed only where learned."""
    from transformers import Trainer

    class DistillTrainer(Trainer):
        replay_weight: float = 1.0

        def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            labels = inputs.pop("labels")
            teacher_rows = inputs.pop("teacher_rows")
            teacher_ids, teacher_logprobs = inputs.pop("teacher_ids"), inputs.pop("teacher_logprobs")
            positions = learned_positions(labels)
            with logits_only_at(self.accelerator.unwrap_model(model), positions):
                outputs = model(**inputs)
            logits = outputs.logits.float()
            targets = labels[:, 1:][positions[:, :-1]]
            taught = teacher_rows[:, None].expand_as(positions)[positions]
            total = torch.nn.functional.cross_entropy(logits[~taught], targets[~taught], reduction="sum")
            if taught.any():
                kl = kl_to_teacher(logits[taught], teacher_ids, teacher_logprobs)
                total = total + self.replay_weight * kl.sum()
            if num_items_in_batch is None:
                loss = total / max(1, int(positions.sum()))
            else:  # as transformers scales its own loss: over the whole accumulated (and gathered) batch
                loss = total / num_items_in_batch
                if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
                    loss = loss * self.accelerator.num_processes
            return (loss, outputs) if return_outputs else loss

    return DistillTrainer
