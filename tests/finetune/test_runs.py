"""Runs you can trust: Ctrl-C saves a checkpoint, two processes (DDP over gloo), memory warning, replay and the
before/after checks."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import run_cli, start_cli
from tests.finetune.test_finetune import FACTS, facts, train_args  # noqa: F401  (fixture)

pytestmark = pytest.mark.slow


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]


def test_ctrl_c_saves_a_checkpoint_and_resume_finishes(facts: Path, tmp_path: Path) -> None:  # noqa: F811
    out = tmp_path / "run"
    arguments = train_args(facts, out, "--max-steps", "8", "--save-every", "100", "--val-ratio", "0")
    log = tmp_path / "stderr.txt"
    with log.open("w") as stream:
        process = start_cli(*arguments, stdout=subprocess.DEVNULL, stderr=stream)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not ((out / "metrics.jsonl").is_file() and _rows(out)):
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    process.wait(timeout=240)
    stderr = log.read_text()
    assert process.returncode == 130, stderr[-2000:]
    assert "stopped at step" in stderr and "--resume" in stderr and "Traceback" not in stderr
    checkpoints = list((out / "checkpoints").glob("checkpoint-*"))
    assert len(checkpoints) == 1 and (checkpoints[0] / "trainer_state.json").is_file()
    assert not (out / "final").exists()
    stopped = int(checkpoints[0].name.split("-")[1])
    assert 1 <= stopped < 8
    assert run_cli(*arguments, "--resume").returncode == 0
    assert [r["step"] for r in _rows(out) if "loss" in r] == list(range(1, 9))


def test_two_processes_train_data_parallel(facts: Path, tmp_path: Path) -> None:  # noqa: F811
    out = tmp_path / "ddp"
    result = run_cli(*train_args(facts, out, "--max-steps", "4", "--batch-size", "2", "--val-ratio", "0",
                                 "--nproc", "2"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "final" / "adapter_config.json").is_file()
    rows = [r for r in _rows(out) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    # 12 examples, 2 processes x batch 2 = 4 per step: one epoch every 3 steps (alone it would take 6)
    assert rows[2]["epoch"] == pytest.approx(1.0)
    assert json.loads((out / "meta.json").read_text())["trained_tokens"] > 0
    reply = run_cli("generate", str(out), "Who designed the Lumen Volta?", "--chat", "--max-new-tokens", "8")
    assert reply.returncode == 0 and reply.stdout.strip()


def test_memory_warning_before_a_run_that_will_not_fit() -> None:
    from ownllm.finetune.config import load_config
    from ownllm.finetune.memory_check import check_memory

    cfg = load_config(None, data="x.jsonl", method="full", batch_size=32, max_length=2048)
    tight = check_memory(cfg, available=2 * 1024**3)
    assert tight.risky and "GiB" in tight.message() and "--batch-size" in tight.message()
    roomy = check_memory(load_config(None, data="x.jsonl"), available=64 * 1024**3)
    assert not roomy.risky
    lora, qlora = (check_memory(load_config(None, data="x", method=m), available=1e12).needed
                   for m in ("lora", "qlora"))
    assert qlora < lora  # the 4-bit base is what QLoRA saves


def test_replay_and_before_after_checks(facts: Path, tmp_path: Path) -> None:  # noqa: F811
    questions = tmp_path / "questions.jsonl"
    questions.write_text(json.dumps({"question": "Who designed the Lumen Volta?", "answers": ["Brandt"]}) + "\n"
                         + json.dumps({"question": "What is the capital of France?", "answers": ["Paris"]}) + "\n")
    config = tmp_path / "run.yaml"
    config.write_text(f"checks:\n  mixed: {questions}\n")
    out = tmp_path / "run"
    result = run_cli(*train_args(facts, out, "--max-steps", "4", "--val-ratio", "0", "--config", str(config),
                                 "--replay", "4"))
    assert result.returncode == 0, result.stderr[-3000:]
    replay = [json.loads(line) for line in (out / "replay.jsonl").read_text().splitlines()]
    assert 1 <= len(replay) <= 4 and all(r["messages"][1]["role"] == "assistant" for r in replay)
    checks = json.loads((out / "meta.json").read_text())["checks"]["mixed"]
    assert checks["items"] == 2 and checks["base"] == 0.5  # the base knows Paris, not the made-up designer
    assert "mixed" in result.stdout and "before and after" in (out / "README.md").read_text().lower()
