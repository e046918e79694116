"""Before/after checks of a run: each named set answered greedily by the base and by the tuned model.

A question set (e.g. held-out facts, general-knowledge retention) is scored by whether the reference answer appears
in the reply; a tool-call set (lines in OpenAI's function-calling format, with `tools`) by whether the reply makes a
valid call where the reference makes one, with no grammar holding the model (ownllm.evaluate.tool_calls)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ownllm.evaluate.qa import read_questions, run_qa, summarize
from ownllm.evaluate.tool_calls import is_tool_call_set, read_tool_call_set, score_tool_calls, summarize_tool_calls
from ownllm.generate.params import SamplingParams

CHECK_PARAMS = SamplingParams(max_new_tokens=64)
TOOL_CHECK_PARAMS = SamplingParams(max_new_tokens=96)
METRIC_NAMES = {"contains": "reference answer in the reply", "valid_call": "valid tool call",
                "prose_kept": "no call where none is needed"}


def check_rows(checks: dict[str, dict[str, Any]]) -> list[tuple[str, str, int | None, float, float]]:
    """The before/after table of a run, one row per measure: (set, measured, items, base, tuned). A tool-call set
    has a second row when it holds questions that need no tool: the share answered without a call."""
    rows: list[tuple[str, str, int | None, float, float]] = []
    for name, row in checks.items():
        rows.append((name, METRIC_NAMES[row.get("metric", "contains")], row["items"], row["base"], row["tuned"]))
        prose = row.get("prose_kept")
        if prose and prose["base"] is not None:
            rows.append((name, METRIC_NAMES["prose_kept"], None, prose["base"], prose["tuned"]))
    return rows


def score_sets(engine: Any, sets: dict[str, str]) -> dict[str, dict[str, Any]]:
    """{name: {"score": share, "metric": "contains" | "valid_call", "items": n, "misses": [questions missed]}}.
    The question files are answered in one batch (each once, whatever names it has), so no set waits for the
    slowest reply of the one before."""
    scores: dict[str, dict[str, Any]] = {}
    questions: dict[str, list[Any]] = {}  # file -> its questions
    for name, path in sets.items():
        if not is_tool_call_set(Path(path)):
            questions.setdefault(path, read_questions(Path(path)))
            continue
        calls = score_tool_calls(engine, read_tool_call_set(Path(path)), TOOL_CHECK_PARAMS)
        summary = summarize_tool_calls(calls)
        scores[name] = {"score": summary["valid_call"], "metric": "valid_call", "items": summary["call_items"],
                        "right_call": summary["right_call"], "prose_kept": summary["prose_kept"],
                        "misses": [r.question for r in calls if not r.valid]}
    answered = iter(run_qa(engine, [item for items in questions.values() for item in items], CHECK_PARAMS))
    results = {path: [next(answered) for _ in items] for path, items in questions.items()}
    for name, path in sets.items():
        if path in results:
            summary = summarize(results[path])
            scores[name] = {"score": summary["contains"], "metric": "contains", "items": summary["items"],
                            "misses": [r.question for r in results[path] if r.scores["contains"] < 1]}
    return {name: scores[name] for name in sets}


def validate_sets(sets: dict[str, str]) -> None:
    """Read every set before any training, so a bad file stops the run at once."""
    for path in sets.values():
        if is_tool_call_set(Path(path)):
            read_tool_call_set(Path(path))
        else:
            read_questions(Path(path))
