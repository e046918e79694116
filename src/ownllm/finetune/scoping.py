"""A fact-teaching run's adapter scope (ownllm.models.scope), calibrated on its own data when training ends."""

from __future__ import annotations

import logging
from pathlib import Path

from ownllm.data.doctor import read_examples
from ownllm.finetune.config import FinetuneConfig
from ownllm.finetune.replay import replay_prompts
from ownllm.models.scope import SCOPE_FILE, AdapterScope, user_texts

log = logging.getLogger(__name__)
SCOPED_METHODS = ("lora", "qlora")


def scope_adapter(cfg: FinetuneConfig, data: Path, final: Path) -> str | None:
    """Write final/'s scope when `cfg.scope` is auto and the data is fact-style (supervised chat without tools,
    its prompts apart from general ones); the run card's line about it, or None when scoping does not apply."""
    if cfg.scope != "auto" or cfg.method not in SCOPED_METHODS or cfg.task != "generate":
        return None
    if (final / SCOPE_FILE).is_file():  # a resumed run's finish: already calibrated on the same data
        scope = AdapterScope.load(final)
        return f"scope: {scope.describe()}" if scope is not None else None
    _, examples, _ = read_examples(data)
    if any(example.tools for example in examples):
        return "scope: none (tool-calling data teaches a behaviour for every prompt): the adapter applies to all"
    prompts = [text for example in examples if example.messages for text in user_texts(example.messages)]
    scope = AdapterScope.calibrate(prompts, replay_prompts(cfg.replay_prompts))
    if isinstance(scope, str):
        return f"scope: none ({scope})"
    scope.save(final)
    log.info("adapter scope: %s", scope.describe())
    return f"scope: {scope.describe()} (cosine {scope.inside:.2f} between paraphrases, {scope.outside:.2f} to the " \
           "nearest general prompt)"
