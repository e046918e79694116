"""ownllm's HTTP extensions that the web UI needs, usable by any client (behind the same API key):

- `POST /v1/explain`: a chat request decoded with the sampler's explanation on: per generated token, the top
  candidates' probabilities at T=1, after temperature, after top-k and after top-p, the chosen one marked (the
  table of `ownllm generate --explain`, from the same sampler, through the server's scheduler).
- `POST /v1/data/check`: the data doctor's report on a JSONL file (uploaded, or a `file_id` of /v1/files), with
  line-numbered problems and a token-length histogram from the served model's tokenizer and chat template.
- `GET/POST /v1/rag/documents`, `POST /v1/rag/context`: the documents in the server's store, adding one (indexed
  at once), and what retrieval finds for a question (the numbered sources a chat with `"rag"` answers from, with
  their text). Without `--rag-store`, the first upload makes a store in the server's data folder.
- `POST /v1/evaluations/compare`: two served models on a question file (`ownllm eval qa`'s format and metrics),
  answered greedily through the server's scheduler: metrics side by side with deltas, and every item.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, File, Form, Request, Response, UploadFile
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr
from starlette.concurrency import run_in_threadpool

from ownllm.errors import ContextWindowExceeded, OwnLLMError
from ownllm.serve import tool_calls
from ownllm.serve.errors import APIError
from ownllm.serve.protocol import ChatCompletionRequest, Float
from ownllm.serve.state import ServerState

MAX_EVAL_ITEMS = 500  # questions per comparison: a request must end in minutes, not hours
EVAL_CHUNK = 16  # sequences queued at a time (the queue has room for other users' requests meanwhile)
MAX_TOP = 50  # candidates per step: the table is for reading, and each row is a decode of a token
HISTOGRAM_BINS = 20
_LINE = re.compile(r"\bline (\d+)\b")
_SAFE_NAME = re.compile(r"[^\w.\- ]+")  # \w: letters and digits of any script (two Cyrillic names stay two files)
_TEXT_SUFFIXES = (".txt", ".md", ".markdown", ".html", ".htm", ".jsonl", ".csv")  # must be UTF-8 text


class ExplainRequest(ChatCompletionRequest):
    """A chat completion request (same fields, same defaults) and how many candidates to show per step."""

    top: StrictInt = Field(10, ge=1, le=MAX_TOP)


class ContextRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    question: StrictStr = Field(min_length=1, max_length=20_000)
    k: StrictInt = Field(4, ge=1, le=20)
    min_score: Float = Field(0.3, ge=-1, le=1)


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None  # JSON has no -inf (a token a constraint rules out)


def _pieces(tokenizer: Any, ids: list[int]) -> list[str]:
    """Each token's share of the text, as the stream hands it out (the engine's incremental detokeniser): a
    character split over several byte tokens shows on the token that completes it."""
    from ownllm.generate.text import IncrementalText

    text = IncrementalText(tokenizer, [])
    pieces = [text.add(token_id) for token_id in ids]
    if pieces:
        pieces[-1] += text.flush()
    return pieces


def safe_filename(name: str | None, default: str) -> str:
    """An uploaded file's base name, safe as a file name here (no folders, no control characters)."""
    base = _SAFE_NAME.sub("_", Path(name or "").name).strip(" .")
    return base[:120] or default


def document_id(source: str) -> str:
    """A document's id in the API: stable for its indexed path, without telling clients where the server keeps
    files."""
    return "doc-" + hashlib.sha256(source.encode("utf-8", "surrogatepass")).hexdigest()[:24]


def _tidy(message: str, *folders: Path | str) -> str:
    """A message without the server's own folders in it: the client named its file, not our temp folder."""
    for folder in folders:
        message = message.replace(f"{folder}{os.sep}", "").replace(str(folder), "")
    return message




def _readable_document(path: Path, name: str) -> None:
    """Refuse, before the store is touched, a document the index would take as garbage or as nothing: bytes that
    are not UTF-8 text in a text type (a binary file, UTF-16), and a file with no text to index at all."""
    from ownllm.data.files import read_text_file
    from ownllm.rag.loaders import load_file

    try:
        if path.suffix.lower() in _TEXT_SUFFIXES:
            text = read_text_file(path)
            if "\x00" in text:
                raise OwnLLMError(f"{path}: binary data (NUL bytes), not text")
        sections = load_file(path)
    except OwnLLMError as exc:
        raise APIError(400, _tidy(str(exc).replace(str(path), name), path.parent), param="file",
                       code="unreadable_file") from None
    if not any(section.text.strip() for section in sections):
        raise APIError(400, f"{name} has no text to index (a scanned PDF has none: run OCR on it first)",
                       param="file", code="no_text")


def _problem(message: str) -> dict[str, Any]:
    found = _LINE.search(message)
    return {"line": int(found.group(1)) if found else None, "message": message}


def router(state: ServerState) -> APIRouter:
    api = APIRouter()
    build_lock = asyncio.Lock()  # one document build at a time: the store's schema is made by the first
    speed_lock = asyncio.Lock()  # one training-speed measurement at a time: each loads a copy of the model
    speeds: dict[str, float] = {}  # measured once per server: the machine does not get faster between requests

    # --- explain --------------------------------------------------------------------------------
    @api.post("/v1/explain")
    async def explain(body: ExplainRequest, request: Request, http_response: Response) -> dict[str, Any]:
        for name, given in (("stream", body.stream), ("tools", body.tools), ("rag", body.rag),
                            ("response_format", body.response_format), ("logit_bias", body.logit_bias)):
            if given:
                raise APIError(400, f"explain takes a plain chat request: {name} is not supported here", param=name)
        if body.n != 1:
            raise APIError(400, "explain decodes one choice (n=1)", param="n")
        messages = [m.to_message() for m in body.messages]
        requested = state.adapter_for(body.model)
        prompt_ids = await run_in_threadpool(tool_calls.render_prompt, state.engine, messages, None)
        try:
            params = body.to_sampling_params(state.default_max_tokens(len(prompt_ids)))
            params = dataclasses.replace(params, explain=body.top)
        except OwnLLMError as exc:
            raise APIError(400, str(exc), param=exc.param) from None
        state.check_prompts([prompt_ids], params)
        adapter = await state.route(requested, messages)  # once the cheap checks have passed
        prompt_ids, params = await state.recall_prompt(
            requested, adapter, messages, messages, prompt_ids,
            lambda m: tool_calls.render_prompt(state.engine, m, None), params,
            length_given=bool(body.max_completion_tokens or body.max_tokens))
        http_response.headers.update(state.scope_header(requested, [adapter]))
        generation = state.submit([prompt_ids], params, adapter=adapter, stream=False)
        (completion,) = await generation.completions_while_connected(request)
        steps = completion.explanations or []
        pieces = _pieces(state.engine.tokenizer, completion.token_ids)
        temperature = params.temperature if params.strategy == "sample" else 1.0
        tokens = []
        for index, (token_id, piece, step) in enumerate(zip(completion.token_ids, pieces, steps, strict=False)):
            tokens.append({"index": index, "id": token_id, "text": piece, "kept_top_k": step.kept_top_k,
                           "kept_top_p": step.kept_top_p, "kept_min_p": step.kept_min_p,
                           "candidates": [{"token": row.token, "id": row.token_id, "logit": _finite(row.logit),
                                           "p": row.prob, "p_temperature": row.prob_temperature,
                                           "p_top_k": row.prob_top_k, "p_top_p": row.prob_top_p,
                                           "p_min_p": row.prob_min_p,
                                           "chosen": row.chosen} for row in step.rows]})
        return {"object": "explanation", "model": body.model, "text": completion.text,
                "finish_reason": completion.finish_reason, "seed": completion.seed, "strategy": params.strategy,
                "temperature": temperature, "top_k": params.top_k, "top_p": params.top_p,
                "min_p": params.min_p,
                "repetition_penalty": params.repetition_penalty,
                "usage": {"prompt_tokens": len(prompt_ids), "completion_tokens": completion.completion_tokens,
                          "total_tokens": len(prompt_ids) + completion.completion_tokens},
                "tokens": tokens}

    # --- data doctor ----------------------------------------------------------------------------
    @api.post("/v1/data/check")
    async def data_check(file: Annotated[UploadFile | None, File()] = None,
                         file_id: Annotated[str | None, Form()] = None,
                         format: Annotated[str | None, Form()] = None,
                         max_length: Annotated[int, Form(ge=16, le=1 << 20)] = 2048,
                         estimate: Annotated[bool, Form()] = False) -> dict[str, Any]:
        if (file is None) == (file_id is None):
            raise APIError(400, "give a file to check (multipart 'file') or the id of an uploaded one ('file_id')",
                           param="file")
        with tempfile.TemporaryDirectory(prefix="ownllm-check-") as folder:
            if file is not None:
                name = safe_filename(file.filename, "data.jsonl")
                path = Path(folder) / name
                with path.open("wb") as handle:
                    while chunk := await file.read(1 << 20):
                        handle.write(chunk)
            else:
                row = state.jobs.store.get_file(file_id) if state.jobs is not None else None
                stored = state.jobs.store.file_path(file_id) if row is not None else None
                if stored is None or not stored.is_file():  # gone from disk since: as good as never uploaded
                    raise APIError(404, f"No such File object: {file_id}", param="file_id", code="file_not_found")
                name = safe_filename(row["filename"], "data.jsonl")
                path = Path(folder) / name
                os.symlink(stored, path)  # the doctor names lines by this name
            if path.stat().st_size == 0:
                raise APIError(400, f"{name} is empty", param="file", code="empty_file")
            speed = None
            if estimate:
                base = state.model_spec  # a path as given: its short name may resolve to nothing
                async with speed_lock:  # a burst of estimate requests loads one model copy, not one each
                    if base not in speeds:
                        from ownllm.data.doctor import measure_training_speed

                        speeds[base] = await asyncio.get_running_loop().run_in_executor(
                            None, measure_training_speed, base)
                speed = speeds[base]
            report = await asyncio.get_running_loop().run_in_executor(None, _check, state, path, format, max_length,
                                                                      speed)
        report["file"] = name
        for key in ("problems", "warnings"):
            report[key] = [_tidy(message, folder) for message in report[key]]
        report["problem_lines"] = [{**p, "message": _tidy(p["message"], folder)} for p in report["problem_lines"]]
        return report

    # --- documents ------------------------------------------------------------------------------
    def documents_folder() -> Path:
        if state.jobs is None:
            raise APIError(400, "uploading documents needs the server's data folder (start it without --no-jobs)",
                           param="file")
        return Path(state.jobs.store.data_dir) / "documents"

    def index_or_create() -> Any:
        if state.rag_index is None:
            from ownllm.rag.index import Index

            folder = documents_folder()
            folder.mkdir(parents=True, exist_ok=True)
            state.rag_index = Index(folder / "store.db")  # chat requests with "rag" answer from it from now on
        return state.rag_index

    @api.get("/v1/rag/documents")
    async def list_documents() -> dict[str, Any]:
        if state.rag_index is None:
            return {"object": "list", "data": [], "store": None}
        files = await asyncio.get_running_loop().run_in_executor(None, state.rag_index.store.files)
        return {"object": "list", "store": "ready",
                "data": [{"object": "document", "id": document_id(source), "filename": Path(source).name}
                         for source in sorted(files)]}

    @api.delete("/v1/rag/documents/{doc_id}")
    async def delete_document(doc_id: str) -> dict[str, Any]:
        """The document out of the index (its chunks no longer answer); a file the server holds is removed too,
        a file the index was built from elsewhere (--rag-store) is left where it is."""
        loop = asyncio.get_running_loop()
        async with build_lock:
            files = await loop.run_in_executor(None, state.rag_index.store.files) if state.rag_index else {}
            source = next((s for s in files if document_id(s) == doc_id), None)
            if source is None:
                raise APIError(404, f"No document with id '{doc_id[:80]}'", param="id", code="document_not_found")
            await loop.run_in_executor(None, state.rag_index.store.delete_file, source)
            held = state.jobs is not None and Path(source).parent == (documents_folder() / "files").resolve()
            if held:
                Path(source).unlink(missing_ok=True)
        return {"object": "document", "id": doc_id, "filename": Path(source).name, "deleted": True}

    @api.post("/v1/rag/documents")
    async def add_document(file: Annotated[UploadFile, File()]) -> dict[str, Any]:
        from ownllm.rag.loaders import SUPPORTED

        name = safe_filename(file.filename, "document.txt")
        if Path(name).suffix.lower() not in SUPPORTED:
            raise APIError(400, f"{name}: not a supported document type (supported: {', '.join(SUPPORTED)})",
                           param="file", code="unsupported_file")
        folder = documents_folder() / "files"
        staging = documents_folder() / ".staging"  # beside files/ (one file system: renames are atomic), not in it
        folder.mkdir(parents=True, exist_ok=True)
        staging.mkdir(parents=True, exist_ok=True)
        loop = asyncio.get_running_loop()
        fd, staged_name = tempfile.mkstemp(dir=staging, prefix="upload-", suffix=Path(name).suffix.lower())
        staged, previous = Path(staged_name), staging / f"previous-{Path(staged_name).stem}"
        target = folder / name
        try:
            with os.fdopen(fd, "wb") as handle:
                while chunk := await file.read(1 << 20):
                    handle.write(chunk)
            if staged.stat().st_size == 0:
                raise APIError(400, f"{name} is empty", param="file", code="empty_file")
            await loop.run_in_executor(None, _readable_document, staged, name)
            async with build_lock:
                index = index_or_create()
                had = target.exists()
                if had:
                    os.replace(target, previous)  # kept until the new one is indexed: a failure puts it back
                os.replace(staged, target)  # whole or not at all
                try:
                    built = await loop.run_in_executor(None, index.build, [target])
                except OwnLLMError as exc:
                    built, why = None, str(exc)
                if built is None or built.failed:
                    why = "; ".join(reason for _, reason in built.failed) if built is not None else why
                    if had:
                        os.replace(previous, target)
                    else:
                        target.unlink(missing_ok=True)
                    raise APIError(400, _tidy(f"{name} could not be indexed: {why}", folder), param="file",
                                   code="unreadable_file")
        finally:
            staged.unlink(missing_ok=True)
            previous.unlink(missing_ok=True)
        return {"object": "document", "id": document_id(str(target.resolve())), "filename": name,
                "chunks": built.chunks,
                "status": "added" if built.added else "updated" if built.updated else "unchanged"}

    @api.post("/v1/rag/context")
    async def context(body: ContextRequest) -> dict[str, Any]:
        if state.rag_index is None:
            raise APIError(400, "this server has no document store yet: upload a document first (or start it with "
                           "--rag-store)", param="question")
        try:
            found = await asyncio.get_running_loop().run_in_executor(
                None, lambda: state.rag_index.context(body.question, k=body.k, min_score=body.min_score))
        except OwnLLMError as exc:
            raise APIError(400, str(exc), param=exc.param or "question") from None
        sources = [{**source, "text": hit.chunk.text} for source, hit in zip(found.sources, found.hits, strict=True)]
        return {"object": "rag.context", "abstain": found.abstain, "best_similarity": found.best_similarity,
                "sources": sources}

    # --- evaluation -----------------------------------------------------------------------------
    @api.post("/v1/evaluations/compare")
    async def compare(request: Request, file: Annotated[UploadFile, File()], model_a: Annotated[str, Form()],
                      model_b: Annotated[str, Form()],
                      max_tokens: Annotated[int, Form(ge=1, le=512)] = 64) -> dict[str, Any]:
        from ownllm.evaluate.qa import read_questions, summarize

        adapters = {}
        for param, model in (("model_a", model_a), ("model_b", model_b)):  # 404 before any work
            try:
                adapters[model] = state.adapter_for(model)
            except APIError as exc:
                raise APIError(exc.status, exc.message, param=param, code=exc.code) from None
        loop = asyncio.get_running_loop()
        with tempfile.TemporaryDirectory(prefix="ownllm-eval-") as folder:
            path = Path(folder) / safe_filename(file.filename, "questions.jsonl")
            path.write_bytes(await file.read())
            try:
                items = await loop.run_in_executor(None, read_questions, path)
            except OwnLLMError as exc:
                raise APIError(400, _tidy(str(exc), folder), param="file") from None
        if not items:
            raise APIError(400, f"{path.name} holds no questions", param="file")
        if len(items) > MAX_EVAL_ITEMS:
            raise APIError(400, f"{path.name} has {len(items)} questions; at most {MAX_EVAL_ITEMS} per comparison",
                           param="file")
        max_tokens = state.capped_tokens(max_tokens)
        prompts = await loop.run_in_executor(None, _prompts, state, items, path.name, max_tokens)
        results = {}
        for model in (model_a, model_b):
            results[model] = await _answer(request, state, items, prompts, adapters[model], max_tokens)
        a, b = results[model_a], results[model_b]
        metrics_a = {k: v for k, v in summarize(a).items() if k != "items"}
        metrics_b = {k: v for k, v in summarize(b).items() if k != "items"}
        return {"object": "evaluation.comparison", "model_a": model_a, "model_b": model_b, "items_count": len(items),
                "metrics": {"a": metrics_a, "b": metrics_b, "delta": {k: metrics_b[k] - metrics_a[k]
                                                                      for k in metrics_a}},
                "items": [{"line": x.line, "question": x.question, "answers": x.answers, "a": x.prediction,
                           "b": y.prediction, "a_scores": x.scores, "b_scores": y.scores,
                           "delta_f1": y.scores["f1"] - x.scores["f1"]} for x, y in zip(a, b, strict=True)]}

    return api


def _prompts(state: ServerState, items: list[Any], name: str, max_tokens: int) -> list[list[int]]:
    """Every question's prompt ids, checked before anything is queued: a bad one is refused naming its line."""
    prompts = []
    for item in items:
        try:
            ids = tool_calls.render_prompt(state.engine, item.messages, None)
            if len(ids) + max_tokens > state.context_length:
                raise ContextWindowExceeded(len(ids), max_tokens, state.context_length)
        except APIError as exc:
            raise APIError(400, f"{name} line {item.line}: {exc.message}", param="file", code=exc.code) from None
        except ContextWindowExceeded as exc:
            raise APIError(400, f"{name} line {item.line}: {exc.openai_message('the question')}", param="file",
                           code=exc.code) from None
        prompts.append(ids)
    return prompts


async def _answer(request: Request, state: ServerState, items: list[Any], prompts: list[list[int]],
                  adapter: str | None, max_tokens: int) -> list[Any]:
    """Greedy answers (as `ownllm eval qa`), scored against the references, through the server's scheduler."""
    from ownllm.evaluate.metrics import score_all
    from ownllm.evaluate.qa import QAResult
    from ownllm.generate.params import SamplingParams

    params = SamplingParams(max_new_tokens=max_tokens)
    results = []
    for start in range(0, len(items), EVAL_CHUNK):
        routes = await state.routes(adapter, [item.messages for item in items[start : start + EVAL_CHUNK]])
        chunk = [(await state.recall_prompt(adapter, routed, item.messages, item.messages, ids,
                                            lambda m: tool_calls.render_prompt(state.engine, m, None), params))[0]
                 for item, ids, routed in zip(items[start : start + EVAL_CHUNK], prompts[start : start + EVAL_CHUNK],
                                              routes, strict=True)]
        generation = state.submit(chunk, params, adapter=routes, prompt_param="file", stream=False)
        completions = await generation.completions_while_connected(request)
        for item, completion in zip(items[start : start + EVAL_CHUNK], completions, strict=True):
            prediction = completion.text.strip()
            results.append(QAResult(item.line, item.question, prediction, item.answers,
                                    score_all(prediction, item.answers)))
    return results


def _check(state: ServerState, path: Path, fmt: str | None, max_length: int, speed: float | None
           ) -> dict[str, Any]:
    """The doctor's report as JSON; a file with nothing usable is a report of its problems, not an error. With
    `speed` (tokens/s of a training step of the served model, measured as `ownllm data check --model` measures
    it), the training time per epoch."""
    from ownllm.data.doctor import Report, check, scan_examples, token_counts

    try:
        report, examples = check(path, fmt=fmt, model=None, max_length=max_length, measure_speed=False)
    except OwnLLMError as exc:
        if exc.param == "format":
            raise APIError(400, str(exc), param="format") from None
        chosen, examples, problems = scan_examples(path)
        report = Report(file=path.name, format=chosen, examples=0, problems=problems or [exc.message])
        examples = []
    result = report.as_dict()
    histogram: dict[str, list[float]] = {"edges": [], "counts": []}
    if examples:
        counts = token_counts(examples, state.engine.tokenizer)
        ordered = sorted(counts)
        result["tokens"] = {"min": ordered[0], "mean": round(sum(counts) / len(counts), 1),
                            "p95": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], "max": ordered[-1],
                            "total_per_epoch": sum(counts)}
        result["too_long"] = [e.line for e, n in zip(examples, counts, strict=True) if n > max_length]
        if result["too_long"]:
            result["warnings"].append(f"{len(result['too_long'])} examples are longer than {max_length} tokens and "
                                      "would be truncated")
        low, high = ordered[0], ordered[-1] + 1
        values, edges = np.histogram(counts, bins=min(HISTOGRAM_BINS, high - low), range=(low, high))
        histogram = {"edges": [round(float(e), 1) for e in edges], "counts": [int(v) for v in values]}
        if speed is not None:
            result["measured_tokens_per_second"] = round(speed, 1)
            result["estimated_seconds_per_epoch"] = round(sum(counts) / speed, 1)
    result["histogram"] = histogram
    result["problem_lines"] = [_problem(p) for p in result["problems"]]
    result["max_length"] = max_length
    return result
