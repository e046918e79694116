"""A job's files through the data doctor, before it waits for a worker: bad lines fail the job at once with the
doctor's line-numbered messages (the upload itself was accepted, as OpenAI does).

Whatever a file holds (not JSON, not UTF-8, no known format, nothing at all), validation ends the job in
`failed` with a message; it never raises on a file's content, so one bad upload cannot stall the queue."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ownllm.data.doctor import scan_examples
from ownllm.jobs.store import JobStore

SHOWN = 5  # problems quoted in a job's error message; the rest are counted


def validate_files(store: JobStore, job: dict[str, Any]) -> tuple[int, str | None, str]:
    """(usable examples, None, _) or (0, the data doctor's line-numbered problems as one message, the field:
    training_file or validation_file)."""
    method = json.loads(job["method"]).get("type", "supervised")
    examples = 0
    for field, file_id in (("training_file", job["training_file"]), ("validation_file", job["validation_file"])):
        if not file_id:
            continue
        meta = store.get_file(file_id)
        label = field.replace("_", " ")
        if meta is None:
            return 0, f"{field} {file_id} no longer exists", field
        path = store.file_path(file_id)
        if not path.is_file():
            return 0, f"The {label} {meta['filename']} ({file_id}) is missing from the server's data folder", field
        if method == "reinforcement":
            found_prompts, problem = _prompt_rows(path, job)
            if problem:
                message = problem.replace(str(path), meta["filename"]).replace(path.name, meta["filename"])
                return 0, f"The {label} {meta['filename']} cannot be used for reinforcement fine-tuning: {message}", \
                    field
            if field == "training_file":
                examples = found_prompts
                if examples < 10:
                    return 0, f"The training file {meta['filename']} has {examples} prompt(s); at least 10 are " \
                              "needed", field
            continue
        fmt, found, problems = scan_examples(path)
        if problems:
            # messages name the upload's own file name, not where the server keeps it
            shown = "; ".join(p.replace(str(path), meta["filename"]).replace(path.name, meta["filename"])
                              for p in problems[:SHOWN])
            more = f" (and {len(problems) - SHOWN} more)" if len(problems) > SHOWN else ""
            return 0, f"The {label} {meta['filename']} has {len(problems)} invalid line(s): {shown}{more}", field
        if not found:
            return 0, f"The {label} {meta['filename']} has no examples (it is empty or only blank lines)", field
        wanted = "preference" if method == "dpo" else None
        if wanted and fmt != wanted:
            return 0, f"The {label} {meta['filename']} is not preference data, which DPO needs " \
                      "(input/preferred_output/non_preferred_output)", field
        if method != "dpo" and fmt in ("preference", "text"):
            return 0, f"The {label} {meta['filename']} holds {fmt} data; supervised fine-tuning " \
                      "needs conversations (messages)", field
        if field == "training_file":
            examples = len(found)
            if examples < 10:
                return 0, f"The training file {meta['filename']} has {examples} example(s); at least 10 are " \
                          "needed", field
    return examples, None, "training_file"


def _prompt_rows(path: Path, job: dict[str, Any]) -> tuple[int, str | None]:
    """(prompts, None) or (0, the problem): each line a prompt (messages ending with a user turn) holding every
    field the job's grader reads."""
    from ownllm.errors import OwnLLMError
    from ownllm.finetune.graders import grader_reward
    from ownllm.finetune.grpo import read_rl_data

    try:
        table = read_rl_data(path, [grader_reward(json.loads(job["method"])["reinforcement"]["grader"])])
    except OwnLLMError as exc:
        return 0, exc.message
    return len(table), None


def validate_or_fail(store: JobStore, job: dict[str, Any]) -> int | None:
    """The number of training examples, with the job moved on to `queued`; None when the job failed."""
    examples, problem, field = validate_files(store, job)
    if problem:
        store.set_status(job["id"], "failed", problem, error={"code": "invalid_training_file", "message": problem,
                                                              "param": field})
        return None
    if job["status"] == "validating_files":
        store.set_status(job["id"], "queued", "Files validated, moving job to queued state")
    return examples
