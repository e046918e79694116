"""OpenAI's error envelope for every failure: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

import json
import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from ownllm.errors import OwnLLMError

log = logging.getLogger(__name__)
_STATUS = {"invalid_request": 400, "not_found": 404, "unsupported": 501, "resource": 503}
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
          413: "invalid_request_error", 429: "rate_limit_exceeded", 501: "invalid_request_error",
          503: "server_error", 500: "server_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": _TYPES.get(status, "invalid_request_error"), "param": param,
                      "code": code}}


def envelope(status: int, message: str, param: str | None = None, code: str | None = None,
             headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(body(status, message, param, code), status_code=status, headers=headers)


_UNION_BRANCHES = {"str", "int", "float", "bool", "list", "dict", "none"}
_NAMED_FIELD = re.compile(r"^([A-Za-z_][\w.\[\]]*) is not valid Unicode text")


def describe_validation_error(problems: list[dict]) -> tuple[str | None, str]:
    """(param, message) for the most telling of pydantic's errors: with a union (`content: str | list[...]`) pydantic
    reports one error per branch; the deepest one is the one about what the client meant to send."""

    def path(problem: dict) -> list[str]:
        parts = []
        location = list(problem.get("loc", ()))
        if location and location[0] in ("body", "query", "path", "header"):
            location = location[1:]  # where FastAPI found it, not part of the field's name
        for part in location:
            if isinstance(part, str) and ("[" in part or part in _UNION_BRANCHES or part[:1].isupper()):
                continue  # pydantic's name of a union branch, not a field
            parts.append(f"[{part}]" if isinstance(part, int) else f".{part}")
        return parts

    best = max(problems, key=lambda p: (len(path(p)), not str(p.get("type", "")).endswith("_type")))
    param = "".join(path(best)).lstrip(".") or None
    text = str(best.get("msg", "invalid value")).removeprefix("Value error, ")
    if param is None:  # a check of the whole body (lone surrogates) names its field in the message
        named = _NAMED_FIELD.match(text)
        param = named.group(1) if named else None
        return param, text
    return param, f"{param}: {text}"


def from_ownllm(exc: OwnLLMError) -> tuple[int, str | None]:
    from ownllm.generate.batching import QueueFull

    if isinstance(exc, QueueFull):
        return 429, "queue_full"
    return _STATUS.get(exc.kind, 400), exc.code


def sse_error(exc: BaseException) -> str:
    """The last event of a stream that failed after it started."""
    if isinstance(exc, OwnLLMError):
        status, code = from_ownllm(exc)
        return f"data: {json.dumps(body(status, str(exc), exc.param, code))}\n\n"
    return f"data: {json.dumps(body(500, 'internal error while generating'))}\n\n"


BODY_NOT_PARSED = "There was an error parsing the body"  # FastAPI's detail when decoding fails other than as JSON


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api(_: Request, exc: APIError) -> JSONResponse:
        return envelope(exc.status, exc.message, exc.param, exc.code, exc.headers)

    @app.exception_handler(OwnLLMError)
    async def _ownllm(_: Request, exc: OwnLLMError) -> JSONResponse:
        status, code = from_ownllm(exc)
        headers = {"Retry-After": "1"} if status == 429 else None
        return envelope(status, str(exc), exc.param, code, headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = exc.errors()
        if any(p.get("type") == "json_invalid" for p in problems):
            return envelope(400, "the request body is not valid JSON", None, "invalid_json")
        param, message = describe_validation_error(problems)
        return envelope(400, message, param, "invalid_value")

    @app.exception_handler(HTTPException)
    async def _http(_: Request, exc: HTTPException) -> JSONResponse:
        code = {413: "body_too_large", 404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        if exc.status_code == 400 and exc.detail == BODY_NOT_PARSED:  # what JSON's own errors say, and why
            return envelope(400, "the request body is not valid JSON (bytes that are not UTF-8, nesting too deep or "
                                 "a number too long to read)", None, "invalid_json")
        return envelope(exc.status_code, str(exc.detail), code=code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return envelope(500, "internal server error")
