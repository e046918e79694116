"""Text classification (`--task classify`): a sequence-classification head on the base, trained with LoRA on
JSONL lines {"text": ..., "label": ...} (transformers' Trainer). The run folder is like any other; final/ holds the
adapter, the head and the label names (ownllm_head.json). `ownllm classify RUN "text"` gives the label and the
probabilities; `ownllm eval classify` accuracy, macro-F1 and a confusion-matrix PNG.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ownllm.data.jsonl import fail_if_any, read_jsonl
from ownllm.errors import OwnLLMError
from ownllm.finetune.config import FinetuneConfig
from ownllm.finetune.outcome import TrainOutcome
from ownllm.finetune.reward_model import (
    HEAD_FILE,
    _train_and_save,
    base_folder,
    finished_head_run,
    head_model,
    head_settings,
    load_head,
    lora_for_head,
)


@dataclass(frozen=True)
class Labelled:
    line: int
    text: str
    label: str


def read_labelled(path: Path, *, labels_needed: bool = True) -> list[Labelled]:
    """{"text", "label"} lines; a line without either is named with file and line (labels as text: 1 and "1" are
    the same label)."""
    items, problems = [], []
    for record in read_jsonl(path):
        data, where = record.data, f"{path.name} line {record.line}"
        text, label = data.get("text"), data.get("label")
        if not isinstance(text, str) or not text.strip():
            problems.append(f"{where}: needs 'text' (a non-empty string)")
            continue
        if isinstance(label, bool) or not isinstance(label, str | int) or str(label).strip() == "":
            if labels_needed:
                problems.append(f"{where}: needs 'label' (a string or a whole number)")
                continue
            label = ""
        items.append(Labelled(record.line, text, str(label).strip()))
    fail_if_any(problems)
    if not items:
        raise OwnLLMError(f"{path}: no labelled lines", param="data")
    return items


def train_classifier(cfg: FinetuneConfig, run_dir: Path, data: Path, *, resume: bool,
                     callbacks: list[Any] | None = None) -> TrainOutcome:
    from peft import get_peft_model
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    from ownllm.finetune.lora_dropout import use_quick_dropout
    from ownllm.finetune.trainer_setup import run_callbacks, trainer_arguments

    items = read_labelled(data)
    if cfg.validation:
        train_items, eval_items = items, read_labelled(Path(cfg.validation))
    else:
        shuffled = items[:]
        random.Random(cfg.seed).shuffle(shuffled)
        held = round(len(shuffled) * cfg.val_ratio) if len(shuffled) >= 10 else 0
        train_items, eval_items = shuffled[held:], shuffled[:held]
    labels = sorted({item.label for item in train_items})
    if len(labels) < 2:
        raise OwnLLMError(f"{data}: a classifier needs at least two labels, found {labels}", param="data")
    unknown = sorted({i.label for i in eval_items} - set(labels))
    if unknown:
        raise OwnLLMError(f"validation labels never seen in training: {', '.join(unknown)}", param="validation")
    index = {label: number for number, label in enumerate(labels)}
    base = base_folder(cfg.model)
    model, tokenizer = head_model(base, len(labels), seed=cfg.seed, id2label=dict(enumerate(labels)), label2id=index)
    model = get_peft_model(model, lora_for_head(cfg))
    use_quick_dropout(model)

    def encode(batch: list[Labelled]) -> list[dict[str, Any]]:
        return [{**tokenizer(i.text, truncation=True, max_length=cfg.max_length), "labels": index[i.label]}
                for i in batch]

    arguments = TrainingArguments(**trainer_arguments(cfg, run_dir, has_eval=bool(eval_items)),
                                  remove_unused_columns=False, include_num_input_tokens_seen="non_padding")
    trainer = Trainer(model=model, args=arguments, train_dataset=encode(train_items),
                      eval_dataset=encode(eval_items) or None, data_collator=DataCollatorWithPadding(tokenizer),
                      callbacks=run_callbacks(run_dir))
    return _train_and_save(cfg, run_dir, trainer, tokenizer, base, resume=resume, callbacks=callbacks,
                           has_eval=bool(eval_items), extra={"labels": labels})


class Classifier:
    """A classification run's model, ready to label text."""

    def __init__(self, run: Path) -> None:
        final = finished_head_run(run, "classify", "classification run", "ownllm finetune --task classify", "model",
                                  needs_settings=True)
        settings = head_settings(final)
        labels = settings.get("labels")
        if not isinstance(labels, list) or len(labels) < 2 or not all(isinstance(x, str) for x in labels):
            raise OwnLLMError(f"{final / HEAD_FILE}: 'labels' must list the classifier's label names",
                              param="model")
        self.labels: list[str] = labels
        self.model, self.tokenizer = load_head(final, len(self.labels))
        self.max_length: int = self.tokenizer.model_max_length  # what the head was trained on (load_head set it)

    def classify(self, texts: list[str], *, batch_size: int = 8, max_length: int | None = None
                 ) -> list[tuple[str, dict[str, float]]]:
        """(label, {label: probability}) per text; a text longer than `max_length` tokens (default: the run's own
        max_length) is classified on its first `max_length`."""
        import torch

        out = []
        for start in range(0, len(texts), batch_size):
            batch = self.tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True,
                                   truncation=True, max_length=max_length or self.max_length)
            with torch.inference_mode():
                probabilities = torch.softmax(self.model(**batch).logits.float(), dim=-1).tolist()
            for row in probabilities:
                best = max(range(len(row)), key=row.__getitem__)
                out.append((self.labels[best], {label: round(p, 6) for label, p in zip(self.labels, row,
                                                                                     strict=True)}))
        return out


def evaluate_classifier(classifier: Classifier, items: list[Labelled], plot: Path | None = None
                        ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Accuracy, macro-F1 and the majority-class baseline; per-item rows; the confusion matrix drawn to `plot`."""
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

    predicted = [label for label, _ in classifier.classify([i.text for i in items])]
    gold = [i.label for i in items]
    majority = max(set(gold), key=gold.count)
    labels = sorted(set(classifier.labels) | set(gold))
    summary = {"items": len(items), "accuracy": float(accuracy_score(gold, predicted)),
               "macro_f1": float(f1_score(gold, predicted, labels=labels, average="macro", zero_division=0)),
               "majority_class": majority, "majority_accuracy": gold.count(majority) / len(gold)}
    if plot is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from sklearn.metrics import ConfusionMatrixDisplay

        matrix = confusion_matrix(gold, predicted, labels=labels)
        fig, axis = plt.subplots(figsize=(1.2 * len(labels) + 3, 1.2 * len(labels) + 2))
        ConfusionMatrixDisplay(matrix, display_labels=labels).plot(ax=axis, colorbar=False)
        axis.set_title(f"accuracy {summary['accuracy']:.1%}, macro-F1 {summary['macro_f1']:.3f}")
        fig.tight_layout()
        staging = plot.with_name(f".{plot.name}.tmp.png")
        fig.savefig(staging, dpi=100)
        plt.close(fig)
        staging.replace(plot)
    rows = [{"line": i.line, "text": i.text, "label": i.label, "predicted": p} for i, p in
            zip(items, predicted, strict=True)]
    return summary, rows
