"""A job's files through the data doctor, before it waits for a worker: bad lines fail the job at once with the
doctor's line-numbered messages (the upload itself was accepted, as OpenAI does)."""

from __future__ import annotations

import json
from typing import Any

from ownllm.data.doctor import read_examples
from ownllm.jobs.store import JobStore


def validate_files(store: JobStore, job: dict[str, Any]) -> tuple[int, str | None]:
    """(usable examples, None) or (0, the data doctor's line-numbered problems as one message)."""
    method = json.loads(job["method"]).get("type", "supervised")
    examples = 0
    for field, file_id in (("training_file", job["training_file"]), ("validation_file", job["validation_file"])):
        if not file_id:
            continue
        meta = store.get_file(file_id)
        if meta is None:
            return 0, f"{field} {file_id} no longer exists"
        fmt, found, problems = read_examples(store.file_path(file_id))
        if problems:
            path = store.file_path(file_id)  # messages name the upload's own file name, not where it is kept
            shown = "; ".join(p.replace(str(path), meta["filename"]).replace(path.name, meta["filename"])
                              for p in problems[:5])
            more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
            return 0, f"The {field.replace('_', ' ')} {meta['filename']} has {len(problems)} invalid " \
                      f"line(s): {shown}{more}"
        wanted = "preference" if method == "dpo" else None
        if wanted and fmt != wanted:
            return 0, f"The {field.replace('_', ' ')} {meta['filename']} is not preference data, which DPO needs " \
                      "(input/preferred_output/non_preferred_output)"
        if method != "dpo" and fmt in ("preference", "text"):
            return 0, f"The {field.replace('_', ' ')} {meta['filename']} holds {fmt} data; supervised fine-tuning " \
                      "needs conversations (messages)"
        if field == "training_file":
            examples = len(found)
            if examples < 10:
                return 0, f"The training file {meta['filename']} has {examples} example(s); at least 10 are needed"
    return examples, None


def validate_or_fail(store: JobStore, job: dict[str, Any]) -> int | None:
    """The number of training examples, with the job moved on to `queued`; None when the job failed."""
    examples, problem = validate_files(store, job)
    if problem:
        store.set_status(job["id"], "failed", problem, error={"code": "invalid_training_file", "message": problem,
                                                              "param": "training_file"})
        return None
    if job["status"] == "validating_files":
        store.set_status(job["id"], "queued", "Files validated, moving job to queued state")
    return examples
