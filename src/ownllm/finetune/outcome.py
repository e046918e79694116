"""What one training pass ends with, shared by the recipe (run.py) and the multi-process launcher
(distributed.py), so that neither has to import the other for it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ownllm.errors import OwnLLMError
from ownllm.finetune.run_folder import checkpoints_path


@dataclass
class TrainOutcome:
    steps: int
    train_loss: float
    eval_loss: float | None
    seconds: float
    trained_tokens: int
    notes: list[str] = field(default_factory=list)  # how it trained where the config leaves a choice (the card says)


class TrainingInterrupted(OwnLLMError):
    """Ctrl-C or SIGTERM: the run stopped at a step boundary and saved a checkpoint."""

    def __init__(self, run_dir: Path, step: int) -> None:
        super().__init__(f"stopped at step {step}; checkpoint saved in {checkpoints_path(run_dir)}",
                         kind="interrupted", hint=f"continue with the same command and --resume (run {run_dir})")
        self.step = step
