"""Replay against forgetting: the base model's own answers to general prompts, mixed into the training data.

Training on a narrow fact set pulls the whole model towards it; general questions the base answered well start
getting fact-set answers. Adding the base's greedy replies to unrelated prompts (self-distillation replay) keeps
those behaviours in the loss. The replies are made once per run and kept in the run folder, so resume reuses them.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from ownllm.data.files import read_text_file
from ownllm.errors import OwnLLMError
from ownllm.finetune.checks import ANSWER_BATCH
from ownllm.finetune.run_folder import REPLAY_FILE
from ownllm.generate.params import SamplingParams
from ownllm.home import atomic_write_text


def replay_prompts(path: str | None) -> list[str]:
    """One prompt per line: the given file, or the general questions shipped with ownllm."""
    if path is None:
        text = resources.files("ownllm.finetune").joinpath("replay_prompts.txt").read_text(encoding="utf-8")
    elif not Path(path).exists():
        raise OwnLLMError(f"no such replay prompts file: {path}", kind="not_found", param="replay_prompts")
    else:
        text = read_text_file(Path(path), param="replay_prompts")
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise OwnLLMError(f"{path}: no replay prompts (one per line)", param="replay_prompts")
    return prompts


def replay_count(replay: int | None, ratio: float, training_examples: int) -> int:
    """How many replay prompts: `replay` if given (0: none), else `ratio` per training example."""
    import math

    return replay if replay is not None else math.ceil(ratio * training_examples)


def replay_rows(cfg: Any, training_examples: int) -> int:
    """How many replay rows a run of `cfg` adds to each epoch (0 where it does not replay)."""
    if not cfg.replaying:
        return 0
    return min(replay_count(cfg.replay, cfg.replay_ratio, training_examples), len(replay_prompts(cfg.replay_prompts)))


def replay_answers(engine: Any, prompts: list[str], *, distilled: bool = True, max_tokens: int = 0,
                   batch_size: int = ANSWER_BATCH) -> dict[str, list[dict[str, str]] | None]:
    """Each prompt's chat example of the base model answering it (greedy), or None where it is not replayed.
    Replayed as text (`distilled` False), replies cut off by the length limit are left out, so the model is not
    taught to stop mid-sentence; distilled, the base's own distribution says what follows a cut, so shorter replies
    are kept whole or cut alike (what matters is the positions, not the ending). One answer per distinct prompt."""
    distinct = list(dict.fromkeys(prompts))
    params = SamplingParams(max_new_tokens=max_tokens or (32 if distilled else 160))
    rendered = [engine.render_chat([{"role": "user", "content": p}]) for p in distinct]
    answers: dict[str, list[dict[str, str]] | None] = {}
    for prompt, completion in zip(distinct, engine.generate_batch(rendered, params, max_batch=batch_size),
                                  strict=True):
        kept = (distilled or completion.finish_reason == "stop") and completion.text.strip()
        answers[prompt] = [{"role": "user", "content": prompt},
                           {"role": "assistant", "content": completion.text.strip()}] if kept else None
    return answers


def write_replay(run_dir: Path, conversations: list[list[dict[str, str]]]) -> None:
    atomic_write_text(run_dir / REPLAY_FILE, "".join(json.dumps({"messages": m}) + "\n" for m in conversations))
