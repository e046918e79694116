"""`ownllm eval` verbs as users run them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import assert_user_error, run_cli

pytestmark = pytest.mark.slow
EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "eval"


def test_eval_perplexity_json(default_model: str, tmp_path: Path) -> None:
    text = tmp_path / "doc.txt"
    text.write_text("Paris is the capital of France. " * 20)
    result = run_cli("eval", "perplexity", default_model, "--data", str(text), "--max-length", "64", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["perplexity"] > 1 and data["stride"] == 32 and data["tokens_scored"] > 100


def test_eval_qa_writes_per_item_results(default_model: str, tmp_path: Path) -> None:
    data = tmp_path / "q.jsonl"
    data.write_text("".join((EXAMPLES / "qa.jsonl").read_text().splitlines(True)[:3]))
    out = tmp_path / "out"
    result = run_cli("eval", "qa", default_model, "--data", str(data), "--out", str(out), "--max-new-tokens", "12",
                     "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["items"] == 3
    rows = [json.loads(line) for line in (out / "qa.jsonl").read_text().splitlines()]
    assert [r["line"] for r in rows] == [1, 2, 3] and set(rows[0]["scores"]) == {"exact_match", "f1", "rouge_l",
                                                                                 "contains"}


def test_eval_bad_inputs(default_model: str, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "Q?", "answers": ["A"]}\n{"question": "Q?", "answers": []}\n')
    assert_user_error(run_cli("eval", "qa", default_model, "--data", str(bad)), "line 2")
    long = tmp_path / "long.jsonl"  # one question past the context window among good ones: named by its line
    long.write_text("".join(json.dumps({"question": q, "answers": ["A"]}) + "\n"
                            for q in ("Q?", "Q?", "word " * 9000, "Q?")))
    out = tmp_path / "long-out"
    assert_user_error(run_cli("eval", "qa", default_model, "--data", str(long), "--out", str(out)),
                      "line 3: prompt (", "past the context window")
    assert not out.exists()
    assert_user_error(run_cli("eval", "qa", default_model, "--data", str(tmp_path / "missing.jsonl")),
                      "no such file")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert_user_error(run_cli("eval", "perplexity", default_model, "--data", str(empty)), "is empty")


def test_eval_harness_and_compare(default_model: str, tmp_path: Path) -> None:
    result = run_cli("eval", "harness", default_model, "--tasks", str(EXAMPLES / "capitals_mc.yaml"), "--json")
    assert result.returncode == 0, result.stderr
    assert 0.25 < json.loads(result.stdout)["acc,none"] <= 1  # better than chance on four choices
    data = tmp_path / "q.jsonl"
    data.write_text("".join((EXAMPLES / "qa.jsonl").read_text().splitlines(True)[:2]))
    out = tmp_path / "report"
    result = run_cli("eval", "compare", default_model, default_model, "--data", str(data), "--out", str(out),
                     "--max-new-tokens", "8")
    assert result.returncode == 0, result.stderr
    assert (out / "report.md").is_file() and (out / "chart.png").is_file()
