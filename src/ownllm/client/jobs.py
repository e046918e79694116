"""A small client for a server's files and fine-tuning jobs API (what `ownllm jobs` calls): the server's
error envelope becomes an OwnLLMError with its message, an unreachable server says so."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import httpx

from ownllm.errors import OwnLLMError

DEFAULT_URL = "http://127.0.0.1:8000"


class JobsClient:
    """The files and fine-tuning jobs endpoints of the server at `url` (default $OWNLLM_URL, then
    http://127.0.0.1:8000); the API key defaults to $OWNLLM_API_KEY, then $OPENAI_API_KEY."""

    def __init__(self, url: str | None = None, api_key: str | None = None, timeout: float = 60.0) -> None:
        self.url = (url or os.environ.get("OWNLLM_URL") or DEFAULT_URL).rstrip("/").removesuffix("/v1")
        key = api_key or os.environ.get("OWNLLM_API_KEY") or os.environ.get("OPENAI_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(base_url=self.url + "/v1", headers=headers, timeout=timeout)

    def _call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError:
            raise OwnLLMError(f"no ownllm server answers at {self.url}", kind="not_found", param="url",
                              hint="start one with: ownllm serve MODEL, or pass --url") from None
        if response.status_code >= 400:
            try:
                error = response.json()["error"]
                message = error.get("message") or response.text
            except (ValueError, KeyError, TypeError):
                message = response.text[:300]
            raise OwnLLMError(f"server said ({response.status_code}): {message}",
                              kind="not_found" if response.status_code == 404 else "invalid_request")
        return response.json()

    def upload(self, path: Path, purpose: str = "fine-tune") -> dict[str, Any]:
        if not path.is_file():
            raise OwnLLMError(f"no such file: {path}", kind="not_found", param="training_file")
        with path.open("rb") as handle:
            return self._call("POST", "/files", files={"file": (path.name, handle)}, data={"purpose": purpose})

    def delete_file(self, file_id: str) -> dict[str, Any]:
        return self._call("DELETE", f"/files/{file_id}")

    def create(self, **body: Any) -> dict[str, Any]:
        return self._call("POST", "/fine_tuning/jobs", json={k: v for k, v in body.items() if v is not None})

    def list(self, limit: int = 20, after: str | None = None) -> dict[str, Any]:
        return self._call("GET", "/fine_tuning/jobs", params={"limit": limit, **({"after": after} if after else {})})

    def get(self, job_id: str) -> dict[str, Any]:
        return self._call("GET", f"/fine_tuning/jobs/{job_id}")

    def events(self, job_id: str, limit: int = 100) -> dict[str, Any]:
        return self._call("GET", f"/fine_tuning/jobs/{job_id}/events", params={"limit": limit})

    def checkpoints(self, job_id: str) -> dict[str, Any]:
        return self._call("GET", f"/fine_tuning/jobs/{job_id}/checkpoints")

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._call("POST", f"/fine_tuning/jobs/{job_id}/cancel")
