"""The data doctor on hand-made files in every format, with line-numbered problems."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ownllm.data.doctor import check, prepare, read_examples
from ownllm.errors import OwnLLMError
from tests.conftest import assert_user_error, run_cli


def write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def chat(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


FACTS = [chat(f"What is fact number {i} about Lumen Bikes?", f"Fact {i}: the frame of model {i} weighs {10 + i} kg.")
         for i in range(12)]


def test_every_format_is_detected_and_normalised(tmp_path: Path) -> None:
    cases = {
        "chat": FACTS[0],
        "sharegpt": {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]},
        "alpaca": {"instruction": "Translate to French", "input": "cat", "output": "chat"},
        "completion": {"prompt": "2+2=", "completion": "4"},
        "preference": {"prompt": "Say hi", "chosen": "Hi!", "rejected": "Go away."},
    }
    for name, row in cases.items():
        fmt, examples, problems = read_examples(write(tmp_path / f"{name}.jsonl", [row]))
        assert fmt == name and len(examples) == 1 and not problems
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.md").write_text("# Notes\nSome text.")
    fmt, examples, _ = read_examples(tmp_path / "notes")
    assert fmt == "text" and examples[0].text.startswith("# Notes")


def test_problems_are_named_by_line(tmp_path: Path) -> None:
    rows = [FACTS[0], "{not json", {"messages": [{"role": "wizard", "content": "hi"}]},
            {"messages": [{"role": "user", "content": "   "}, {"role": "assistant", "content": "x"}]},
            {"messages": [{"role": "user", "content": "only a question"}]},
            {"messages": [{"role": "user", "content": "q", "mood": "happy"}, {"role": "assistant", "content": "a"}]},
            {"instruction": "looks like alpaca", "output": "x"}]
    report, examples = check(write(tmp_path / "bad.jsonl", rows))
    text = "\n".join(report.problems)
    assert "line 2: invalid JSON" in text
    assert "line 3: messages[0].role must be one of" in text
    assert "line 4: messages[0].content is empty" in text
    assert "line 5: no assistant turn" in text
    assert "line 6: messages[0] has unknown key(s) ['mood']" in text
    assert "line 7: looks like alpaca, not chat" in text
    assert len(examples) == 2 and any("fine-tuning needs at least 10" in w for w in report.warnings)


def test_a_preference_prompt_given_as_messages_is_checked_as_messages(tmp_path: Path) -> None:
    """A pair's prompt may be a conversation ending with the user's turn (no assistant turn needed: `chosen` and
    `rejected` answer it); anything else in that list is named by line and field, not left to crash training."""
    pair = {"chosen": "Hello!", "rejected": "Go away."}
    rows = [{**pair, "prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}]},
            {**pair, "prompt": ["Hi"]}, {**pair, "prompt": []}, {**pair, "prompt": [{"role": "user", "content": 5}]},
            {**pair, "prompt": [{"role": "wizard", "content": "x"}]},
            {**pair, "prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}]
    report, examples = check(write(tmp_path / "pairs.jsonl", rows))
    text = "\n".join(report.problems)
    assert "line 2: prompt[0] must be an object with 'role' and 'content'" in text
    assert "line 3: 'prompt' must be a non-empty list" in text
    assert "line 4: prompt[0].content is empty or not a string" in text
    assert "line 5: prompt[0].role must be one of" in text
    assert "line 6: 'prompt' must end with a user message" in text
    assert [e.line for e in examples] == [1] and examples[0].messages[-1] == {"role": "user", "content": "Hi"}


def test_duplicates_exact_and_near(tmp_path: Path) -> None:
    near = chat(FACTS[3]["messages"][0]["content"], FACTS[3]["messages"][1]["content"] + "!")
    report, _ = check(write(tmp_path / "d.jsonl", [*FACTS, FACTS[1], near]))
    assert report.exact_duplicates == [(13, 2)]
    assert report.near_duplicates == [(14, 4)]


@pytest.mark.slow
def test_token_statistics_and_time_estimate(tmp_path: Path, default_model: str,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    rows = [chat(f"Question {i} about the {w} shop?", f"The {w} answer number {i}.") for i, w in
            enumerate("red green blue cyan pink gold gray teal navy lime plum rose sand wine jade ruby".split())]
    long = chat("Tell me everything.", "word " * 400)
    report, _ = check(write(tmp_path / "t.jsonl", [*rows, *FACTS, long]), model=default_model, max_length=200)
    assert report.tokens["max"] > 400 > report.tokens["p95"] >= report.tokens["min"] > 20
    assert report.tokens["max"] > report.tokens["mean"] > report.tokens["min"]
    assert report.tokens["total_per_epoch"] > 28 * 20
    assert report.too_long == [29]
    assert report.measured_tokens_per_second > 0 and report.estimated_seconds_per_epoch > 0
    # the measurement is kept (hardware.json): another check with the same model loads nothing and says the same
    from ownllm.home import ownllm_home

    kept = json.loads((ownllm_home() / "hardware.json").read_text())["training_speed"]
    assert report.measured_tokens_per_second in {round(speed, 1) for speed in kept.values()}
    monkeypatch.setattr("ownllm.data.doctor._training_speed", lambda *_: pytest.fail("measured again"))
    again, _ = check(write(tmp_path / "u.jsonl", rows), model=default_model)
    assert again.measured_tokens_per_second == report.measured_tokens_per_second


def test_prepare_dedups_before_splitting_and_writes_atomically(tmp_path: Path) -> None:
    source = write(tmp_path / "in.jsonl", [*FACTS, FACTS[0], FACTS[5], "{broken"])
    out = tmp_path / "prepared"
    report = prepare(source, out, val_ratio=0.25, seed=1)
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "train.jsonl", "validation.jsonl"]
    train = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    validation = [json.loads(line) for line in (out / "validation.jsonl").read_text().splitlines()]
    assert len(train) + len(validation) == 12 and len(validation) == 3
    assert not {json.dumps(r) for r in train} & {json.dumps(r) for r in validation}  # no leak across the split
    assert [tuple(d) for d in report["dropped"]["exact_duplicates"]] == [(13, 1), (14, 6)]
    assert len(report["dropped"]["unusable"]) == 1


def test_unusable_input_writes_nothing(tmp_path: Path) -> None:
    source = write(tmp_path / "bad.jsonl", ["{nope", "[1, 2]"])
    out = tmp_path / "prepared"
    with pytest.raises(OwnLLMError, match="no usable examples"):
        prepare(source, out)
    assert not out.exists() and not list(tmp_path.glob(".prepared-*"))
    assert_user_error(run_cli("data", "prepare", str(source), "--out", str(out)), "no usable examples")
    assert_user_error(run_cli("data", "check", str(tmp_path / "missing.jsonl")), "no such file")
    assert_user_error(run_cli("data", "check", str(source)), "line 1: invalid JSON")


def test_cli_check_json(tmp_path: Path) -> None:
    source = write(tmp_path / "ok.jsonl", FACTS)
    result = run_cli("data", "check", str(source), "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["format"] == "chat" and data["examples"] == 12 and data["problems"] == []
