"""Before/after checks of a run: each named set answered greedily by the base and by the tuned model.

A question set (e.g. held-out facts, general-knowledge retention) is scored by whether the reference answer appears
in the reply; a tool-call set (lines in OpenAI's function-calling format, with `tools`) by whether the reply makes a
valid call where the reference makes one, with no grammar holding the model (ownllm.evaluate.tool_calls)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ownllm.evaluate.qa import read_questions, run_qa
from ownllm.evaluate.tool_calls import is_tool_call_set, read_tool_call_set, score_tool_calls, summarize_tool_calls
from ownllm.generate.params import SamplingParams

CHECK_PARAMS = SamplingParams(max_new_tokens=64)
TOOL_CHECK_PARAMS = SamplingParams(max_new_tokens=96)
# rows decoded together in a run's own generation (check answers, replay answers): a small model's decode step costs
# about the same for 4 rows as for 16 (reading the weights is most of it), so one batch rather than waves of 16
# (40 check questions: 14% less time; 80 replay prompts: 10%)
ANSWER_BATCH = 64
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


def score_sets(engine: Any, sets: dict[str, str], *, base_scores: dict[str, dict[str, Any]] | None = None
               ) -> dict[str, dict[str, Any]]:
    """{name: {"score": share, "metric": "contains" | "valid_call", "items": n, "misses": [questions missed]}}; a
    question set also gives "missed_lines" (the lines of its misses) and "reused_from_base" (how many of its
    questions took the base's result, below). The question files are answered in one batch (each once, whatever names it
    has), so no set waits for the slowest reply of the one before.

    With `base_scores` (the base model's scores on the same sets, with their missed lines), a question that `engine`
    (a scoped adapter) leaves to the base model is not asked again: it runs on the base's own weights, bit for bit,
    with no recalled examples, so it scores as the base's answer did. A retention set of general questions then
    costs nothing after training."""
    scores: dict[str, dict[str, Any]] = {}
    questions: dict[str, list[Any]] = {}  # file -> its questions
    base_missed: dict[str, set[int]] = {}  # file -> the lines the base missed, where its scores say
    for name, path in sets.items():
        if not is_tool_call_set(Path(path)):
            questions.setdefault(path, read_questions(Path(path)))
            missed_lines = (base_scores or {}).get(name, {}).get("missed_lines")
            if isinstance(missed_lines, list):
                base_missed[path] = set(missed_lines)
            continue
        calls = score_tool_calls(engine, read_tool_call_set(Path(path)), TOOL_CHECK_PARAMS, batch_size=ANSWER_BATCH)
        summary = summarize_tool_calls(calls)
        scores[name] = {"score": summary["valid_call"], "metric": "valid_call", "items": summary["call_items"],
                        "right_call": summary["right_call"], "prose_kept": summary["prose_kept"],
                        "misses": [r.question for r in calls if not r.valid]}
    items = [(path, item) for path, file_items in questions.items() for item in file_items]
    on_base = engine.on_base_weights([item.messages for _, item in items]) if base_missed else [False] * len(items)
    reused = [base and path in base_missed for (path, _), base in zip(items, on_base, strict=True)]
    answered = iter(run_qa(engine, [item for (_, item), skip in zip(items, reused, strict=True) if not skip],
                           CHECK_PARAMS, batch_size=ANSWER_BATCH))
    results: dict[str, list[tuple[Any, bool, bool]]] = {path: [] for path in questions}  # (item, right, reused)
    for (path, item), skip in zip(items, reused, strict=True):
        right = item.line not in base_missed[path] if skip else next(answered).scores["contains"] >= 1
        results[path].append((item, right, skip))
    for name, path in sets.items():
        if path in results:
            rows = results[path]
            scores[name] = {"score": sum(right for _, right, _ in rows) / len(rows) if rows else 0.0,
                            "metric": "contains", "items": len(rows),
                            "misses": [item.question for item, right, _ in rows if not right],
                            "missed_lines": [item.line for item, right, _ in rows if not right],
                            "reused_from_base": sum(reused for _, _, reused in rows)}
    return {name: scores[name] for name in sets}


def validate_sets(sets: dict[str, str]) -> None:
    """Read every set before any training, so a bad file stops the run at once."""
    for path in sets.values():
        if is_tool_call_set(Path(path)):
            read_tool_call_set(Path(path))
        else:
            read_questions(Path(path))
