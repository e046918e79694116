"""Reward functions for online RL (GRPO, RLOO): verifiable rewards named on the command line, and your own.

A reward function takes the batch as TRL hands it over — `prompts`, `completions` (plain text, or lists of chat
messages for chat data; `text_of` reads either) and every other dataset column as a keyword list, one value per
completion — and returns one float per completion (None: no reward for that one). Built-ins, by spec:

    exact               1.0 when the completion equals the row's `reference` (whitespace at the ends aside)
    contains            1.0 when the `reference` appears in the completion (case folded)
    regex:PATTERN       1.0 when PATTERN matches somewhere in the completion
    json-valid          1.0 when the completion (or its first ``` block) parses as JSON
    json-schema:FILE    1.0 when it parses and matches the JSON schema in FILE
    openai-grader:FILE.json  an OpenAI reinforcement fine-tuning grader (string_check, text_similarity;
                        ownllm.finetune.graders), its {{item.FIELD}} templates read from the data's fields
    sql-exec:DB.sqlite  1.0 when the completion's query returns the same rows as the `reference` query, run
                        read-only on DB (ownllm.evaluate.sql), else 0.0 (no credit for a query that merely runs:
                        GRPO on an SFT model then traded right joins for short queries that run, bench/RESULTS.md)
    FILE.py:FUNCTION    your function

Every function is called on a few rows before training (`validate_rewards`): one that is missing, raises or
returns something other than numbers stops the run there, naming the file and function. One that raises during
training is wrapped so the error names it (RewardFailed).
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ownllm.errors import OwnLLMError
from ownllm.finetune.graders import load_grader_file, text_of

RewardFn = Callable[..., list[float | None]]
BUILTINS = ("exact", "contains", "regex:PATTERN", "json-valid", "json-schema:FILE", "sql-exec:DB.sqlite",
            "openai-grader:FILE.json", "FILE.py:FUNCTION")
REFERENCE = "reference"  # the dataset column the built-ins compare with
VALIDATION_ROWS = 3
_FENCE = re.compile(r"```[a-zA-Z]*[ \t]*\n?(.*?)(?:```|$)", re.S)


class RewardFailed(OwnLLMError):
    """A reward function raised or returned something unusable during training."""

    def __init__(self, name: str, problem: str) -> None:
        super().__init__(f"reward function {name} {problem}", kind="training_failed", param="reward_fn")
        self.name = name


def _references(kwargs: dict[str, Any], count: int, name: str) -> list[str]:
    references = kwargs.get(REFERENCE)
    if not isinstance(references, list) or len(references) != count:
        raise OwnLLMError(f"reward {name} needs a '{REFERENCE}' column in the data (the expected answer; chat "
                          "lines ending with an assistant reply give it)", param="reward_fn")
    return [text_of(r) for r in references]


def _unfenced(text: str) -> str:
    found = _FENCE.search(text)
    return (found.group(1) if found else text).strip()


def _exact(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
    references = _references(kwargs, len(completions), "exact")
    return [float(text_of(c).strip() == r.strip()) for c, r in zip(completions, references, strict=True)]


def _contains(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
    references = _references(kwargs, len(completions), "contains")
    return [float(r.strip().casefold() in text_of(c).casefold()) for c, r in zip(completions, references, strict=True)]


def _json_valid(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
    return [float(_parse_json(text_of(c)) is not _INVALID) for c in completions]


_INVALID = object()


def _parse_json(text: str) -> Any:
    try:
        return json.loads(_unfenced(text))
    except (ValueError, RecursionError):
        return _INVALID


def _regex(pattern: str) -> RewardFn:
    try:
        compiled = re.compile(pattern, re.S)
    except re.error as exc:
        raise OwnLLMError(f"reward regex:{pattern}: not a valid regular expression ({exc})",
                          param="reward_fn") from None

    def regex(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
        return [float(compiled.search(text_of(c)) is not None) for c in completions]

    return regex


def _json_schema(file: str) -> RewardFn:
    from ownllm.data.files import read_json_file
    from ownllm.json_schema import instance_problem, schema_problem

    schema = read_json_file(Path(file), param="reward_fn", prefix="reward json-schema: ", noun="schema file")
    problem = schema_problem(schema) if isinstance(schema, dict) else "a schema must be a JSON object"
    if problem:
        raise OwnLLMError(f"reward json-schema: {file}: {problem}", param="reward_fn")

    def json_schema(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
        parsed = [_parse_json(text_of(c)) for c in completions]
        return [float(p is not _INVALID and instance_problem(p, schema) is None) for p in parsed]

    return json_schema


def _sql_exec(file: str) -> RewardFn:
    from ownllm.evaluate.sql import QueryError, ReadOnlyDatabase, extract_sql, is_ordered, same_result

    db = ReadOnlyDatabase(Path(file))
    gold_rows: dict[str, list[tuple[Any, ...]]] = {}

    def sql_exec(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
        rewards = []
        for completion, gold in zip(completions, _references(kwargs, len(completions), "sql-exec"), strict=True):
            if gold not in gold_rows:
                try:
                    gold_rows[gold] = db.run(gold)
                except QueryError as exc:
                    raise OwnLLMError(f"reward sql-exec: the reference query fails on {db.path.name}: {exc}: "
                                      f"{gold[:200]}", param="data") from None
            try:
                rows = db.run(extract_sql(text_of(completion)))
            except QueryError:
                rewards.append(0.0)
                continue
            rewards.append(1.0 if same_result(rows, gold_rows[gold], ordered=is_ordered(gold)) else 0.0)
        return rewards

    return sql_exec


def _user_function(spec: str) -> RewardFn:
    file, _, name = spec.rpartition(":")
    path = Path(file)
    if not path.is_file():
        raise OwnLLMError(f"reward {spec}: no such file: {file}", kind="not_found", param="reward_fn")
    module_name = f"ownllm_reward_{abs(hash(str(path.resolve())))}"
    try:
        loader = importlib.util.spec_from_file_location(module_name, path)
        if loader is None or loader.loader is None:
            raise ImportError(f"cannot load {file}")
        module = importlib.util.module_from_spec(loader)
        sys.modules[module_name] = module
        loader.loader.exec_module(module)
    except (Exception, SystemExit) as exc:  # the user's module: anything may go wrong while it runs, sys.exit too
        raise OwnLLMError(f"reward {spec}: importing {file} failed: {type(exc).__name__}: {exc}",
                          param="reward_fn") from None
    function = getattr(module, name, None)
    if function is None:
        found = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise OwnLLMError(f"reward {spec}: {file} has no function '{name}'", param="reward_fn",
                          hint=f"functions there: {', '.join(found) or 'none'}")
    if not callable(function):
        raise OwnLLMError(f"reward {spec}: '{name}' in {file} is not a function", param="reward_fn")
    return function


def load_reward(spec: str) -> RewardFn:
    """The reward function `spec` names (see the module docstring), wrapped so that its failures name it."""
    spec = spec.strip()
    if spec == "exact":
        function = _exact
    elif spec == "contains":
        function = _contains
    elif spec == "json-valid":
        function = _json_valid
    elif spec.startswith("regex:") and spec[6:]:
        function = _regex(spec[6:])
    elif spec.startswith("json-schema:") and spec[12:]:
        function = _json_schema(spec[12:])
    elif spec.startswith("sql-exec:") and spec[9:]:
        function = _sql_exec(spec[9:])
    elif spec.startswith("openai-grader:") and spec[14:]:
        function = load_grader_file(spec[14:])
    elif re.match(r"^.+\.py:[A-Za-z_]\w*$", spec):
        function = _user_function(spec)
    else:
        raise OwnLLMError(f"unknown reward function '{spec}'", param="reward_fn",
                          hint=f"use one of: {', '.join(BUILTINS)}")
    return _named(function, spec)


def _named(function: RewardFn, spec: str) -> RewardFn:
    """`function` under the name TRL logs it by (rewards/NAME/mean), turning its failures into RewardFailed."""

    def reward(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float | None]:
        try:
            values = function(prompts=prompts, completions=completions, **kwargs)
        except OwnLLMError:
            raise
        except (Exception, SystemExit) as exc:  # the user's code: whatever it raises, the message must name it
            raise RewardFailed(spec, f"raised {type(exc).__name__}: {exc}") from exc
        problem = _not_rewards(values, len(completions))
        if problem:
            raise RewardFailed(spec, problem)
        return [None if v is None else float(v) for v in values]

    reward.__name__ = re.sub(r"\W+", "_", spec.rsplit("/", 1)[-1]).strip("_") or "reward"
    reward.spec = spec  # type: ignore[attr-defined]
    reward.item_fields = getattr(function, "item_fields", [])  # type: ignore[attr-defined]
    return reward


def _not_rewards(values: Any, count: int) -> str | None:
    """What is wrong with a reward function's return value (None when it is one number or None per completion)."""
    if not isinstance(values, list | tuple):
        return f"returned {type(values).__name__}, not a list of numbers"
    if len(values) != count:
        return f"returned {len(values)} values for {count} completions"
    for value in values:
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(float(value)):
            return f"returned {value!r}, not a finite number"
    return None


def validate_rewards(functions: list[RewardFn], rows: list[dict[str, Any]], where: list[str] | None = None) -> None:
    """Call every function on the first few rows — each row's reference answer as its completion, or an empty one
    where it has none — so a broken function stops the run before any model loads; a field a grader reads must be
    on every row (`where`: each row's "FILE line N", for the message)."""
    for function in functions:
        for index, row in enumerate(rows):
            missing = [name for name in getattr(function, "item_fields", []) if name not in row]
            if missing:
                place = where[index] if where else f"row {index + 1}"
                raise OwnLLMError(f"{place}: needs '{missing[0]}', which the reward {function.__name__} reads",
                                  param="data")
    sample = rows[:VALIDATION_ROWS]
    if not sample:
        return
    keys = dict.fromkeys(key for row in sample for key in row if key != "prompt")
    columns = {key: [row.get(key) for row in sample] for key in keys}
    prompts = [row["prompt"] for row in sample]
    completions = [_as_completion(row) for row in sample]
    for function in functions:
        try:
            function(prompts=prompts, completions=completions, **columns)
        except RewardFailed as exc:
            raise OwnLLMError(f"{exc.message} when tried on the first {len(sample)} rows", param="reward_fn",
                              hint="fix it before training") from None


def _as_completion(row: dict[str, Any]) -> Any:
    reference = text_of(row.get(REFERENCE)) if row.get(REFERENCE) is not None else ""
    if isinstance(row["prompt"], list):
        return [{"role": "assistant", "content": reference}]
    return reference
