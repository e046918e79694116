"""OpenAI's fine-tuning flow against a real `ownllm serve` on loopback, driven by the official openai client:
upload, create, poll, events, checkpoints, use the new model at once, cancel, bad files, pagination, auth, and a
server killed mid-job that finishes the job after a restart."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.conftest import deeply_nested, run_cli
from tests.jobs.helpers import EXAMPLES, small_facts, upload, wait_for
from tests.serve.conftest import Server

pytestmark = pytest.mark.slow
KEY = "sk-jobs-test"
QUESTION = [{"role": "user", "content": "Who founded Norvale Instruments?"}]
FACTS = small_facts()


@pytest.fixture(scope="module")
def server(default_model: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    data_dir = tmp_path_factory.mktemp("server-data")
    running = Server(default_model, "--api-key", KEY, "--data-dir", str(data_dir), "--max-batch", "4")
    running.data_dir = data_dir  # type: ignore[attr-defined]
    yield running
    running.stop()


def start_until_first_checkpoint(client: openai.OpenAI, model: str, *, max_steps: int) -> Any:
    """A job on the shipped facts, returned once it has saved a checkpoint (something to resume from)."""
    job = client.fine_tuning.jobs.create(model=model, training_file=upload(client, FACTS),
                                         hyperparameters={"batch_size": 4, "max_steps": max_steps})
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not client.fine_tuning.jobs.checkpoints.list(job.id).data:
        time.sleep(0.5)
    assert client.fine_tuning.jobs.checkpoints.list(job.id).data, "no checkpoint before the kill"
    return job


def test_upload_train_and_chat_with_the_new_model_at_once(server: Server, default_model: str) -> None:
    client = server.client(KEY)
    file_id = upload(client, FACTS)
    assert client.files.retrieve(file_id).filename == "facts-train.jsonl"
    assert client.files.content(file_id).read() == FACTS.read_bytes()
    job = client.fine_tuning.jobs.create(model=default_model, training_file=file_id, suffix="norvale", seed=7,
                                         hyperparameters={"n_epochs": 1, "batch_size": 4,
                                                          "learning_rate_multiplier": 5.0, "max_steps": 8})
    assert job.status in ("validating_files", "queued", "running") and job.object == "fine_tuning.job"
    done = wait_for(client, job.id, ("succeeded", "failed", "cancelled"))
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model.startswith(f"ft:{default_model}:norvale:") and done.trained_tokens > 0
    messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100).data]
    assert any(m.startswith("Step 8/8: training loss=") for m in messages)
    assert "The job has successfully completed" in messages
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.step_number for c in checkpoints] == [8, 6, 4, 2]  # newest first, every quarter of the run
    metrics = client.files.content(done.result_files[0]).read().decode()
    assert metrics.splitlines()[0] == "step,train_loss,valid_loss" and len(metrics.splitlines()) == 9

    assert done.fine_tuned_model in [m.id for m in client.models.list().data]
    tuned = client.chat.completions.create(model=done.fine_tuned_model, messages=QUESTION, max_tokens=24,
                                           temperature=0).choices[0].message.content
    base = client.chat.completions.create(model=default_model, messages=QUESTION, max_tokens=24,
                                          temperature=0).choices[0].message.content
    assert tuned != base
    # the job's adapter has a scope (ownllm's default for fact-style data): other questions get the base's answer
    general = [{"role": "user", "content": "What is the capital of Japan?"}]
    assert client.chat.completions.create(model=done.fine_tuned_model, messages=general, max_tokens=16,
                                          temperature=0).choices[0].message.content == \
        client.chat.completions.create(model=default_model, messages=general, max_tokens=16,
                                       temperature=0).choices[0].message.content
    assert client.models.delete(done.fine_tuned_model).deleted
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model=done.fine_tuned_model, messages=QUESTION, max_tokens=4)
    with pytest.raises(openai.PermissionDeniedError):
        client.models.delete(default_model)


def test_a_bad_file_fails_the_job_with_line_numbers(server: Server, default_model: str, tmp_path: Path) -> None:
    client = server.client(KEY)
    lines = FACTS.read_text().splitlines()[:12]
    lines[2] = '{"messages": [{"role": "robot", "content": "hi"}]}'
    lines[5] = "{not json"
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    job = client.fine_tuning.jobs.create(model=default_model, training_file=upload(client, bad))
    failed = wait_for(client, job.id, ("failed", "succeeded"), timeout=60)
    assert failed.status == "failed" and failed.error.code == "invalid_training_file"
    assert "bad.jsonl line 3" in failed.error.message and "line 6" in failed.error.message
    with pytest.raises(openai.BadRequestError, match="not available for fine-tuning"):
        client.fine_tuning.jobs.create(model="gpt-4o-mini", training_file=upload(client, bad))
    with pytest.raises(openai.BadRequestError, match="does not exist"):
        client.fine_tuning.jobs.create(model=default_model, training_file="file-nope")


def test_cancel_stops_a_running_job(server: Server, default_model: str) -> None:
    client = server.client(KEY)
    job = client.fine_tuning.jobs.create(model=default_model, training_file=upload(client, FACTS),
                                         hyperparameters={"n_epochs": 10})
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # wait until it really trains
        if any(e.type == "metrics" for e in client.fine_tuning.jobs.list_events(job.id).data):
            break
        time.sleep(1)
    started = time.monotonic()
    assert client.fine_tuning.jobs.cancel(job.id).status == "cancelled"  # at once, as OpenAI replies
    cancelled = wait_for(client, job.id, ("cancelled", "failed", "succeeded"), timeout=60)
    assert cancelled.status == "cancelled" and time.monotonic() - started < 30
    assert not (server.data_dir / "runs" / job.id / "final").exists()  # type: ignore[attr-defined]
    with pytest.raises(openai.BadRequestError, match="already cancelled"):
        client.fine_tuning.jobs.cancel(job.id)


def test_lists_paginate_and_auth_applies(server: Server, default_model: str) -> None:
    client = server.client(KEY)
    ids = [upload(client, EXAMPLES / "facts-heldout.jsonl") for _ in range(3)]
    first = client.files.list(limit=2)
    assert first.has_more and [f.id for f in first.data] == ids[::-1][:2]
    rest = client.files.list(limit=2, after=first.data[-1].id)
    assert rest.data[0].id == ids[0]
    jobs = client.fine_tuning.jobs.list(limit=1)
    assert len(jobs.data) == 1 and jobs.has_more
    older = client.fine_tuning.jobs.list(limit=1, after=jobs.data[0].id)
    assert older.data[0].id != jobs.data[0].id
    assert client.files.delete(ids[0]).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(ids[0])
    stranger = server.client("sk-wrong")
    for call in (stranger.files.list, stranger.fine_tuning.jobs.list):
        with pytest.raises(openai.AuthenticationError):
            call()
    shown = run_cli("jobs", "list", "--url", server.url, "--api-key", KEY, "--json")
    assert shown.returncode == 0 and json.loads(shown.stdout)["data"]
    denied = run_cli("jobs", "list", "--url", server.url, "--api-key", "sk-wrong")
    assert denied.returncode == 2 and "401" in denied.stderr and "Traceback" not in denied.stderr


def test_a_killed_server_resumes_the_job_after_restart(default_model: str, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    first = Server(default_model, "--data-dir", str(data_dir), "--max-batch", "2")
    client = first.client()
    job = start_until_first_checkpoint(client, default_model, max_steps=4)  # checkpoints after every step
    first.process.send_signal(signal.SIGKILL)
    first.process.wait()
    second = Server(default_model, "--data-dir", str(data_dir), "--max-batch", "2")
    try:
        client = second.client()
        done = wait_for(client, job.id, ("succeeded", "failed", "cancelled"))
        assert done.status == "succeeded", done.error
        messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=200).data]
        assert any(m.startswith("Resuming from step") for m in messages)
        steps = [json.loads(line)["step"] for line in (data_dir / "runs" / job.id / "metrics.jsonl").read_text()
                 .splitlines() if "loss" in json.loads(line)]
        assert steps == list(range(1, 5))  # each step once: resumed, not restarted
        assert done.fine_tuned_model in [m.id for m in client.models.list().data]
    finally:
        second.stop()


def test_cli_creates_a_dpo_job_from_a_local_file_and_waits(server: Server, default_model: str,
                                                          tmp_path: Path) -> None:
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({
        "input": {"messages": [{"role": "user", "content": f"Greet visitor number {i}."}]},
        "preferred_output": [{"role": "assistant", "content": f"Welcome, visitor {i}! Glad you came."}],
        "non_preferred_output": [{"role": "assistant", "content": "Go away."}]}) + "\n" for i in range(12)))
    result = run_cli("jobs", "create", str(pairs), "--model", default_model, "--method", "dpo", "--batch-size", "2",
                     "--max-steps", "2", "--suffix", "polite", "--wait", "--url", server.url, "--api-key", KEY,
                     timeout=400)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "succeeded" in result.stdout and f"ft:{default_model}:polite:" in result.stdout
    assert "Step 2/2" in result.stdout  # the events, followed
    client = server.client(KEY)
    job = client.fine_tuning.jobs.list(limit=1).data[0]
    assert job.method.type == "dpo" and job.status == "succeeded"
    files = len(client.files.list().data)
    refused = run_cli("jobs", "create", str(pairs), "--model", "no-such-model", "--method", "dpo", "--url",
                      server.url, "--api-key", KEY)
    assert refused.returncode == 2 and "no-such-model" in refused.stderr
    assert len(client.files.list().data) == files  # the file it uploaded for the refused job is gone again


def test_a_killed_worker_is_restarted_and_resumes(server: Server, default_model: str) -> None:
    import os
    import sqlite3

    client = server.client(KEY)
    job = start_until_first_checkpoint(client, default_model, max_steps=4)
    database = sqlite3.connect(server.data_dir / "jobs.db")  # type: ignore[attr-defined]
    pid = database.execute("SELECT worker_pid FROM jobs WHERE id = ?", (job.id,)).fetchone()[0]
    database.close()
    # forked from the server's forkserver, which imported torch and transformers once, not a fresh interpreter
    parent = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]
    assert b"multiprocessing.forkserver" in Path(f"/proc/{parent}/cmdline").read_bytes()
    os.kill(pid, signal.SIGKILL)
    done = wait_for(client, job.id, ("succeeded", "failed", "cancelled"))
    assert done.status == "succeeded", done.error
    assert any(e.message.startswith("Resuming from step")
               for e in client.fine_tuning.jobs.list_events(job.id, limit=100).data)


def test_a_reinforcement_job_trains_against_a_grader(server: Server, default_model: str, tmp_path: Path) -> None:
    """method reinforcement = GRPO with the grader as the reward: its mean reward is logged per step; graders that
    cannot run here are refused up front, and a line missing a field the grader reads fails the job, named."""
    client = server.client(KEY)
    capitals = [("France", "Paris"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"), ("Egypt", "Cairo"),
                ("Peru", "Lima"), ("Kenya", "Nairobi"), ("Chile", "Santiago"), ("Cuba", "Havana"), ("Iran", "Tehran")]
    prompts = tmp_path / "capitals.jsonl"
    prompts.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"The capital of {country}?"}],
                                           "answer": city}) + "\n" for country, city in capitals))
    grader = {"type": "string_check", "name": "capital", "input": "{{sample.output_text}}",
              "reference": "{{item.answer}}", "operation": "ilike"}
    training_file = upload(client, prompts)

    def create(grader: dict[str, Any], file_id: str = training_file) -> Any:
        return client.fine_tuning.jobs.create(model=default_model, training_file=file_id, method={
            "type": "reinforcement", "reinforcement": {"grader": grader, "hyperparameters": {
                "max_steps": 1, "batch_size": 1, "compute_multiplier": 0.5}}})

    job = create(grader)
    assert job.method.type == "reinforcement"
    done = wait_for(client, job.id, ("succeeded", "failed", "cancelled"))
    assert done.status == "succeeded", done.error
    messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100).data]
    assert any(m.startswith("Step 1/1: training loss=") and "mean reward=" in m for m in messages), messages
    metrics = client.files.content(done.result_files[0]).read().decode().splitlines()
    assert metrics[0] == "step,train_loss,valid_loss,train_mean_reward" and len(metrics) == 2
    assert done.fine_tuned_model in [m.id for m in client.models.list().data]

    jobs = len(client.fine_tuning.jobs.list(limit=100).data)
    for bad, needle in (({**grader, "type": "python", "source": "import os"}, "run the request's code"),
                        ({**grader, "operation": "regex"}, "operation: must be one of eq, ne, like, ilike"),
                        ({**grader, "reference": "{{answer}}"}, "is not a field ownllm fills"),
                        ({"type": "multi"}, "multi graders are not supported"),
                        ({**grader, "reference": "{item.answer}"}, "has single braces"),
                        ({**grader, "extra": deeply_nested(600)}, "extra: is not a field of a string_check")):
        with pytest.raises(openai.BadRequestError, match=needle):
            create(bad)
    assert len(client.fine_tuning.jobs.list(limit=100).data) == jobs  # refused: none stored
    missing = tmp_path / "missing.jsonl"
    missing.write_text(prompts.read_text().replace(', "answer": "Lima"', ""))
    failed = wait_for(client, create(grader, upload(client, missing)).id, ("failed", "succeeded"), timeout=120)
    assert failed.status == "failed" and "missing.jsonl line 6: needs 'answer'" in failed.error.message
