"""Reward models (`--method reward`): a scalar head on the base, trained with LoRA on preference pairs so that the
chosen reply scores above the rejected one (TRL's RewardTrainer, Bradley-Terry loss). The run folder is like any
other; final/ holds the LoRA adapter and the head. Used to score text (`ownllm score`), to measure pairwise
accuracy on held-out pairs (`ownllm eval reward`) and as the reward of online RL (`--reward RUN_DIR`: RLHF).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from ownllm.errors import OwnLLMError
from ownllm.finetune.config import FinetuneConfig
from ownllm.finetune.outcome import TrainingInterrupted, TrainOutcome
from ownllm.finetune.run_folder import (
    final_model_path,
    latest_checkpoint,
    read_record,
)
from ownllm.models.tokenizer_files import save_tokenizer

REWARD_METHOD = "reward"
HEAD_FILE = "ownllm_head.json"
DEFAULT_SCORE_LENGTH = 2048  # runs made before the head file kept their max_length


def base_folder(spec: str) -> str:
    """The base model's HF folder: a head is put on a model folder (an alias, a pulled name or a folder)."""
    from ownllm.models.resolve import resolve

    source = resolve(spec)
    if source.kind != "folder":
        raise OwnLLMError(f"a reward or classification head needs a model folder as its base, and '{spec}' is a "
                          f"{source.kind}", param="model", hint="pull it (ownllm pull) or pass its HF folder")
    return source.location


def head_model(base: str, num_labels: int, *, seed: int = 0, **config: Any) -> tuple[Any, Any]:
    """The base with a fresh sequence-classification head of `num_labels` outputs, and its tokenizer (with a pad
    token: the head reads the last non-pad token). The head starts from `seed` (the Trainer seeds only later)."""
    from transformers import AutoModelForSequenceClassification, set_seed

    from ownllm.models.load import load_tokenizer

    tokenizer = load_tokenizer(base)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    import torch

    # fp32 on a CPU (bf16 there is emulated and imprecise); the base folder's own dtype would be bf16
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    set_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=num_labels, dtype=dtype, **config)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def lora_for_head(cfg: FinetuneConfig) -> Any:
    from peft import LoraConfig

    targets: Any = cfg.lora.targets if cfg.lora.targets == "all-linear" else cfg.lora.targets.split(",")
    return LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=targets, task_type="SEQ_CLS")


def train_reward(cfg: FinetuneConfig, run_dir: Path, data: Path, *, resume: bool, callbacks: list[Any] | None = None
                 ) -> TrainOutcome:
    """Train the reward model on preference pairs; save final/ (adapter + head + run record)."""
    import random

    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    from ownllm.finetune.dataset import load_preference_rows
    from ownllm.finetune.trainer_setup import has_cuda, run_callbacks, trainer_arguments

    rows = load_preference_rows(data, "a reward model")
    if cfg.validation:
        train_rows, eval_rows = rows, load_preference_rows(Path(cfg.validation), "a reward model")
    else:
        random.Random(cfg.seed).shuffle(rows)
        held = round(len(rows) * cfg.val_ratio) if len(rows) >= 10 else 0
        train_rows, eval_rows = rows[held:], rows[:held]
    base = base_folder(cfg.model)
    model, tokenizer = head_model(base, 1, seed=cfg.seed)
    arguments = RewardConfig(**trainer_arguments(cfg, run_dir, has_eval=bool(eval_rows)), bf16=has_cuda(),
                             max_length=cfg.max_length)
    trainer = RewardTrainer(model=model, args=arguments, train_dataset=Dataset.from_list(train_rows),
                            eval_dataset=Dataset.from_list(eval_rows) if eval_rows else None,
                            processing_class=tokenizer, peft_config=lora_for_head(cfg),
                            callbacks=run_callbacks(run_dir))
    return _train_and_save(cfg, run_dir, trainer, tokenizer, base, resume=resume, callbacks=callbacks,
                           has_eval=bool(eval_rows))


def _train_and_save(cfg: FinetuneConfig, run_dir: Path, trainer: Any, tokenizer: Any, base: str, *, resume: bool,
                    callbacks: list[Any] | None, has_eval: bool, extra: dict[str, Any] | None = None
                    ) -> TrainOutcome:
    """The common end of a head run (reward, classify): train with resume, save final/ with the run record."""
    from ownllm.finetune.run_folder import RunRecord, write_record
    from ownllm.finetune.trainer_setup import use_own_callbacks
    from ownllm.home import atomic_folder

    stopper = use_own_callbacks(trainer, callbacks)
    checkpoint = latest_checkpoint(run_dir) if resume else None
    started = time.time()
    output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    if stopper.stopped_at is not None:
        raise TrainingInterrupted(run_dir, stopper.stopped_at)
    eval_loss = trainer.evaluate().get("eval_loss") if has_eval else None
    if trainer.is_world_process_zero():  # once, not once per training process (--nproc)
        with atomic_folder(final_model_path(run_dir)) as staging:
            trainer.model.save_pretrained(staging, safe_serialization=True)
            save_tokenizer(tokenizer, staging)
            head = {"max_length": cfg.max_length, **(extra or {})}  # scoring truncates where training did
            (staging / HEAD_FILE).write_text(json.dumps(head, indent=2), encoding="utf-8")
            write_record(staging, RunRecord(base_model=base, method=cfg.method if cfg.method != "lora" else
                                            "classify", spec=cfg.model))
    return TrainOutcome(output.global_step, float(output.training_loss), eval_loss, time.time() - started,
                        int(trainer.state.num_input_tokens_seen or 0))


def finished_head_run(run: Path, method: str, what: str, how: str, param: str, *, needs_settings: bool = False
                      ) -> Path:
    """final/ of a finished head run (reward model, classifier) whose record says `method`, or an error saying
    what `run` is instead: `what` names the kind of run, `how` the command that makes one. `needs_settings`: its
    HEAD_FILE too (a classifier's labels; reward runs older than the file do without it)."""
    if not run.exists():
        raise OwnLLMError(f"no such folder: {run} (a {what}: {how})", kind="not_found", param=param)
    final = final_model_path(run) if final_model_path(run).is_dir() else run
    record = read_record(final) if final.is_dir() else None
    if record is None or record.method != method or (needs_settings and not (final / HEAD_FILE).is_file()):
        raise OwnLLMError(f"{run} is not a finished {what} ({how})", kind="not_found", param=param)
    return final


def check_reward_run(run: Path) -> Path:
    """final/ of a finished reward-model run, or an error saying what `run` is instead."""
    return finished_head_run(run, REWARD_METHOD, "reward-model run", "ownllm finetune --method reward",
                             "reward_model")


def load_head(final: Path, num_labels: int) -> tuple[Any, Any]:
    """A head run's model (base + head + LoRA merged) in eval mode, and its tokenizer (its model_max_length the
    run's own max_length)."""
    from peft import PeftModel

    from ownllm.models.load import load_tokenizer

    record = read_record(final)
    assert record is not None
    model, _ = head_model(record.base_model, num_labels)
    model = PeftModel.from_pretrained(model, str(final)).merge_and_unload()
    model.eval()
    tokenizer = load_tokenizer(str(final)) if (final / "tokenizer_config.json").is_file() else None
    if tokenizer is not None:
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        # scoring and classifying truncate where training did
        tokenizer.model_max_length = int(head_settings(final).get("max_length", DEFAULT_SCORE_LENGTH))
    return model, tokenizer


def head_settings(final: Path) -> dict[str, Any]:
    """What a head run saved beside its weights: the labels (classifiers), the longest text it trained on."""
    path = final / HEAD_FILE
    if not path.is_file():
        return {}
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise OwnLLMError(f"{path} cannot be read: {error}", param="model") from None
    if not isinstance(settings, dict):
        raise OwnLLMError(f"{path} must hold a JSON object", param="model")
    return settings


def load_reward_model(run: Path) -> tuple[Any, Any]:
    """The reward model of a run, and its tokenizer, ready to score (GRPO takes both as a reward); the tokenizer
    truncates to the run's own max_length."""
    return load_head(check_reward_run(run), 1)


def render(tokenizer: Any, prompt: list[dict[str, str]] | None, reply: str) -> str:
    """A (prompt, reply) pair as the reward model saw it in training: the chat template over both."""
    messages = [*(prompt or []), {"role": "assistant", "content": reply}]
    return tokenizer.apply_chat_template(messages, tokenize=False)


def score_texts(model: Any, tokenizer: Any, texts: list[str], *, batch_size: int = 8, max_length: int | None = None
                ) -> list[float]:
    """The reward of each text (already rendered); a text longer than `max_length` tokens (default: what the run
    trained on, as load_reward_model set it) is scored on its last `max_length` (the answer is at the end), so one
    long text cannot stall the scorer."""
    import torch

    scores: list[float] = []
    tokenizer.truncation_side = "left"
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True,
                          add_special_tokens=False, truncation=True,
                          max_length=max_length or _length_limit(tokenizer))
        with torch.inference_mode():
            scores += model(**batch).logits[:, 0].float().tolist()
    return scores


def _length_limit(tokenizer: Any) -> int:
    limit = tokenizer.model_max_length
    return int(limit) if isinstance(limit, int) and limit < 1_000_000 else DEFAULT_SCORE_LENGTH  # 1e30: unset


def pairwise_accuracy(model: Any, tokenizer: Any, pairs: list[dict[str, Any]]) -> dict[str, Any]:
    """Share of preference pairs whose chosen reply scores above the rejected one, and the mean margin."""
    chosen = score_texts(model, tokenizer, [render(tokenizer, p["prompt"], p["chosen"][0]["content"]) for p in pairs])
    rejected = score_texts(model, tokenizer, [render(tokenizer, p["prompt"], p["rejected"][0]["content"])
                                              for p in pairs])
    wins = [c > r for c, r in zip(chosen, rejected, strict=True)]
    return {"pairs": len(pairs), "pairwise_accuracy": sum(wins) / len(pairs) if pairs else 0.0,
            "mean_margin": sum(c - r for c, r in zip(chosen, rejected, strict=True)) / len(pairs) if pairs else 0.0}
