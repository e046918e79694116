"""Quantized running (`--quant int8|nf4`, bitsandbytes on the transformers backend) and `ownllm quantize compare`
on the real default model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import assert_user_error, run_cli

pytestmark = pytest.mark.slow


def test_generate_runs_quantized_and_refuses_bad_quant(default_model: str) -> None:
    result = run_cli("generate", default_model, "The capital of France is", "--quant", "nf4", "--max-new-tokens", "6",
                     "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout)["usage"]["completion_tokens"] >= 1
    assert_user_error(run_cli("generate", default_model, "Hi", "--quant", "q8"), "unknown quantization 'q8'",
                      "use one of int8, nf4")


def test_int8_weights_are_smaller_and_answer_like_full_precision(default_model: str) -> None:
    from ownllm.generate.open import open_engine
    from ownllm.generate.params import SamplingParams

    params = SamplingParams(strategy="greedy", max_new_tokens=10)
    full = open_engine(default_model, dtype="fp32", device="cpu")
    int8 = open_engine(default_model, dtype="fp32", device="cpu", quant="int8")
    assert int8.model.get_memory_footprint() < 0.5 * full.model.get_memory_footprint()
    prompt = full.render_chat([{"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" in full.generate(prompt, params).text and "Paris" in int8.generate(prompt, params).text


def test_quantize_compare_writes_a_report_with_deltas(default_model: str, tmp_path: Path) -> None:
    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(json.dumps(row) + "\n" for row in (
        {"question": "What is the capital of France?", "answer": "Paris"},
        {"question": "How many legs does a spider have?", "answer": "eight"})))
    out = tmp_path / "report"
    result = run_cli("quantize", "compare", default_model, "--data", str(questions), "--formats", "q8_0",
                     "--out", str(out), "--max-new-tokens", "6", "--speed-tokens", "4", timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert [row["format"] for row in report["rows"]] == ["fp32", "q8_0"]
    reference, q8 = report["rows"]
    assert reference["delta"]["perplexity_pct"] == 0 and reference["qa"]["contains"] >= 0.5
    assert q8["size_mb"] < 0.35 * reference["size_mb"] and q8["delta"]["size_mb_pct"] < -60
    assert abs(q8["delta"]["perplexity_pct"]) < 10  # on two short answers: q8_0 stays close
    for row in report["rows"]:
        assert row["peak_ram_mb"] > 0 and row["tokens_per_second"] > 0
    assert (out / "chart.png").read_bytes()[:4] == b"\x89PNG"
    assert "| q8_0 |" in result.stdout and "| q8_0 |" in (out / "report.md").read_text()


def test_quantize_compare_bad_input(default_model: str, tmp_path: Path) -> None:
    text = tmp_path / "t.txt"
    text.write_text("Some text.")
    assert_user_error(run_cli("quantize", "compare", default_model, "--data", str(text), "--formats", "fp8"),
                      "unknown format 'fp8'")
    assert_user_error(run_cli("quantize", "compare", default_model, "--data", str(tmp_path / "none.txt"),
                              "--formats", "bf16", "--out", str(tmp_path / "r")), "no such file")
    assert not (tmp_path / "r").exists()
    from ownllm.errors import OwnLLMError
    from ownllm.export.compare import compare_formats

    questions = tmp_path / "q.jsonl"
    questions.write_text('{"question": "Capital of France?", "answer": "Paris"}\n{"answer": "no question"}\n')
    for data, needle in ((tmp_path, "is a folder"), (questions, r"q\.jsonl line 2")):
        with pytest.raises(OwnLLMError, match=needle):  # before any model loads: a missing model is not reached
            compare_formats("no-such-model", data, tmp_path / "r", formats=["bf16"])


def test_a_server_runs_quantized_one_request_at_a_time(default_model: str) -> None:
    """`ownllm serve --quant int8`: bitsandbytes weights are not plain weights, so the server says it decodes one
    request at a time and why, and its engine answers from the 8-bit weights."""
    from ownllm.generate.params import SamplingParams
    from ownllm.serve.run import build_state, startup_line

    state = build_state(default_model, quant="int8", dtype="fp32", max_batch=4)
    assert "one request at a time: the weights are quantized" in startup_line(state, "127.0.0.1", 8000)
    assert state.engine.model.get_memory_footprint() < 300e6  # 8-bit linear layers, not the 538 MB of fp32
    prompt = state.engine.render_chat([{"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" in state.engine.generate(prompt, SamplingParams(strategy="greedy", max_new_tokens=8)).text
