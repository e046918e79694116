"""Before/after checks of a run: each named question set (e.g. held-out facts, general-knowledge retention)
answered greedily by the base and by the tuned model, scored by whether the reference answer appears."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ownllm.evaluate.qa import read_questions, run_qa, summarize
from ownllm.generate.params import SamplingParams

CHECK_PARAMS = SamplingParams(max_new_tokens=64)


def score_sets(engine: Any, sets: dict[str, str]) -> dict[str, dict[str, Any]]:
    """{name: {"contains": share answered, "items": n, "misses": [questions answered wrongly]}}."""
    scores = {}
    for name, path in sets.items():
        results = run_qa(engine, read_questions(Path(path)), CHECK_PARAMS)
        summary = summarize(results)
        scores[name] = {"contains": summary["contains"], "items": summary["items"],
                        "misses": [r.question for r in results if r.scores["contains"] < 1]}
    return scores


def validate_sets(sets: dict[str, str]) -> None:
    """Read every set before any training, so a bad file stops the run at once."""
    for path in sets.values():
        read_questions(Path(path))
