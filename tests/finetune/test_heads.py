"""Heads on the base, trained with LoRA on the real default model: a reward model beats chance on held-out
preference pairs, a classifier on the shipped tickets beats the majority class; bad lines are named before
training."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from ownllm.errors import OwnLLMError
from tests.conftest import assert_user_error, run_cli

pytestmark = pytest.mark.slow
TICKETS = Path(__file__).resolve().parents[2] / "examples" / "classify"
TASKS = ["bake bread", "change a tyre", "learn Spanish", "plant tomatoes", "write a CV", "fix a leaking tap",
         "train for a 10k run", "brew coffee", "save money", "paint a wall", "start a blog", "clean a laptop",
         "make pasta", "tie a tie", "fall asleep faster", "prepare for an interview"]
HELD_OUT = ["grow basil", "repair a bike chain", "make tea", "study for an exam", "wash a car", "sew a button"]
RUDE = ["No.", "Figure it out yourself.", "Not my problem.", "Stop asking me that."]


def pairs(tasks: list[str]) -> str:
    return "".join(json.dumps({
        "prompt": f"How do I {task}?",
        "chosen": f"Happy to help! To {task}, start with the basics, take it one step at a time and check your "
                  "progress as you go.",
        "rejected": RUDE[number % len(RUDE)]}) + "\n" for number, task in enumerate(tasks))


def train_here(**settings: Any) -> Any:
    from ownllm.finetune.config import load_config
    from ownllm.finetune.run import run

    return run(load_config(model="smollm2-135m-instruct", val_ratio=0, lora_r=8, **settings))


def test_reward_model_beats_chance_on_held_out_pairs(default_model: str, tmp_path: Path) -> None:
    train, held = tmp_path / "prefs.jsonl", tmp_path / "held.jsonl"
    train.write_text(pairs(TASKS))
    held.write_text(pairs(HELD_OUT))
    out = tmp_path / "rm"
    train_here(data=str(train), out=str(out), method="reward", max_steps=3, batch_size=4, lr=1e-3)
    assert json.loads((out / "final" / "ownllm_run.json").read_text())["method"] == "reward"
    result = run_cli("eval", "reward", str(out), "--data", str(held), "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout)
    assert summary["pairs"] == len(HELD_OUT) and summary["pairwise_accuracy"] > 0.5
    from ownllm.finetune.reward_model import load_reward_model, render, score_texts  # `ownllm score`, in-process

    model, tokenizer = load_reward_model(out)
    question = [{"role": "user", "content": "How do I knit a scarf?"}]
    polite, rude = score_texts(model, tokenizer, [render(tokenizer, question, "Happy to help! Take it one step at a "
                                                         "time."), render(tokenizer, question, "No.")])
    assert polite > rude


def test_classifier_beats_the_majority_class(default_model: str, tmp_path: Path) -> None:
    out = tmp_path / "cls"
    train_here(data=str(TICKETS / "tickets-train.jsonl"), out=str(out), task="classify", max_steps=12, batch_size=8,
               lr=1e-3)
    from ownllm.finetune.classify import Classifier, evaluate_classifier, read_labelled

    plot = tmp_path / "confusion.png"
    summary, rows = evaluate_classifier(Classifier(out), read_labelled(TICKETS / "tickets-test.jsonl"), plot)
    assert summary["accuracy"] >= summary["majority_accuracy"] + 0.2, summary
    assert summary["macro_f1"] > 0.5 and plot.stat().st_size > 1000 and len(rows) == summary["items"]
    label, probabilities = Classifier(out).classify(["Where is my parcel? It never arrived."])[0]
    assert label in probabilities and sum(probabilities.values()) == pytest.approx(1, abs=1e-3)
    unseen = tmp_path / "unseen.jsonl"
    unseen.write_text('{"text": "I want my money back", "label": "refund-request"}\n')
    assert_user_error(run_cli("eval", "classify", str(out), "--data", str(unseen)),
                      "unseen.jsonl line 1: label 'refund-request' is not one the classifier knows")
    _served_classifier_answers(out, default_model)


def _served_classifier_answers(run: Path, default_model: str) -> None:
    """POST /v1/classify on a real server: labels and probabilities like the Python API; bad requests are 4xx."""
    import httpx

    from ownllm.finetune.classify import Classifier
    from tests.serve.conftest import Server

    server = Server(default_model, "--classifier", f"tickets={run}", "--no-jobs", "--max-batch", "1")
    try:
        texts = ["Where is my parcel? It never arrived.", "I was charged twice this month."]
        reply = httpx.post(f"{server.url}/v1/classify", json={"model": "tickets", "input": texts}, timeout=120)
        assert reply.status_code == 200, reply.text
        body = reply.json()
        expected = Classifier(run).classify(texts)
        assert [(d["label"], d["index"]) for d in body["data"]] == [(label, i) for i, (label, _) in
                                                                     enumerate(expected)]
        assert body["data"][0]["probabilities"] == pytest.approx(expected[0][1], abs=1e-3)
        assert body["usage"]["prompt_tokens"] > 0 and not body["data"][0]["truncated"]
        chat = httpx.post(f"{server.url}/v1/chat/completions", timeout=30,
                          json={"model": "tickets", "messages": [{"role": "user", "content": "hi"}]})
        assert chat.status_code == 400 and "is a classifier" in chat.json()["error"]["message"]
        models = httpx.get(f"{server.url}/v1/models", timeout=30).json()["data"]
        assert {"id": "tickets", "task": "classify"}.items() <= next(m for m in models if m["id"] == "tickets").items()
        huge = {"model": "tickets", "input": ["refund " * 200] * 256}  # ~51k tokens: refused before any forward
        reply = httpx.post(f"{server.url}/v1/classify", json=huge, timeout=120)
        assert reply.status_code == 400 and reply.json()["error"]["code"] == "too_many_tokens", reply.text
        for request, status in (({"model": "nope", "input": "hi"}, 404), ({"model": "tickets", "input": []}, 400),
                                ({"model": "tickets", "input": "  "}, 400), ({"model": "tickets"}, 400)):
            reply = httpx.post(f"{server.url}/v1/classify", json=request, timeout=30)
            assert reply.status_code == status and "error" in reply.json(), (request, reply.text)
        blank = httpx.post(f"{server.url}/v1/classify", json={"model": "tickets", "input": ["ok", " "]}, timeout=30)
        assert blank.status_code == 400 and "input[1] is empty" in blank.json()["error"]["message"], blank.text
    finally:
        server.stop()
    from ownllm.cli.serve import _named_folders  # the CLI's parsing; its one-line errors: tests/test_cli_hostile.py
    from ownllm.serve.run import build_state

    with pytest.raises(OwnLLMError, match="no such folder"):  # before the model loads
        build_state("no-such-model", classifiers={"x": run / "missing"})
    with pytest.raises(OwnLLMError, match="is not a finished classification run"):
        build_state("no-such-model", classifiers={"x": run.parent})
    with pytest.raises(OwnLLMError, match="given twice"):
        build_state("no-such-model", adapters={"x": run}, classifiers={"x": run})
    for bad, needle in ((["tickets"], "--classifier takes NAME=FOLDER"), (["a=1", "a=2"], "names 'a' twice")):
        with pytest.raises(OwnLLMError, match=needle):
            _named_folders(bad, "classifier")


def test_bad_lines_are_named_before_training(tmp_path: Path) -> None:
    unlabelled = tmp_path / "labels.jsonl"
    unlabelled.write_text('{"text": "refund please", "label": "billing"}\n{"text": "it broke"}\n')
    with pytest.raises(OwnLLMError, match=r"labels\.jsonl line 2: needs 'label'"):
        train_here(data=str(unlabelled), out=str(tmp_path / "c"), task="classify")
    assert not (tmp_path / "c").exists()
    half = tmp_path / "half.jsonl"
    half.write_text('{"prompt": "Hi?", "chosen": "Hello!", "rejected": "Go away."}\n'
                    '{"prompt": "Hi?", "chosen": "Hey"}\n')
    result = run_cli("finetune", "--method", "reward", "--data", str(half), "--out", str(tmp_path / "r"))
    assert_user_error(result, "half.jsonl")
    with pytest.raises(OwnLLMError, match="method lora"):
        train_here(data=str(unlabelled), out=str(tmp_path / "c"), task="classify", method="full")


def test_empty_text_is_refused_before_a_model_loads(tmp_path: Path) -> None:
    for verb in ("classify", "score"):
        assert_user_error(run_cli(verb, str(tmp_path / "no-run"), "  "), "text is empty")
