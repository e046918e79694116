"""What the jobs tests share: the shipped training data and the client-side waits."""

from __future__ import annotations

import time
from pathlib import Path

import openai

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "data"


def small_facts(folder: Path) -> Path:
    """The shipped facts' first four facts (16 lines) as facts-train.jsonl in `folder`: a job on them makes 40
    replay answers, not the whole file's 200, and the base model's answers are cached across the jobs of a run."""
    path = folder / "facts-train.jsonl"
    path.write_text("".join((EXAMPLES / "facts-train.jsonl").read_text().splitlines(True)[:16]))
    return path


def wait_for(client: openai.OpenAI, job_id: str, statuses: tuple[str, ...], timeout: float = 400) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in statuses:
            return job
        time.sleep(1)
    raise AssertionError(f"job {job_id} still {job.status} after {timeout} s")


def upload(client: openai.OpenAI, path: Path) -> str:
    with path.open("rb") as handle:
        return client.files.create(file=handle, purpose="fine-tune").id
