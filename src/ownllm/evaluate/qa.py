"""Reference-based QA: generate answers in batches, score them against the references."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ownllm.data.jsonl import fail_if_any, read_jsonl
from ownllm.evaluate.metrics import METRICS, score_all
from ownllm.generate.engine import Engine
from ownllm.generate.params import SamplingParams
from ownllm.models.chat_template import Message


@dataclass(frozen=True)
class QAItem:
    line: int
    messages: list[Message]
    answers: list[str]

    @property
    def question(self) -> str:
        return next(m["content"] for m in reversed(self.messages) if m["role"] == "user")


@dataclass
class QAResult:
    line: int
    question: str
    prediction: str
    answers: list[str]
    scores: dict[str, float]


def read_questions(path: Path) -> list[QAItem]:
    """JSONL with `question` (or `messages`) and `answers` (a list) or `answer` (a string) per line."""
    items, problems = [], []
    for record in read_jsonl(path):
        data, where = record.data, f"{path.name} line {record.line}"
        answers = data.get("answers", data.get("answer"))
        if isinstance(answers, str):
            answers = [answers]
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
            problems.append(f"{where}: needs 'answers' (a list of strings) or 'answer'")
            continue
        if isinstance(data.get("question"), str) and data["question"].strip():
            messages: list[Message] = [{"role": "user", "content": data["question"]}]
        elif isinstance(data.get("messages"), list) and data["messages"]:
            messages = list(data["messages"])
            if isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant":
                messages = messages[:-1]  # the reference reply, not part of the prompt
        else:
            problems.append(f"{where}: needs 'question' (a string) or 'messages'")
            continue
        items.append(QAItem(record.line, messages, answers))
    fail_if_any(problems)
    return items


def run_qa(engine: Engine, items: list[QAItem], params: SamplingParams | None = None, *, batch_size: int = 16,
           progress: Callable[[int], None] | None = None) -> list[QAResult]:
    """Answer every item (greedy by default), up to `batch_size` decoded together, and score each answer."""
    params = params or SamplingParams(max_new_tokens=64)
    prompts = [engine.render_with_recall(item.messages, max_new_tokens=params.max_new_tokens) for item in items]
    completions = engine.generate_batch(prompts, params, max_batch=batch_size, progress=progress,
                                        labels=[f"line {item.line}" for item in items],
                                        adapters=engine.routes([item.messages for item in items]))
    results: list[QAResult] = []
    for item, completion in zip(items, completions, strict=True):
        prediction = completion.text.strip()
        results.append(QAResult(item.line, item.question, prediction, item.answers,
                                score_all(prediction, item.answers)))
    return results


def summarize(results: list[QAResult]) -> dict[str, Any]:
    count = len(results)
    summary: dict[str, Any] = {"items": count}
    for name in METRICS:
        summary[name] = sum(r.scores[name] for r in results) / count if count else 0.0
    return summary


def results_as_rows(results: list[QAResult]) -> list[dict[str, Any]]:
    return [asdict(r) for r in results]
