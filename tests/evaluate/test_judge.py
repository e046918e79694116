"""LLM-as-judge against a local model and against an OpenAI-compatible endpoint on loopback.

The endpoint here is a real HTTP server driven by the real `openai` client; what it stands in for is a
strong remote judge (which cannot exist on this machine), so its replies are scripted: well-formed,
malformed-then-fixed, and malformed twice, to test parsing, the single retry and failure counting.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest

from ownllm.errors import OwnLLMError
from ownllm.evaluate.judge import (
    JudgeItem,
    endpoint_judge,
    judge_pairwise,
    judge_scores,
    local_judge,
    parse_score,
    parse_winner,
    read_answers,
)
from tests.conftest import run_cli


class ScriptedJudge(BaseHTTPRequestHandler):
    replies: ClassVar[list[str]] = []
    seen: ClassVar[list[dict]] = []

    def log_message(self, *args: object) -> None:
        pass

    def _send(self, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._send({"object": "list", "data": [{"id": "judge-model", "object": "model", "created": 0,
                                                "owned_by": "test"}]})

    def do_POST(self) -> None:
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        ScriptedJudge.seen.append(request)
        content = ScriptedJudge.replies.pop(0)
        self._send({"id": "x", "object": "chat.completion", "created": 0, "model": request["model"],
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": content}}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})


@pytest.fixture
def judge_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), ScriptedJudge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    ScriptedJudge.seen.clear()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


ITEMS = [JudgeItem(1, "Capital of France?", "Paris", "Paris"), JudgeItem(2, "2+2?", "5", "4"),
         JudgeItem(3, "Colour of the sky?", "blue", None)]


def test_parsers() -> None:
    assert parse_score('Sure! {"score": 4, "reason": "close"}') == (4, "close")
    assert parse_score('{"score": 7}') is None and parse_score("four out of five") is None
    assert parse_winner('{"winner": "b", "reason": "r"}') == ("B", "r")
    assert parse_winner('{"winner": "tie"}') == ("tie", "")


def test_endpoint_scores_retry_and_failures(judge_url: str) -> None:
    ScriptedJudge.replies = ['{"score": 5, "reason": "correct"}',
                             "I think it is bad", '{"score": 1, "reason": "wrong sum"}',
                             "no idea", "still no idea"]
    rows, summary = judge_scores(endpoint_judge(judge_url), ITEMS)
    assert [r["score"] for r in rows] == [5, 1, None]
    assert summary == {"judge": f"judge-model at {judge_url}", "items": 3, "scored": 2, "failures": 1,
                       "mean_score": 3.0}
    assert len(rows[1]["judge_replies"]) == 2  # retried once
    assert "REFERENCE answer: Paris" in ScriptedJudge.seen[0]["messages"][0]["content"]


def test_pairwise_swaps_the_order(judge_url: str) -> None:
    item = [JudgeItem(1, "Capital of France?", "Paris", None, answer_b="Lyon")]
    ScriptedJudge.replies = ['{"winner": "A"}', '{"winner": "B"}']  # consistent: the first answer wins
    rows, summary = judge_pairwise(endpoint_judge(judge_url), item)
    assert rows[0]["verdict"] == "first" and summary["first_wins"] == 1
    first_prompt, second_prompt = (s["messages"][0]["content"] for s in ScriptedJudge.seen)
    assert first_prompt.index("Paris") < first_prompt.index("Lyon")
    assert second_prompt.index("Lyon") < second_prompt.index("Paris")
    ScriptedJudge.replies = ['{"winner": "A"}', '{"winner": "A"}']  # always the first slot: position bias
    rows, _ = judge_pairwise(endpoint_judge(judge_url), item)
    assert rows[0]["verdict"] == "tie"


def test_unreachable_judge_is_a_clear_error() -> None:
    with pytest.raises(OwnLLMError, match="cannot reach the judge"):
        endpoint_judge("http://127.0.0.1:9")


def test_cli_judge_against_the_endpoint(judge_url: str, tmp_path: Path) -> None:
    answers = tmp_path / "answers.jsonl"
    answers.write_text(json.dumps({"question": "Capital of France?", "answer": "Paris", "reference": "Paris"}) + "\n")
    ScriptedJudge.replies = ['{"score": 5, "reason": "correct"}']
    out = tmp_path / "out"
    result = run_cli("eval", "judge", "--answers", str(answers), "--judge", judge_url, "--out", str(out), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["mean_score"] == 5.0
    assert json.loads((out / "judge.jsonl").read_text())["reason"] == "correct"


def test_cli_unreachable_judge_writes_nothing(tmp_path: Path) -> None:
    answers = tmp_path / "answers.jsonl"
    answers.write_text(json.dumps({"question": "Q?", "answer": "A"}) + "\n")
    out = tmp_path / "out"
    result = run_cli("eval", "judge", "--answers", str(answers), "--judge", "http://127.0.0.1:9", "--out", str(out))
    assert result.returncode == 2 and "cannot reach the judge" in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()


def test_answers_file_problems_are_named(tmp_path: Path) -> None:
    answers = tmp_path / "a.jsonl"
    answers.write_text('{"question": "Q?", "answer": "A"}\n{"question": "Q?"}\n')
    with pytest.raises(OwnLLMError, match="line 2: needs 'question' and 'answer'"):
        read_answers(answers)


@pytest.mark.slow
def test_local_model_as_judge(default_model: str) -> None:
    judge = local_judge(default_model, max_new_tokens=48)
    asked: list[str] = []
    ask = judge.ask
    judge.ask = lambda messages: (asked.append(messages[-1]["content"]), ask(messages))[1]
    rows, summary = judge_scores(judge, ITEMS[:2])
    assert summary["scored"] + summary["failures"] == 2 and summary["judge"] == default_model
    assert "REFERENCE answer: Paris" in asked[0] and "Capital of France?" in asked[0]
    for row in rows:
        # the score is what the model's own last reply says, and a reply that does not parse is retried once:
        # a tiny judge that fails the format is counted as a failure, never given a score
        replies = row["judge_replies"]
        parsed = [parse_score(reply) for reply in replies]
        assert row["score"] == (parsed[-1][0] if parsed[-1] else None) and row["failed"] == (parsed[-1] is None)
        assert len(replies) == (1 if parsed[0] else 2)
    assert len(asked) == sum(len(row["judge_replies"]) for row in rows)
