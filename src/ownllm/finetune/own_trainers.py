"""Runs that train with their own module instead of run.py's trainer: online RL (grpo.py), reward models
(reward_model.py) and classification heads (classify.py). run.py hands them over here; this module is the one
place that knows which module trains what."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ownllm.finetune.config import FinetuneConfig
from ownllm.finetune.outcome import TrainOutcome
from ownllm.finetune.rl_config import HEAD_METHODS


def train_own(cfg: FinetuneConfig, run_dir: Path, data: Path, *, resume: bool, callbacks: list[Any] | None = None
              ) -> TrainOutcome:
    """Train `cfg` with its own module (see own_trainer); returns its TrainOutcome."""
    if cfg.task == "classify":
        from ownllm.finetune.classify import train_classifier

        return train_classifier(cfg, run_dir, data, resume=resume, callbacks=callbacks)
    if cfg.method in HEAD_METHODS:
        from ownllm.finetune.reward_model import train_reward

        return train_reward(cfg, run_dir, data, resume=resume, callbacks=callbacks)
    from ownllm.finetune.grpo import train_rl

    return train_rl(cfg, run_dir, data, resume=resume, callbacks=callbacks)
_FILE_PREFIXES = ("json-schema:", "sql-exec:")
