"""What a running server holds — the engine and its scheduler, model names, keys, limits, metrics — and the
bridge from the engine thread's events to asyncio."""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ownllm.errors import OwnLLMError
from ownllm.generate.batching import BatchScheduler, Request, SerialScheduler, new_seed
from ownllm.generate.engine import Completion, Engine, TextDelta
from ownllm.generate.params import SamplingParams
from ownllm.serve.errors import APIError
from ownllm.serve.metrics import Metrics


@dataclass
class Limits:
    max_body: int = 1 << 20
    default_max_tokens: int = 512
    max_upload: int = 512 << 20  # /v1/files: training data is larger than a chat request


@dataclass
class ServerState:
    engine: Engine
    scheduler: BatchScheduler | SerialScheduler
    model_name: str
    api_keys: list[str] = field(default_factory=list)
    limits: Limits = field(default_factory=Limits)
    adapters: dict[str, Path] = field(default_factory=dict)
    embedding_model: str = "all-MiniLM-L6-v2"
    rag_index: Any = None
    jobs: Any = None  # ownllm.jobs.manager.JobManager when the server runs fine-tuning jobs
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.metrics = Metrics(waiting=lambda: len(self.scheduler.waiting),
                               running=lambda: len(self.scheduler.running_requests()))

    @property
    def context_length(self) -> int:
        return self.scheduler.context_length

    def model_ids(self) -> list[str]:
        return [self.model_name, *self.adapters]

    def add_adapter(self, name: str, folder: Path) -> None:
        """Serve a LoRA adapter under `name` from now on (no restart)."""
        self.scheduler.load_adapter(name, folder)
        self.adapters[name] = Path(folder)

    def remove_adapter(self, name: str) -> None:
        """New requests for `name` get 404 at once; requests already running finish with it."""
        self.adapters.pop(name, None)
        self.scheduler.unload_adapter(name)

    def adapter_for(self, model: str) -> str | None:
        """The adapter a request's `model` names (None for the base model), or 404."""
        if model == self.model_name:
            return None
        if model not in self.adapters and self.jobs is not None:
            self.jobs.publish_models()  # a job may have succeeded since the manager's last look
        if model in self.adapters:
            return model
        raise APIError(404, f"The model '{model}' does not exist", param="model", code="model_not_found")

    def check_key(self, authorization: str | None) -> None:
        if not self.api_keys:
            return
        given = (authorization or "").removeprefix("Bearer ").strip().encode()
        # compare against every key, always, so timing says nothing about which key nearly matched
        matched = False
        for key in self.api_keys:
            matched |= hmac.compare_digest(given, key.encode())
        if not matched:
            raise APIError(401, "Incorrect API key provided" if given else "Missing API key (Authorization: "
                           "Bearer ...)", code="invalid_api_key")

    def check_fits(self, prompt_tokens: int, max_tokens: int) -> None:
        if prompt_tokens + max_tokens > self.context_length:
            raise APIError(400, f"This model's maximum context length is {self.context_length} tokens. However, "
                           f"you requested {prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, "
                           f"{max_tokens} in the completion). Please reduce the length of the messages or "
                           "completion.", param="messages", code="context_length_exceeded")

    async def generate(self, prompt_ids: list[int], params: SamplingParams, *, n: int = 1,
                       adapter: str | None = None) -> AsyncIterator[tuple[int, TextDelta | Completion]]:
        """Submit `n` sequences and yield (choice index, event) as they come; cancels them if the consumer
        stops early (client gone)."""
        if not prompt_ids:
            raise APIError(400, "the prompt is empty", param="prompt")
        self.check_fits(len(prompt_ids), params.max_new_tokens)
        loop = asyncio.get_running_loop()
        merged: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
        requests: list[Request] = []
        try:
            for index in range(n):
                def sink(event: Any, index: int = index) -> None:
                    loop.call_soon_threadsafe(merged.put_nowait, (index, event))

                request = Request(prompt_ids, params, new_seed(params, index), sink, adapter=adapter)
                self.scheduler.submit(request)
                requests.append(request)
            self.metrics.prompt_tokens.inc(len(prompt_ids) * n)
            started = time.perf_counter()
            first_seen: dict[int, float] = {}
            open_choices = set(range(n))
            while open_choices:
                index, event = await merged.get()
                now = time.perf_counter()
                if isinstance(event, BaseException):
                    raise event
                if isinstance(event, TextDelta):
                    if index not in first_seen:
                        self.metrics.ttft.observe(now - started)
                    else:
                        self.metrics.itl.observe(now - first_seen[index])
                    first_seen[index] = now
                else:
                    open_choices.discard(index)
                    self.metrics.generated_tokens.inc(event.completion_tokens)
                yield index, event
        finally:
            for request in requests:
                request.cancel()  # no-op for finished requests; frees the slot of abandoned ones


def render_prompt(engine: Engine, messages: list[dict[str, str]]) -> list[int]:
    try:
        return engine.render_chat(messages)  # type: ignore[arg-type]
    except OwnLLMError as exc:
        raise APIError(400, str(exc), param=exc.param or "messages") from None
