"""The online-RL part of the fine-tuning config (methods grpo and rloo): its checks and its file paths.

Kept apart from config.py, which calls in here, so that the RL settings are checked in one place.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

RL_METHODS = ("grpo", "rloo")
HEAD_METHODS = ("reward",)  # a scalar head trained on preference pairs (reward_model.py)
ROLLOUT_ENGINES = ("auto", "ownllm", "trl")  # who samples the completions (grpo.py, rollouts.py)
TASKS = ("generate", "classify")  # classify: a classification head + LoRA on {"text", "label"} lines (classify.py)


_FILE_PREFIXES = ("json-schema:", "sql-exec:")  # reward specs that name a file


def own_trainer(cfg: Any) -> bool:
    """Runs that train with their own module (grpo.py, reward_model.py, classify.py), not run.py's trainer."""
    return cfg.method in RL_METHODS or cfg.method in HEAD_METHODS or cfg.task == "classify"


def rl_problems(cfg: Any) -> list[str]:
    """What is wrong with the RL settings of `cfg` (a FinetuneConfig); nothing for the other methods unless an RL
    setting is given to one of them."""
    problems = []
    rewards = cfg.reward_fn
    if not isinstance(rewards, list) or not all(isinstance(r, str) and r.strip() for r in rewards):
        problems.append("reward_fn must be a list of reward function names (exact, regex:PATTERN, file.py:function"
                        ", ...)")
        rewards = []
    if cfg.reward_model is not None and (not isinstance(cfg.reward_model, str) or not cfg.reward_model):
        problems.append("reward_model must name a reward-model run folder")
    for name in ("num_generations", "max_completion_length"):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            problems.append(f"{name} must be a whole number of at least 1, got {value!r}")
    if isinstance(cfg.num_generations, int) and cfg.num_generations == 1 and cfg.method in RL_METHODS:
        problems.append("num_generations must be at least 2: GRPO and RLOO compare completions of the same prompt")
    for name in ("rl_beta", "temperature"):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
            problems.append(f"{name} must be a number of 0 or more, got {value!r}")
    if isinstance(cfg.temperature, int | float) and cfg.temperature == 0 and cfg.method in RL_METHODS:
        problems.append("temperature must be above 0: greedy completions of one prompt are all the same")
    if cfg.rollouts not in ROLLOUT_ENGINES:
        problems.append(f"rollouts must be one of {', '.join(ROLLOUT_ENGINES)}, got {cfg.rollouts!r}")
    if cfg.task not in TASKS:
        problems.append(f"task must be one of {', '.join(TASKS)}, got {cfg.task!r}")
    elif cfg.task == "classify" and cfg.method != "lora":
        problems.append(f"task classify trains a head with LoRA: method lora, not {cfg.method}")
    if cfg.method in RL_METHODS:
        if not rewards and not cfg.reward_model:
            problems.append(f"method {cfg.method} needs a reward: --reward-fn NAME and/or --reward RUN_DIR")
        if cfg.packing:
            problems.append(f"packing does not apply to method {cfg.method}")
    elif rewards or cfg.reward_model:
        problems.append("reward_fn and reward_model go with method grpo or rloo")
    elif cfg.reference_guidance:
        problems.append("reference_guidance goes with method grpo or rloo")
    return problems


def place_reward_files(folder: Path, values: dict[str, Any]) -> dict[str, Any]:
    """Files a config file names in its rewards are found next to it, like its data."""

    def place(name: str) -> str:
        return name if Path(name).is_absolute() else str((folder / name).resolve())

    rewards = values.get("reward_fn")
    if isinstance(rewards, list):
        placed = []
        for spec in rewards:
            if isinstance(spec, str):
                prefix = next((p for p in _FILE_PREFIXES if spec.startswith(p)), None)
                if prefix:
                    spec = prefix + place(spec[len(prefix):])
                elif ".py:" in spec:
                    file, _, function = spec.rpartition(":")
                    spec = f"{place(file)}:{function}"
            placed.append(spec)
        values["reward_fn"] = placed
    if isinstance(values.get("reward_model"), str) and values["reward_model"]:
        values["reward_model"] = place(values["reward_model"])
    return values
