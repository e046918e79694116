"""OpenAI's files and fine-tuning jobs API, over the job store and manager (ownllm.jobs): thin routes that
translate rows into OpenAI's object shapes."""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, File, Form, Query, UploadFile
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr, ValidationError

from ownllm.home import usual_mode
from ownllm.jobs.manager import JobManager
from ownllm.jobs.store import ACTIVE, JobStore, fine_tuned_name
from ownllm.serve.errors import APIError
from ownllm.serve.protocol import ValidUnicode

UPLOAD_PURPOSES = ("fine-tune", "batch", "assistants", "user_data", "evals")
MAX_STEPS = 100_000  # ownllm's max_steps extension: bounded, so no request trains for ever
SEED_MAX = 2**31 - 1  # OpenAI's bound; numpy (transformers' set_seed) takes seeds below 2**32 only
SUFFIX = re.compile(r"[A-Za-z0-9._-]{0,64}")  # it becomes part of a model id (ft:BASE:SUFFIX:ID)

# "auto" (or null) lets the worker choose; numbers are strict (no booleans, no strings, no NaN or Infinity)
Auto = Literal["auto"] | None
Number = StrictInt | StrictFloat


class SupervisedHyperparameters(BaseModel):
    """OpenAI's accepted ranges; the descriptions are the error messages' "must be ..."."""

    model_config = ConfigDict(extra="forbid")
    n_epochs: Auto | Annotated[StrictInt, Field(ge=1, le=50)] = Field(
        "auto", description="'auto' or an integer from 1 to 50")
    batch_size: Auto | Annotated[StrictInt, Field(ge=1, le=256)] = Field(
        "auto", description="'auto' or an integer from 1 to 256")
    learning_rate_multiplier: Auto | Annotated[Number, Field(gt=0, le=10, allow_inf_nan=False)] = Field(
        "auto", description="'auto' or a number greater than 0 and at most 10")
    max_steps: Annotated[StrictInt, Field(ge=1, le=MAX_STEPS)] | None = Field(
        None, description=f"an integer from 1 to {MAX_STEPS} (ownllm extension: stop after this many steps)")


class DpoHyperparameters(SupervisedHyperparameters):
    beta: Auto | Annotated[Number, Field(gt=0, le=2, allow_inf_nan=False)] = Field(
        "auto", description="'auto' or a number greater than 0 and at most 2")


class ReinforcementHyperparameters(SupervisedHyperparameters):
    """OpenAI's reinforcement hyper-parameters that map onto GRPO; eval_interval, eval_samples and reasoning_effort
    do not (no separate eval pass, no reasoning models here) and are refused as unknown."""

    compute_multiplier: Auto | Annotated[Number, Field(ge=0.5, le=4, allow_inf_nan=False)] = Field(
        "auto", description="'auto' or a number from 0.5 to 4 (completions sampled per prompt: 4 x this)")


HYPERPARAMETERS: dict[str, type[SupervisedHyperparameters]] = {"supervised": SupervisedHyperparameters,
                                                              "dpo": DpoHyperparameters,
                                                              "reinforcement": ReinforcementHyperparameters}
METHODS = tuple(HYPERPARAMETERS)


class MethodBlock(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hyperparameters: dict[str, Any] | None = None


class ReinforcementBlock(MethodBlock):
    grader: dict[str, Any] | None = None


class MethodSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["supervised", "dpo", "reinforcement"] = "supervised"
    supervised: MethodBlock | None = None
    dpo: MethodBlock | None = None
    reinforcement: ReinforcementBlock | None = None


class CreateJobRequest(ValidUnicode):
    model_config = ConfigDict(extra="ignore")
    model: StrictStr
    training_file: StrictStr
    validation_file: StrictStr | None = None
    hyperparameters: dict[str, Any] | None = None
    suffix: StrictStr | None = None
    seed: Annotated[StrictInt, Field(ge=0, le=SEED_MAX)] | None = None
    method: MethodSpec | None = None
    integrations: list[Any] | None = None
    # OpenAI's limits: 16 pairs, keys up to 64 characters, values up to 512
    metadata: Annotated[dict[Annotated[str, Field(max_length=64)], Annotated[StrictStr, Field(max_length=512)]],
                        Field(max_length=16)] | None = None


def checked_hyperparameters(values: dict[str, Any] | None, method: str, param: str) -> dict[str, Any]:
    """`values` when they are hyper-parameters `method` takes, in range; else a 400 naming the field, before any
    work (a bad value found by the worker would fail the job late, or train for ever)."""
    if not values:
        return {}
    model = HYPERPARAMETERS[method]
    try:
        model.model_validate(values)
    except ValidationError as exc:
        name = str(exc.errors()[0]["loc"][0])
        field = f"{param}.{name}"
        if name not in model.model_fields:
            raise APIError(400, f"{field}: unknown hyper-parameter for {method} fine-tuning; known: "
                           f"{', '.join(model.model_fields)}", param=field, code="invalid_value") from None
        shown = json.dumps(values[name], default=str)
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        raise APIError(400, f"{field} must be {model.model_fields[name].description}, got {shown}", param=field,
                       code="invalid_value") from None
    return {name: value for name, value in values.items() if value is not None}  # null is "auto"


def checked_method(body: CreateJobRequest) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the method as stored, the top-level hyperparameters as stored), both checked."""
    from ownllm.finetune.graders import grader_problem

    spec = body.method or MethodSpec()
    for other in METHODS:
        if other != spec.type and getattr(spec, other) is not None:
            raise APIError(400, f"method.{other} is given but method.type is '{spec.type}'", param=f"method.{other}",
                           code="invalid_value")
    block = getattr(spec, spec.type)
    method: dict[str, Any] = {"type": spec.type}
    if block is not None:
        method[spec.type] = {"hyperparameters": checked_hyperparameters(
            block.hyperparameters, spec.type, f"method.{spec.type}.hyperparameters")}
    if spec.type == "reinforcement":
        grader = block.grader if block is not None else None
        if grader is None:
            raise APIError(400, "method.reinforcement.grader is required: the grader that scores each sampled "
                           "answer (string_check or text_similarity)", param="method.reinforcement.grader",
                           code="invalid_value")
        problem = grader_problem(grader)
        if problem:
            field = ".".join(filter(None, ("method.reinforcement.grader", problem[0])))
            raise APIError(400, f"{field}: {problem[1]}", param=field, code="invalid_value")
        method["reinforcement"]["grader"] = grader
    # the worker overlays the method's hyper-parameters on the top-level ones, so both take the method's names
    return method, checked_hyperparameters(body.hyperparameters, spec.type, "hyperparameters")


# --- object shapes --------------------------------------------------------------------------------
def file_object(row: dict[str, Any]) -> dict[str, Any]:
    return {"id": row["id"], "object": "file", "bytes": row["bytes"], "created_at": row["created_at"],
            "filename": row["filename"], "purpose": row["purpose"], "status": "processed", "expires_at": None,
            "status_details": None}


def job_object(row: dict[str, Any]) -> dict[str, Any]:
    method = json.loads(row["method"])
    method_type = method.get("type", "supervised")
    # what the worker uses: the top-level values (resolved ones, once it has started) overlaid by the method's
    # given ones; a method's "auto" must not hide a resolved value
    given = (method.get(method_type) or {}).get("hyperparameters") or {}
    hyper = {**json.loads(row["hyperparameters"]), **{k: v for k, v in given.items() if v != "auto"}}
    shown = {k: hyper.get(k, "auto") for k in ("n_epochs", "batch_size", "learning_rate_multiplier")}
    return {
        "object": "fine_tuning.job", "id": row["id"], "model": row["model"], "created_at": row["created_at"],
        "finished_at": row["finished_at"], "fine_tuned_model": row["fine_tuned_model"],
        "organization_id": "org-local", "result_files": json.loads(row["result_files"] or "[]"),
        "status": row["status"], "validation_file": row["validation_file"], "training_file": row["training_file"],
        "hyperparameters": shown, "trained_tokens": row["trained_tokens"],
        "error": json.loads(row["error"]) if row["error"] else None, "user_provided_suffix": row["suffix"],
        "seed": row["seed"], "estimated_finish": None, "integrations": [], "metadata": None,
        "method": {"type": method_type, method_type: {"hyperparameters": {**shown, **(
            {"beta": hyper.get("beta", "auto")} if method_type == "dpo" else {}), **(
            {"compute_multiplier": hyper.get("compute_multiplier", "auto")} if method_type == "reinforcement"
            else {})}, **({"grader": method["reinforcement"]["grader"]} if method_type == "reinforcement" else {})}},
    }


def event_object(row: dict[str, Any]) -> dict[str, Any]:
    return {"object": "fine_tuning.job.event", "id": row["id"], "created_at": row["created_at"],
            "level": row["level"], "message": row["message"],
            "data": json.loads(row["data"]) if row["data"] else {}, "type": row["type"]}


def checkpoint_object(row: dict[str, Any], job: dict[str, Any]) -> dict[str, Any]:
    metrics = json.loads(row["metrics"])
    name = job["fine_tuned_model"] or fine_tuned_name(job)
    return {"object": "fine_tuning.job.checkpoint", "id": row["id"], "created_at": row["created_at"],
            "fine_tuning_job_id": row["job_id"], "step_number": row["step"], "metrics": metrics,
            "fine_tuned_model_checkpoint": f"{name}:ckpt-step-{row['step']}"}


def page(items: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {"object": "list", "data": items, "has_more": has_more,
            "first_id": items[0]["id"] if items else None, "last_id": items[-1]["id"] if items else None}


# --- routes ---------------------------------------------------------------------------------------
def router(store: JobStore, manager: JobManager, served_model: str) -> APIRouter:
    """The files and fine-tuning jobs routes (the app's middleware checks the API key before any of them)."""
    api = APIRouter()

    def get_file(file_id: str) -> dict[str, Any]:
        row = store.get_file(file_id)
        if row is None:
            raise APIError(404, f"No such File object: {file_id}", param="id", code="file_not_found")
        return row

    def get_job(job_id: str) -> dict[str, Any]:
        row = store.get_job(job_id)
        if row is None:
            raise APIError(404, f"Could not find fine-tune: {job_id}", param="fine_tune_id", code="fine_tune_not_found")
        return row

    @api.post("/v1/files")
    async def upload(file: Annotated[UploadFile, File()], purpose: Annotated[str, Form()]) -> dict[str, Any]:
        if purpose not in UPLOAD_PURPOSES:
            raise APIError(400, f"'{purpose}' is not one of {list(UPLOAD_PURPOSES)} - 'purpose'", param="purpose")
        fd, staged = tempfile.mkstemp(dir=store.files_dir, prefix=".upload-", suffix=".tmp")
        os.fchmod(fd, usual_mode(0o666))  # as the result files: mkstemp's 0600 would hide it from the owner's group
        try:
            with os.fdopen(fd, "wb") as handle:
                while chunk := await file.read(1 << 20):
                    handle.write(chunk)
            if Path(staged).stat().st_size == 0:
                raise APIError(400, "The file is empty", param="file", code="empty_file")
            return file_object(store.add_file(file.filename or "upload.jsonl", purpose, Path(staged)))
        finally:
            Path(staged).unlink(missing_ok=True)

    @api.get("/v1/files")
    async def list_files(purpose: str | None = None, after: str | None = None,
                         limit: int = Query(10000, ge=1, le=10000),
                         order: Literal["asc", "desc"] = "desc") -> dict[str, Any]:
        found = store.list_files(purpose=purpose, after=after, limit=limit, newest_first=order == "desc")
        return page([file_object(r) for r in found.rows], found.has_more)

    @api.get("/v1/files/{file_id}")
    async def retrieve_file(file_id: str) -> dict[str, Any]:
        return file_object(get_file(file_id))

    @api.get("/v1/files/{file_id}/content")
    async def file_content(file_id: str) -> FileResponse:
        row = get_file(file_id)
        if not store.file_path(file_id).is_file():  # removed behind the server's back: say so, not a 500
            raise APIError(404, f"The content of file {file_id} is missing from the server's data folder",
                           param="id", code="file_not_found")
        return FileResponse(store.file_path(file_id), filename=row["filename"],
                            media_type="text/csv" if row["filename"].endswith(".csv") else "application/jsonl")

    @api.delete("/v1/files/{file_id}")
    async def delete_file(file_id: str) -> dict[str, Any]:
        get_file(file_id)
        in_use = [j["id"] for j in store.jobs_with_status(*ACTIVE)
                  if file_id in (j["training_file"], j["validation_file"])]
        if in_use:
            raise APIError(409, f"File {file_id} is used by the running job {in_use[0]}", param="file_id",
                           code="file_in_use")
        store.delete_file(file_id)
        return {"id": file_id, "object": "file", "deleted": True}

    @api.post("/v1/fine_tuning/jobs")
    async def create_job(body: CreateJobRequest) -> dict[str, Any]:
        if body.model != served_model:
            raise APIError(400, f"Model {body.model} is not available for fine-tuning here; this server fine-tunes "
                           f"its base model '{served_model}'", param="model", code="model_not_available")
        method, hyperparameters = checked_method(body)
        if body.suffix is not None and not SUFFIX.fullmatch(body.suffix):
            raise APIError(400, "suffix must be up to 64 letters, digits, '-', '_' or '.' (it becomes part of the "
                           f"model id), got {json.dumps(body.suffix)[:80]}", param="suffix", code="invalid_value")
        for field, file_id in (("training_file", body.training_file), ("validation_file", body.validation_file)):
            if file_id is None:
                continue
            row = store.get_file(file_id)
            if row is None:
                raise APIError(400, f"invalid {field}: {file_id} does not exist", param=field, code="invalid_file")
            if row["purpose"] != "fine-tune":
                raise APIError(400, f"invalid {field}: {file_id} has purpose '{row['purpose']}', not 'fine-tune'",
                               param=field, code="invalid_file")
        seed = body.seed if body.seed is not None else int.from_bytes(os.urandom(3), "big")
        row = store.add_job(model=body.model, training_file=body.training_file, validation_file=body.validation_file,
                            hyperparameters=hyperparameters, method=method, suffix=body.suffix or None, seed=seed)
        return job_object(row)

    @api.get("/v1/fine_tuning/jobs")
    async def list_jobs(after: str | None = None, limit: int = Query(20, ge=1, le=100)) -> dict[str, Any]:
        found = store.list_jobs(after=after, limit=limit)
        return {"object": "list", "data": [job_object(r) for r in found.rows], "has_more": found.has_more}

    @api.get("/v1/fine_tuning/jobs/{job_id}")
    async def retrieve_job(job_id: str) -> dict[str, Any]:
        return job_object(get_job(job_id))

    @api.post("/v1/fine_tuning/jobs/{job_id}/cancel")
    async def cancel_job(job_id: str) -> dict[str, Any]:
        job = get_job(job_id)
        if job["status"] not in ACTIVE:
            raise APIError(400, f"Cannot cancel a job that is already {job['status']}", param="fine_tune_id",
                           code="invalid_state")
        manager.cancel(job_id)
        return job_object(get_job(job_id))

    @api.get("/v1/fine_tuning/jobs/{job_id}/events")
    async def list_events(job_id: str, after: str | None = None,
                          limit: int = Query(20, ge=1, le=1000)) -> dict[str, Any]:
        get_job(job_id)
        found = store.list_events(job_id, after=after, limit=limit)
        return {"object": "list", "data": [event_object(r) for r in found.rows], "has_more": found.has_more}

    @api.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
    async def list_checkpoints(job_id: str, after: str | None = None,
                               limit: int = Query(10, ge=1, le=100)) -> dict[str, Any]:
        job = get_job(job_id)
        found = store.list_checkpoints(job_id, after=after, limit=limit)
        return page([checkpoint_object(r, job) for r in found.rows], found.has_more)

    return api
