"""`ownllm score` and `ownllm classify`: use a reward-model run or a classification run on your text."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from ownllm.cli.options import JsonOpt, quiet_model_libraries
from ownllm.errors import OwnLLMError, check_text

RunArg = Annotated[Path, typer.Argument(help="the run folder (or its final/)")]
TextsArg = Annotated[list[str], typer.Argument(help="text(s) to score")]


def score(
    run: RunArg,
    texts: TextsArg,
    prompt: Annotated[str | None, typer.Option(help="the user turn the text answers (scored as a chat)")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Print the reward a reward-model run (ownllm finetune --method reward) gives each text."""
    for text in texts + ([prompt] if prompt else []):
        check_text(text, "text")
        if not text.strip():
            raise OwnLLMError("text is empty: give the text to score", param="text")
    from ownllm.finetune.reward_model import check_reward_run

    check_reward_run(run)
    quiet_model_libraries()
    from ownllm.cli.render import out
    from ownllm.finetune.reward_model import load_reward_model, render, score_texts

    model, tokenizer = load_reward_model(run)
    turns = [{"role": "user", "content": prompt}] if prompt else None
    rewards = score_texts(model, tokenizer, [render(tokenizer, turns, text) for text in texts])
    if as_json:
        out.print_json(json.dumps([{"text": t, "reward": r} for t, r in zip(texts, rewards, strict=True)]))
        return
    for text, reward in zip(texts, rewards, strict=True):
        out.print(f"{reward:+.4f}  {text}", markup=False, highlight=False)


def classify(
    run: RunArg,
    texts: TextsArg,
    as_json: JsonOpt = False,
) -> None:
    """Print the label (and its probability) a classification run (ownllm finetune --task classify) gives each
    text."""
    for text in texts:
        check_text(text, "text")
        if not text.strip():
            raise OwnLLMError("text is empty: give the text to classify", param="text")
    from ownllm.finetune.classify import Classifier

    quiet_model_libraries()
    from ownllm.cli.render import out

    classifier = Classifier(run)
    results = classifier.classify(texts)
    if as_json:
        out.print_json(json.dumps([{"text": t, "label": label, "probabilities": probabilities}
                                   for t, (label, probabilities) in zip(texts, results, strict=True)]))
        return
    for text, (label, probabilities) in zip(texts, results, strict=True):
        out.print(f"{label} ({probabilities[label]:.1%})  {text}", markup=False, highlight=False)
