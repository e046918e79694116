"""OpenAI's files and fine-tuning jobs API, over the job store and manager (ownllm.jobs): thin routes that
translate rows into OpenAI's object shapes."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, File, Form, Query, UploadFile
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict, Field

from ownllm.jobs.manager import JobManager
from ownllm.jobs.store import ACTIVE, JobStore, fine_tuned_name
from ownllm.serve.errors import APIError

UPLOAD_PURPOSES = ("fine-tune", "batch", "assistants", "user_data", "evals")


class MethodSpec(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["supervised", "dpo"] = "supervised"


class CreateJobRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    training_file: str
    validation_file: str | None = None
    hyperparameters: dict[str, Any] = Field(default_factory=dict)
    suffix: str | None = Field(default=None, max_length=64)
    seed: int | None = None
    method: MethodSpec | None = None
    integrations: list[Any] | None = None
    metadata: dict[str, str] | None = None


# --- object shapes --------------------------------------------------------------------------------
def file_object(row: dict[str, Any]) -> dict[str, Any]:
    return {"id": row["id"], "object": "file", "bytes": row["bytes"], "created_at": row["created_at"],
            "filename": row["filename"], "purpose": row["purpose"], "status": "processed", "expires_at": None,
            "status_details": None}


def job_object(row: dict[str, Any]) -> dict[str, Any]:
    method = json.loads(row["method"])
    hyper = json.loads(row["hyperparameters"])
    shown = {k: hyper.get(k, "auto") for k in ("n_epochs", "batch_size", "learning_rate_multiplier")}
    method_type = method.get("type", "supervised")
    return {
        "object": "fine_tuning.job", "id": row["id"], "model": row["model"], "created_at": row["created_at"],
        "finished_at": row["finished_at"], "fine_tuned_model": row["fine_tuned_model"],
        "organization_id": "org-local", "result_files": json.loads(row["result_files"] or "[]"),
        "status": row["status"], "validation_file": row["validation_file"], "training_file": row["training_file"],
        "hyperparameters": shown, "trained_tokens": row["trained_tokens"],
        "error": json.loads(row["error"]) if row["error"] else None, "user_provided_suffix": row["suffix"],
        "seed": row["seed"], "estimated_finish": None, "integrations": [], "metadata": None,
        "method": {"type": method_type, method_type: {"hyperparameters": {**shown, **(
            {"beta": hyper.get("beta", "auto")} if method_type == "dpo" else {})}}},
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
def router(store: JobStore, manager: JobManager, served_model: str, auth: Any) -> APIRouter:
    api = APIRouter(dependencies=[Depends(auth)])

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
        for field, file_id in (("training_file", body.training_file), ("validation_file", body.validation_file)):
            if file_id is None:
                continue
            row = store.get_file(file_id)
            if row is None:
                raise APIError(400, f"invalid {field}: {file_id} does not exist", param=field, code="invalid_file")
            if row["purpose"] != "fine-tune":
                raise APIError(400, f"invalid {field}: {file_id} has purpose '{row['purpose']}', not 'fine-tune'",
                               param=field, code="invalid_file")
        method = body.method.model_dump() if body.method else {"type": "supervised"}
        seed = body.seed if body.seed is not None else int.from_bytes(os.urandom(3), "big")
        row = store.add_job(model=body.model, training_file=body.training_file, validation_file=body.validation_file,
                            hyperparameters=body.hyperparameters, method=method, suffix=body.suffix, seed=seed)
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
