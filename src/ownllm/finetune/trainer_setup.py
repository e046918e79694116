"""What every method's trainer shares: ownllm's config mapped onto transformers' TrainingArguments (one mapping,
for run.py's SFT/DPO trainers and the reward, classification and online-RL modules alike), and ownllm's callbacks in
place of transformers' printers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ownllm.finetune.config import FinetuneConfig
from ownllm.finetune.run_folder import METRICS_FILE, checkpoints_path


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def trainer_arguments(cfg: FinetuneConfig, run_dir: Path, *, has_eval: bool) -> dict[str, Any]:
    """TrainingArguments (or a TRL config's) keywords every method shares: batch, schedule, checkpoints every
    `save_every` steps (two kept), seeds, a step logged each step, CPU unless a GPU is there, no tqdm, and no
    gradient checkpointing: TRL's configs turn it on (memory bought with a second forward), but these models are
    small and memory is not what is short (a DPO step took ~20% longer with it)."""
    return dict(
        output_dir=str(checkpoints_path(run_dir)), per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr, num_train_epochs=cfg.epochs, max_steps=cfg.max_steps if cfg.max_steps > 0 else -1,
        lr_scheduler_type=cfg.scheduler, warmup_steps=cfg.warmup_ratio, logging_steps=1,
        eval_strategy="steps" if has_eval else "no", eval_steps=cfg.eval_every, save_strategy="steps",
        save_steps=cfg.save_every, save_total_limit=2, seed=cfg.seed, data_seed=cfg.seed, report_to=[],
        use_cpu=not has_cuda(), dataloader_num_workers=0, disable_tqdm=True, activation_checkpointing=False)


def run_callbacks(run_dir: Path) -> list[Any]:
    """metrics.jsonl, the progress bar, and a clean stop (with a checkpoint) on SIGTERM/SIGINT."""
    from ownllm.finetune.callbacks import MetricsLog, ProgressBar, StopOnSignal

    return [MetricsLog(run_dir / METRICS_FILE), ProgressBar(), StopOnSignal()]


def use_own_callbacks(trainer: Any, extra: list[Any] | None = None) -> Any:
    """Drop transformers' printers (ownllm's ProgressBar shows the same, more compactly), add `extra`; returns the
    trainer's StopOnSignal, which says whether a signal stopped the run."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from ownllm.finetune.callbacks import StopOnSignal

    for default in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(default)
    for callback in extra or []:
        trainer.add_callback(callback)
    return next(c for c in trainer.callback_handler.callbacks if isinstance(c, StopOnSignal))
