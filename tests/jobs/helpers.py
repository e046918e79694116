"""What the jobs tests share: the shipped training data and the client-side waits."""

from __future__ import annotations

import os
import time
from pathlib import Path

import openai

from tests.conftest import TEST_HOME

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "data"


def small_facts() -> Path:
    """The shipped facts' first four facts (16 lines) as facts-train.jsonl in the test home (one file per run, not
    a temporary folder per importing process left behind): a job on them makes 40 replay answers, not the whole
    file's 200, and the base model's answers are cached across the jobs of a run."""
    folder = TEST_HOME / "test-data"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "facts-train.jsonl"
    written = folder / f".facts-train.{os.getpid()}"  # each worker writes the same bytes, then swaps them in whole
    written.write_text("".join((EXAMPLES / "facts-train.jsonl").read_text().splitlines(True)[:16]))
    os.replace(written, path)
    return path


def wait_for(client: openai.OpenAI, job_id: str, statuses: tuple[str, ...], timeout: float = 400) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in statuses:
            return job
        time.sleep(0.25)  # (a job that ended is seen at once: the worker here waits on it)
    raise AssertionError(f"job {job_id} still {job.status} after {timeout} s")


def upload(client: openai.OpenAI, path: Path) -> str:
    with path.open("rb") as handle:
        return client.files.create(file=handle, purpose="fine-tune").id
