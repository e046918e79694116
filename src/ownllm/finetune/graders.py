"""OpenAI's reinforcement fine-tuning graders as reward functions (`--reward-fn openai-grader:FILE.json`, and
`method: {"type": "reinforcement"}` in the fine-tuning jobs API).

What maps:

    string_check       input, reference, operation eq | ne | like (contains) | ilike (contains, any case): 1.0 or 0.0
    text_similarity    input, reference, evaluation_metric fuzzy_match (difflib's similarity ratio, 0..1)

Templates fill `{{sample.output_text}}` with the completion and `{{item.FIELD}}` (dots for nested fields) with the
training line's fields. What does not map, and is refused with a reason: `python` graders (they would run code
from an API request on this machine: write the function in a file and pass `--reward-fn FILE.py:FUNCTION`),
`score_model` and `label_model` (a model as grader: train a reward model, `--reward RUN`), `multi`, and the other
text_similarity metrics (bleu, gleu, meteor, rouge_*, cosine).
"""

from __future__ import annotations

import difflib
import json
import math
import re
from pathlib import Path
from typing import Any

from ownllm.errors import OwnLLMError

OPERATIONS = ("eq", "ne", "like", "ilike")
METRICS = ("fuzzy_match",)
_TEMPLATE = re.compile(r"\{\{\s*([A-Za-z_][\w.]*)\s*\}\}")
_FIELD = re.compile(r"sample\.output_text|item(\.[A-Za-z_]\w*)+")
_SINGLE_BRACE = re.compile(r"\{\s*(sample|item)\.[\w.]*\s*\}")
FIELDS = {"string_check": ("type", "name", "input", "reference", "operation"),
          "text_similarity": ("type", "name", "input", "reference", "evaluation_metric", "pass_threshold")}
_REFUSED = {
    "python": "python graders run the request's code on this machine, which ownllm does not do for an API request: "
              "put the function in a file and train with `ownllm finetune --method grpo --reward-fn FILE.py:FUNCTION`",
    "score_model": "a model as grader is not supported: train a reward model (ownllm finetune --method reward) and "
                   "use `--reward RUN`",
    "label_model": "a model as grader is not supported: train a reward model (ownllm finetune --method reward) and "
                   "use `--reward RUN`",
    "multi": "multi graders are not supported: give one string_check or text_similarity grader",
}


def text_of(value: Any) -> str:
    """A prompt or completion as text: a string as is, chat messages as their last message's content."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and isinstance(value[-1], dict):
        return str(value[-1].get("content") or "")
    return "" if value is None else str(value)


def grader_problem(grader: Any) -> tuple[str, str] | None:
    """(field, problem) for a grader ownllm cannot run, else None; fields are relative to the grader object."""
    if not isinstance(grader, dict):
        return "", "must be a grader object"
    kind = grader.get("type")
    if not isinstance(kind, str):
        return "type", f"must be a string (string_check or text_similarity), got {json.dumps(kind)[:60]}"
    if kind in _REFUSED:
        return "type", _REFUSED[kind]
    if kind not in FIELDS:
        return "type", f"must be string_check or text_similarity, got {json.dumps(kind)[:60]}"
    unknown = [key for key in grader if key not in FIELDS[kind]]
    if unknown:  # nothing unread is stored with the job (an unchecked value could be anything, nested any depth)
        return str(unknown[0])[:60], f"is not a field of a {kind} grader (its fields: {', '.join(FIELDS[kind])})"
    for field in ("input", "reference"):
        value = grader.get(field)
        if not isinstance(value, str) or not value.strip():
            return field, "must be a template string, e.g. \"{{sample.output_text}}\" or \"{{item.answer}}\""
        for name in _TEMPLATE.findall(value):
            if not _FIELD.fullmatch(name):
                return field, f"{{{{{name}}}}} is not a field ownllm fills: use {{{{sample.output_text}}}} or " \
                              "{{item.FIELD}}"
        rest = _TEMPLATE.sub("", value)
        if "{{" in rest or "}}" in rest:
            return field, "has a '{{' or '}}' that is not part of a {{sample.output_text}} or {{item.FIELD}} field"
        single = _SINGLE_BRACE.search(rest)
        if single:  # "{item.answer}" would be compared as that literal text: every reward 0
            return field, f"{single.group(0)} has single braces: a field is written {{{{{single.group(0)[1:-1]}}}}}"
    if "name" in grader and not isinstance(grader["name"], str):
        return "name", "must be a string"
    if kind == "string_check" and grader.get("operation") not in OPERATIONS:
        return "operation", f"must be one of {', '.join(OPERATIONS)}"
    if kind == "text_similarity":
        if grader.get("evaluation_metric") not in METRICS:
            return "evaluation_metric", f"must be {', '.join(METRICS)} (the other metrics are not supported here)"
        threshold = grader.get("pass_threshold")
        if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, int | float)
                                      or not math.isfinite(threshold)):
            return "pass_threshold", "must be a finite number (accepted for OpenAI's shape; the reward is the " \
                                     "similarity itself)"
    return None


def item_fields(grader: dict[str, Any]) -> list[str]:
    """The training-line fields a grader's templates read (the top-level name of each {{item.X.Y}})."""
    names = _TEMPLATE.findall(f"{grader.get('input', '')} {grader.get('reference', '')}")
    return list(dict.fromkeys(name.split(".")[1] for name in names if name.startswith("item.") and "." in name))


def _fill(template: str, completion: str, row: dict[str, Any], name: str) -> str:
    def value(match: re.Match[str]) -> str:
        path = match.group(1)
        if path == "sample.output_text":
            return completion
        current: Any = row
        for part in path.split(".")[1:]:
            if not isinstance(current, dict) or part not in current:
                raise OwnLLMError(f"grader '{name}': {{{{{path}}}}} is not a field of the training data's lines",
                                  param="reward_fn")
            current = current[part]
        return current if isinstance(current, str) else json.dumps(current)

    return _TEMPLATE.sub(value, template)


def grader_reward(grader: dict[str, Any]) -> Any:
    """A reward function (ownllm.finetune.rewards) scoring completions as the OpenAI grader `grader` does."""
    problem = grader_problem(grader)
    if problem:
        raise OwnLLMError(f"grader {problem[0] or 'object'}: {problem[1]}", param="reward_fn")
    name = grader.get("name") or grader["type"]

    def score(completion: str, row: dict[str, Any]) -> float:
        given, expected = (_fill(grader[f], completion, row, name) for f in ("input", "reference"))
        if grader["type"] == "text_similarity":
            return difflib.SequenceMatcher(None, given, expected).ratio()
        operation = grader["operation"]
        if operation == "eq":
            return float(given == expected)
        if operation == "ne":
            return float(given != expected)
        if operation == "like":
            return float(expected in given)
        return float(expected.casefold() in given.casefold())

    def openai_grader(prompts: list[Any], completions: list[Any], **columns: Any) -> list[float]:
        rows = [{key: values[index] for key, values in columns.items() if isinstance(values, list)}
                for index in range(len(completions))]
        return [score(text_of(completion), row) for completion, row in zip(completions, rows, strict=True)]

    openai_grader.__name__ = re.sub(r"\W", "_", f"grader_{name}")
    openai_grader.item_fields = item_fields(grader)  # type: ignore[attr-defined]  # checked on every line first
    return openai_grader


def load_grader_file(file: str) -> Any:
    """The reward function of the grader JSON in `file`."""
    from ownllm.data.files import read_json_file

    return grader_reward(read_json_file(Path(file), param="reward_fn", prefix="reward openai-grader: "))
