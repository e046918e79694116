"""Perplexity, QA, harness and compare on the real default model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from ownllm.errors import OwnLLMError
from ownllm.evaluate.perplexity import Document, load_documents, perplexity
from ownllm.evaluate.qa import read_questions, run_qa, summarize
from ownllm.generate.params import SamplingParams

pytestmark = pytest.mark.slow
EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "eval"
TEXT = "The quick brown fox jumps over the lazy dog. Paris is the capital and largest city of France."


def test_perplexity_matches_a_direct_computation(engine) -> None:
    ids = engine.tokenizer(TEXT).input_ids
    with torch.inference_mode():
        loss = engine.model(input_ids=torch.tensor([ids]), labels=torch.tensor([ids])).loss
    result = perplexity(engine, [Document(ids, [True] * len(ids))], max_length=512)
    assert result.perplexity == pytest.approx(math.exp(float(loss)), rel=1e-3)
    assert result.tokens_scored == len(ids) - 1


def test_sliding_window_scores_every_token_once(engine) -> None:
    ids = engine.tokenizer(TEXT * 4).input_ids
    result = perplexity(engine, [Document(ids, [True] * len(ids))], max_length=32, stride=16)
    assert result.tokens_scored == len(ids) - 1
    full = perplexity(engine, [Document(ids, [True] * len(ids))], max_length=512)
    assert result.perplexity > full.perplexity * 0.9  # less context can only make it (about) worse


def test_max_length_past_the_context_is_clamped(engine) -> None:
    ids = engine.tokenizer(TEXT).input_ids
    result = perplexity(engine, [Document(ids, [True] * len(ids))], max_length=100_000)
    assert result.max_length == engine.context_length and "clamped" in result.notes[0]


def test_chat_data_scores_only_assistant_turns(engine, tmp_path: Path) -> None:
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "What is the capital of France?"},
                                             {"role": "assistant", "content": "Paris."}]}) + "\n")
    (document,) = load_documents(engine, data)
    scored = [i for i, keep in zip(document.ids, document.scored, strict=True) if keep]
    assert engine.tokenizer.decode(scored).startswith("Paris.")
    assert perplexity(engine, [document]).tokens_scored == len(scored)


def test_bad_data_is_named_by_line(engine, tmp_path: Path) -> None:
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "fine"}\n{"nope": 1}\nnot json\n')
    with pytest.raises(OwnLLMError, match="line 3: invalid JSON"):
        load_documents(engine, data)
    data.write_text('{"text": "fine"}\n{"nope": 1}\n')
    with pytest.raises(OwnLLMError, match="line 2: needs a non-empty 'text'"):
        load_documents(engine, data)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(OwnLLMError, match="is empty"):
        load_documents(engine, tmp_path / "empty.jsonl")


def test_qa_on_a_few_items(engine) -> None:
    items = read_questions(EXAMPLES / "qa.jsonl")[:4]
    results = run_qa(engine, items, SamplingParams(max_new_tokens=16), batch_size=4)
    assert [r.line for r in results] == [1, 2, 3, 4]
    summary = summarize(results)
    assert summary["items"] == 4 and 0 < summary["contains"] <= 1  # the model knows some capitals
    assert all(0 <= r.scores["f1"] <= 1 for r in results)


def test_qa_missing_fields(tmp_path: Path) -> None:
    data = tmp_path / "q.jsonl"
    data.write_text('{"question": "Q?", "answers": ["A"]}\n{"question": "Q?"}\n{"answers": ["A"]}\n')
    with pytest.raises(OwnLLMError) as info:
        read_questions(data)
    assert "line 2: needs 'answers'" in str(info.value) and "line 3: needs 'question'" in str(info.value)


def test_harness_on_a_shipped_task(engine) -> None:
    from ownllm.evaluate.harness import run_harness

    results = run_harness(engine, [str(EXAMPLES / "capitals_mc.yaml")])
    accuracy = results["ownllm_capitals_mc"]["acc,none"]
    assert 0.25 < accuracy <= 1.0  # better than chance on four choices


def test_harness_unknown_task(engine) -> None:
    from ownllm.evaluate.harness import run_harness

    with pytest.raises(OwnLLMError, match="no such task file"):
        run_harness(engine, ["missing.yaml"])


def test_compare_writes_a_report(default_model: str, tmp_path: Path) -> None:
    from ownllm.evaluate.compare import compare

    data = tmp_path / "q.jsonl"
    data.write_text("".join(line for line in (EXAMPLES / "qa.jsonl").read_text().splitlines(True)[:4]))
    out = tmp_path / "report"
    report = compare(default_model, default_model, data, out, params=SamplingParams(max_new_tokens=12),
                     dtype="fp32")
    assert sorted(p.name for p in out.iterdir()) == ["chart.png", "report.json", "report.md"]
    saved = json.loads((out / "report.json").read_text())
    assert saved["metrics"]["delta"]["f1"] == pytest.approx(0.0)  # the same model twice
    assert saved["metrics"]["base"]["perplexity"] == pytest.approx(report["metrics"]["tuned"]["perplexity"])
    assert "| f1 " in (out / "report.md").read_text()
    assert (out / "chart.png").read_bytes()[:4] == b"\x89PNG"
