"""`ownllm jobs ...`: OpenAI-style fine-tuning jobs on a running `ownllm serve` (upload, create, list, show,
events, cancel)."""

from __future__ import annotations

import contextlib
import json
import os
import time
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from ownllm.cli.options import JsonOpt, at_least_one, check_url
from ownllm.errors import OwnLLMError

UrlOpt = Annotated[str | None, typer.Option("--url", help="server (default $OWNLLM_URL or http://127.0.0.1:8000)")]
KeyOpt = Annotated[str | None, typer.Option("--api-key", help="API key (default $OWNLLM_API_KEY)")]


def _client(url: str | None, api_key: str | None) -> Any:
    from ownllm.client.jobs import JobsClient

    given = url or os.environ.get("OWNLLM_URL")
    if given:
        check_url(given, label="--url" if url else "OWNLLM_URL")
    return JobsClient(url, api_key)


def _when(stamp: int | None) -> str:
    return datetime.fromtimestamp(stamp).strftime("%Y-%m-%d %H:%M:%S") if stamp else "-"


def _print_event(event: dict[str, Any]) -> None:
    from ownllm.cli.render import out

    out.print(f"{_when(event['created_at'])}  {event['message']}", highlight=False)


def _show(job: dict[str, Any], as_json: bool) -> None:
    from ownllm.cli.render import out

    if as_json:
        out.print_json(json.dumps(job))
        return
    hyper = job.get("hyperparameters") or {}
    lines = [f"{job['id']}  [bold]{job['status']}[/bold]", f"  model: {job['model']}",
             f"  training file: {job['training_file']}",
             f"  created: {_when(job['created_at'])}, finished: {_when(job.get('finished_at'))}",
             "  hyperparameters: " + ", ".join(f"{k}={v}" for k, v in hyper.items())]
    if job.get("fine_tuned_model"):
        lines.append(f"  fine-tuned model: [green]{job['fine_tuned_model']}[/green] "
                     f"({job.get('trained_tokens')} trained tokens)")
    if job.get("error"):
        lines.append(f"  [red]error: {job['error'].get('message')}[/red]")
    out.print("\n".join(lines))


def upload(file: Annotated[Path, typer.Argument(help="JSONL training data")], url: UrlOpt = None,
           api_key: KeyOpt = None, purpose: Annotated[str, typer.Option()] = "fine-tune") -> None:
    """Upload a training file; prints its file id."""
    from ownllm.cli.render import out

    out.print(_client(url, api_key).upload(file, purpose)["id"])


def create(
    training_file: Annotated[str, typer.Argument(help="a file id, or a local JSONL file to upload first")],
    model: Annotated[str, typer.Option("--model", help="the server's base model")],
    validation_file: Annotated[str | None, typer.Option(help="file id or local file")] = None,
    method: Annotated[str, typer.Option(help="supervised | dpo | reinforcement")] = "supervised",
    grader: Annotated[Path | None, typer.Option(help="reinforcement: a JSON file holding an OpenAI grader "
                                                     "(string_check, text_similarity)")] = None,
    epochs: Annotated[int | None, typer.Option(help="n_epochs (default auto)")] = None,
    batch_size: Annotated[int | None, typer.Option()] = None,
    lr_multiplier: Annotated[float | None, typer.Option(help="learning_rate_multiplier")] = None,
    max_steps: Annotated[int | None, typer.Option(help="stop after this many steps (ownllm extension)")] = None,
    suffix: Annotated[str | None, typer.Option()] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    wait: Annotated[bool, typer.Option("--wait", help="follow the events until the job ends")] = False,
    url: UrlOpt = None, api_key: KeyOpt = None, as_json: JsonOpt = False,
) -> None:
    """Create a fine-tuning job (uploading local files first)."""
    if (grader is not None) != (method == "reinforcement"):
        raise OwnLLMError("--grader goes with --method reinforcement, and reinforcement needs a --grader",
                          param="grader")
    block: dict[str, Any] = {}
    if grader is not None:
        from ownllm.data.files import read_json_file
        from ownllm.finetune.graders import grader_problem

        block["grader"] = read_json_file(grader, param="grader")
        problem = grader_problem(block["grader"])  # before anything is uploaded: a refused job leaves no file
        if problem:
            raise OwnLLMError(f"{grader}: {' '.join(filter(None, ('grader', problem[0])))} {problem[1]}",
                              param="grader")
    client = _client(url, api_key)
    uploaded: list[str] = []

    def file_id(value: str | None) -> str | None:
        if value is None or value.startswith("file-"):
            return value
        uploaded.append(client.upload(Path(value))["id"])
        return uploaded[-1]

    hyper = {k: v for k, v in {"n_epochs": epochs, "batch_size": batch_size, "learning_rate_multiplier":
                               lr_multiplier, "max_steps": max_steps}.items() if v is not None}
    try:
        job = client.create(model=model, training_file=file_id(training_file),
                            validation_file=file_id(validation_file), suffix=suffix, seed=seed,
                            method={"type": method, method: {"hyperparameters": hyper, **block}})
    except OwnLLMError:
        for uploaded_id in uploaded:  # a refused job leaves no file behind that only it would have used
            with contextlib.suppress(OwnLLMError):
                client.delete_file(uploaded_id)
        raise
    _show(job, as_json)
    if wait and _follow(client, job["id"]) != "succeeded":
        raise typer.Exit(1)  # the job's own error is printed above; scripts need to tell it from a success


def list_jobs(limit: Annotated[int, typer.Option()] = 20, url: UrlOpt = None, api_key: KeyOpt = None,
              as_json: JsonOpt = False) -> None:
    """Jobs, newest first."""
    from rich.table import Table

    from ownllm.cli.render import out

    at_least_one(limit=limit)
    found = _client(url, api_key).list(limit)
    if as_json:
        out.print_json(json.dumps(found))
        return
    table = Table("id", "status", "model", "fine-tuned model", "created")
    for job in found["data"]:
        table.add_row(job["id"], job["status"], job["model"], job.get("fine_tuned_model") or "-",
                      _when(job["created_at"]))
    out.print(table)


def show(job_id: str, url: UrlOpt = None, api_key: KeyOpt = None, as_json: JsonOpt = False) -> None:
    """One job: status, hyper-parameters, the model it made, or its error."""
    _show(_client(url, api_key).get(job_id), as_json)


def events(job_id: str, follow: Annotated[bool, typer.Option("--follow", "-f", help="keep printing until the "
                                                                                      "job ends")] = False,
           url: UrlOpt = None, api_key: KeyOpt = None) -> None:
    """A job's events, oldest first."""
    client = _client(url, api_key)
    if follow:
        _follow(client, job_id)
        return
    for event in reversed(client.events(job_id)["data"]):
        _print_event(event)


def _follow(client: Any, job_id: str) -> str:
    """Print a job's events until it ends; its final status."""
    seen: set[str] = set()
    while True:
        for event in reversed(client.events(job_id, limit=100)["data"]):
            if event["id"] not in seen:
                seen.add(event["id"])
                _print_event(event)
        job = client.get(job_id)
        if job["status"] in ("succeeded", "failed", "cancelled"):
            _show(job, False)
            return job["status"]
        time.sleep(2)


def cancel(job_id: str, url: UrlOpt = None, api_key: KeyOpt = None, as_json: JsonOpt = False) -> None:
    """Cancel a job: training stops at the next step."""
    _show(_client(url, api_key).cancel(job_id), as_json)
