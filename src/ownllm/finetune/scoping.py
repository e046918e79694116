"""A fact-teaching run's adapter scope (ownllm.models.scope), calibrated on its own data when training ends."""

from __future__ import annotations

import functools
import itertools
import logging
from pathlib import Path

from ownllm.data.doctor import read_examples
from ownllm.data.formats import Example
from ownllm.finetune.config import FinetuneConfig
from ownllm.finetune.dataset import system_message
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
    scope = fact_style(cfg, data)
    if isinstance(scope, str):
        return f"scope: none ({scope})"
    if cfg.recall != "auto":
        scope = scope.without_recall()
    scope.save(final)
    log.info("adapter scope: %s", scope.describe())
    kept = f" Its {len(scope.recall)} training examples are kept, as written, in {SCOPE_FILE} (recall: off keeps " \
        "none)." if scope.recall else ""
    return f"scope: {scope.describe()} (cosine {scope.inside:.2f} between paraphrases, {scope.outside:.2f} to the " \
           f"nearest general prompt).{kept}"


def fact_style(cfg: FinetuneConfig, data: Path) -> AdapterScope | str:
    """The scope of a file of chat examples, whose being there makes the data fact-style (questions that stand
    apart from general ones, as paraphrases of a few facts do), or why it is not: tool calls, or prompts too
    close to general ones (style and instruction data). Calibrated once per file version in a process (a run asks
    when it starts and when it ends)."""
    prompts = Path(cfg.replay_prompts) if cfg.replay_prompts else None
    return _fact_style(str(data.resolve()), _version(data), cfg.replay_prompts, _version(prompts))


def _version(path: Path | None) -> tuple[int, int] | None:
    """What tells one version of a file from the next, for the cache: modified time and size."""
    if path is None or not path.is_file():
        return None
    stat = path.stat()
    return stat.st_mtime_ns, stat.st_size


@functools.lru_cache(maxsize=4)
def _fact_style(data: str, data_version: tuple[int, int] | None, prompts_file: str | None,
                prompts_version: tuple[int, int] | None) -> AdapterScope | str:
    _, examples, _ = read_examples(Path(data))
    if any(example.tools for example in examples):
        return "tool-calling data teaches a behaviour for every prompt: the adapter applies to all"
    prompts = [text for example in examples if example.messages for text in user_texts(example.messages)]
    return AdapterScope.calibrate(prompts, replay_prompts(prompts_file), answers=_answers(examples))


def _answers(examples: list[Example]) -> dict[str, str]:
    """Each user message's answer in the data (the assistant message after it), by its text stripped; the first
    where a prompt is written more than once."""
    answers: dict[str, str] = {}
    for example in examples:
        messages = example.messages or []
        for message, reply in itertools.pairwise(messages):
            if (message.get("role") == "user" and reply.get("role") == "assistant"
                    and isinstance(message.get("content"), str) and isinstance(reply.get("content"), str)
                    and reply["content"].strip()):
                answers.setdefault(message["content"].strip(), reply["content"])
    return answers


def varies_system(cfg: FinetuneConfig, data: Path) -> bool:
    """Whether a run's training examples are seen under varied system messages (finetune.dataset.system_variants):
    `system_variants: auto` on fact-style chat data with system messages, supervised (not DPO, prompt tuning or
    packed rows)."""
    if (cfg.system_variants != "auto" or cfg.method not in (*SCOPED_METHODS, "full") or cfg.task != "generate"
            or cfg.packing or not data.is_file()):
        return False
    _, examples, _ = read_examples(data)
    if not any(example.messages and system_message(example.messages) is not None for example in examples):
        return False
    return not isinstance(fact_style(cfg, data), str)
