"""LLM-as-judge: a local model or any OpenAI-compatible endpoint grades answers.

Single mode scores each answer 1–5 with a one-sentence reason against a rubric; pairwise mode asks
twice with the answers swapped, so a judge that always prefers the first position cancels out. A reply
that does not parse is asked again once, then counted as a failure, never as a score.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ownllm.data.jsonl import fail_if_any, read_jsonl
from ownllm.errors import OwnLLMError
from ownllm.models.chat_template import Message

SCORE_RUBRIC = """You are a strict grader. Rate the ANSWER to the QUESTION from 1 (wrong or useless) to 5 \
(correct, complete and concise).{reference_block}

QUESTION: {question}

ANSWER: {answer}

Reply with only a JSON object: {{"score": <1-5>, "reason": "<one sentence>"}}"""

PAIRWISE_RUBRIC = """You are a strict grader. Which answer to the QUESTION is better?{reference_block}

QUESTION: {question}

ANSWER A: {answer_a}

ANSWER B: {answer_b}

Reply with only a JSON object: {{"winner": "A" or "B" or "tie", "reason": "<one sentence>"}}"""

RETRY = "Your reply could not be read. Reply with only the JSON object asked for, nothing else."


@dataclass(frozen=True)
class JudgeItem:
    line: int
    question: str
    answer: str
    reference: str | None = None
    answer_b: str | None = None


def read_answers(path: Path, against: Path | None = None) -> list[JudgeItem]:
    """JSONL with `question`, `answer` (or `prediction`), optional `reference`/`answers`; `against` is a
    second file with the same questions in the same order, for pairwise comparison."""
    items, problems = [], []
    others = read_jsonl(against) if against else None
    records = read_jsonl(path)
    if others is not None and len(others) != len(records):
        raise OwnLLMError(f"{path.name} has {len(records)} answers but {against.name} has {len(others)}",
                          param="against")
    for index, record in enumerate(records):
        data, where = record.data, f"{path.name} line {record.line}"
        answer = data.get("answer", data.get("prediction"))
        reference = data.get("reference")
        if reference is None and isinstance(data.get("answers"), list) and data["answers"]:
            reference = str(data["answers"][0])
        if not isinstance(data.get("question"), str) or not isinstance(answer, str):
            problems.append(f"{where}: needs 'question' and 'answer' (or 'prediction') strings")
            continue
        answer_b = None
        if others is not None:
            other = others[index].data
            answer_b = other.get("answer", other.get("prediction"))
            if not isinstance(answer_b, str) or other.get("question") != data["question"]:
                problems.append(f"{against.name} line {others[index].line}: needs the same question as {where} "
                                "and an 'answer'")
                continue
        items.append(JudgeItem(record.line, data["question"], answer, reference, answer_b))
    fail_if_any(problems)
    return items


class Judge:
    """Ask a judge model: `ask(messages) -> reply text`."""

    def __init__(self, ask: Callable[[list[Message]], str], name: str) -> None:
        self.ask = ask
        self.name = name


def local_judge(spec: str, *, max_new_tokens: int = 128) -> Judge:
    from ownllm.generate.open import open_engine
    from ownllm.generate.params import SamplingParams

    engine = open_engine(spec)
    params = SamplingParams(max_new_tokens=max_new_tokens)
    return Judge(lambda messages: engine.chat(messages, params).text, name=spec)


def endpoint_judge(url: str, *, model: str | None = None, api_key: str | None = None, timeout: float = 120) -> Judge:
    """Any OpenAI-compatible server (ownllm serve, vLLM, llama-server, OpenAI itself)."""
    import openai

    base = url.rstrip("/")
    base = base if base.endswith("/v1") else f"{base}/v1"
    client = openai.OpenAI(base_url=base, api_key=api_key or "not-needed", timeout=timeout, max_retries=0)
    try:
        model = model or client.models.list().data[0].id
    except (openai.APIConnectionError, openai.APITimeoutError):
        raise OwnLLMError(f"cannot reach the judge at {url}", kind="not_found", param="judge",
                          hint="is the server running? check the URL and port") from None
    except openai.APIStatusError as exc:
        raise OwnLLMError(f"the judge at {url} answered {exc.status_code}: {exc.message}", param="judge") from None
    except IndexError:
        raise OwnLLMError(f"the judge at {url} lists no models; pass --judge-model", param="judge") from None

    def ask(messages: list[Message]) -> str:
        try:
            reply = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=256)
        except (openai.APIConnectionError, openai.APITimeoutError):
            raise OwnLLMError(f"lost the judge at {url}", kind="not_found", param="judge") from None
        except openai.APIStatusError as exc:
            raise OwnLLMError(f"the judge answered {exc.status_code}: {exc.message}", param="judge") from None
        return reply.choices[0].message.content or ""

    return Judge(ask, name=f"{model} at {url}")


_JSON_OBJECT = re.compile(r"\{.*?\}", re.DOTALL)


def _json_objects(reply: str) -> list[dict[str, Any]]:
    """Every JSON object embedded in a reply (judges like to add words around it)."""
    found = []
    for candidate in _JSON_OBJECT.findall(reply):
        try:
            data = json.loads(candidate)
        except json.JSONDecodeError:
            continue
        if isinstance(data, dict):
            found.append(data)
    return found


def parse_score(reply: str) -> tuple[int, str] | None:
    for data in _json_objects(reply):
        score = data.get("score")
        if isinstance(score, int | float) and int(score) == score and 1 <= score <= 5:
            return int(score), str(data.get("reason", "")).strip()
    return None


def parse_winner(reply: str) -> tuple[str, str] | None:
    for data in _json_objects(reply):
        winner = str(data.get("winner", "")).strip().upper()
        if winner in ("A", "B", "TIE"):
            return winner.lower() if winner == "TIE" else winner, str(data.get("reason", "")).strip()
    return None


def _ask_parsed(judge: Judge, prompt: str, parse: Callable[[str], Any]) -> tuple[Any, list[str]]:
    """Ask; if the reply does not parse, ask once more; return (parsed or None, raw replies)."""
    messages: list[Message] = [{"role": "user", "content": prompt}]
    first = judge.ask(messages)
    parsed = parse(first)
    if parsed is not None:
        return parsed, [first]
    second = judge.ask([*messages, {"role": "assistant", "content": first}, {"role": "user", "content": RETRY}])
    return parse(second), [first, second]


def _reference_block(reference: str | None) -> str:
    return f"\n\nA correct REFERENCE answer: {reference}" if reference else ""


def judge_scores(judge: Judge, items: list[JudgeItem], *, rubric: str = SCORE_RUBRIC,
                 progress: Callable[[int], None] | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    rows = []
    for item in items:
        prompt = rubric.format(question=item.question, answer=item.answer,
                               reference_block=_reference_block(item.reference))
        parsed, replies = _ask_parsed(judge, prompt, parse_score)
        rows.append({"line": item.line, "question": item.question, "answer": item.answer,
                     "score": parsed[0] if parsed else None, "reason": parsed[1] if parsed else None,
                     "failed": parsed is None, "judge_replies": replies})
        if progress:
            progress(1)
    scored = [r["score"] for r in rows if r["score"] is not None]
    summary = {"judge": judge.name, "items": len(rows), "scored": len(scored), "failures": len(rows) - len(scored),
               "mean_score": sum(scored) / len(scored) if scored else None}
    return rows, summary


def judge_pairwise(judge: Judge, items: list[JudgeItem], *, rubric: str = PAIRWISE_RUBRIC,
                   progress: Callable[[int], None] | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Each pair is judged as (A, B) and as (B, A); a verdict counts only when both orders agree."""
    rows = []
    for item in items:
        block = _reference_block(item.reference)
        forward, replies_1 = _ask_parsed(judge, rubric.format(question=item.question, answer_a=item.answer,
                                                              answer_b=item.answer_b, reference_block=block),
                                         parse_winner)
        backward, replies_2 = _ask_parsed(judge, rubric.format(question=item.question, answer_a=item.answer_b,
                                                               answer_b=item.answer, reference_block=block),
                                          parse_winner)
        if forward is None or backward is None:
            verdict = None
        else:
            swapped = {"A": "B", "B": "A", "tie": "tie"}[backward[0]]
            verdict = {"A": "first", "B": "second", "tie": "tie"}[forward[0]] if forward[0] == swapped else "tie"
        rows.append({"line": item.line, "question": item.question, "first": item.answer, "second": item.answer_b,
                     "verdict": verdict, "failed": verdict is None,
                     "judge_replies": replies_1 + replies_2})
        if progress:
            progress(1)
    decided = [r["verdict"] for r in rows if r["verdict"] is not None]
    summary = {"judge": judge.name, "items": len(rows), "failures": len(rows) - len(decided),
               "first_wins": decided.count("first"), "second_wins": decided.count("second"),
               "ties": decided.count("tie")}
    return rows, summary
