"""What a running server holds — the engine and its scheduler, model names, keys, limits, metrics — and the
bridge from the engine thread's events to asyncio."""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ownllm.errors import ContextWindowExceeded, OwnLLMError
from ownllm.generate.batching import BatchScheduler, Request, SerialScheduler
from ownllm.generate.engine import Completion, Engine, TextDelta
from ownllm.generate.hf import SCOPED_ADAPTER
from ownllm.generate.params import SamplingParams
from ownllm.models.scope import AdapterScope, with_recalled
from ownllm.serve.errors import APIError
from ownllm.serve.metrics import Metrics

# tokens an answer keeps at least when recalled examples shorten a default max_tokens (fact answers are a sentence)
RECALL_ANSWER_ROOM = 128

SCOPE_HEADER = "X-OwnLLM-Scope"  # per prompt: "inside" (ran with the adapter) or "outside" (the base model's weights)


@dataclass
class Limits:
    max_body: int = 1 << 20
    default_max_tokens: int = 512
    # the most tokens one request may generate (None: up to the context window); longer asks are cut to it, as
    # llama-server's --n-predict does, so one client cannot hold a slot for the whole window
    max_tokens: int | None = None
    max_upload: int = 512 << 20  # /v1/files: training data is larger than a chat request


@dataclass
class ServerState:
    engine: Engine
    scheduler: BatchScheduler | SerialScheduler
    model_name: str
    model_spec: str  # what loads the served model again (a path made absolute, or the name): jobs, estimates
    api_keys: list[str] = field(default_factory=list)
    metrics_public: bool = False  # /metrics without a key even when keys are set (a scraper inside the firewall)
    limits: Limits = field(default_factory=Limits)
    adapters: dict[str, Path] = field(default_factory=dict)
    scopes: dict[str, AdapterScope] = field(default_factory=dict)  # adapters that answer only prompts within scope
    embedding_model: str = "all-MiniLM-L6-v2"
    rag_index: Any = None
    jobs: Any = None  # ownllm.jobs.manager.JobManager when the server runs fine-tuning jobs
    classifiers: dict[str, Any] = field(default_factory=dict)  # name: ownllm.finetune.classify.Classifier
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.metrics = Metrics(waiting=lambda: len(self.scheduler.waiting),
                               running=lambda: len(self.scheduler.running_requests()),
                               kv_cache=lambda: getattr(self.scheduler, "kv", None))

    @property
    def context_length(self) -> int:
        return self.scheduler.context_length

    def model_ids(self) -> list[str]:
        return [self.model_name, *self.adapters]

    @staticmethod
    def check_adapter(name: str, folder: Path) -> AdapterScope | None:
        """What refuses an adapter before its weights load (and, at start-up, before the model does): a reserved
        name, a folder that is not a LoRA adapter kept apart from the base, a damaged scope. Returns its scope."""
        from ownllm.models.adapters import Adapter

        if name == SCOPED_ADAPTER:  # the served folder's own adapter rows carry it
            raise OwnLLMError(f"the adapter name '{name}' is reserved", param="adapter")
        Adapter.open(Path(folder), kinds=("lora",), param="adapter").check_separable()
        return AdapterScope.load(Path(folder))

    def add_adapter(self, name: str, folder: Path) -> None:
        """Serve a LoRA adapter under `name` from now on (no restart); with a scope (ownllm.models.scope), its
        requests run with the adapter only when they are within it, else with the base model."""
        scope = self.check_adapter(name, folder)
        self.scheduler.load_adapter(name, folder)
        self.adapters[name] = Path(folder)
        if scope is not None:
            self.scopes[name] = scope
        else:
            self.scopes.pop(name, None)

    def remove_adapter(self, name: str) -> None:
        """New requests for `name` get 404 at once; requests already running finish with it."""
        self.adapters.pop(name, None)
        self.scopes.pop(name, None)
        self.scheduler.unload_adapter(name)

    def adapter_for(self, model: str) -> str | None:
        """The adapter a request's `model` names (None for the base model), or 404."""
        if model == self.model_name:
            return None
        if model not in self.adapters and self.jobs is not None:
            self.jobs.publish_models()  # a job may have succeeded since the manager's last look
        if model in self.adapters:
            return model
        if model in self.classifiers:
            raise APIError(400, f"The model '{model}' is a classifier: it labels text (POST /v1/classify), it does "
                           "not write any", param="model", code="model_not_supported")
        raise APIError(404, f"The model '{model}' does not exist", param="model", code="model_not_found")

    def has_scope(self, adapter: str | None) -> bool:
        """Whether requests for `adapter` (`adapter_for`; None: the served model) are routed by a scope."""
        return self.engine.scope is not None if adapter is None else adapter in self.scopes

    def scope_header(self, requested: str | None, routed: list[str | None]) -> dict[str, str]:
        """`X-OwnLLM-Scope` for a request to a model with a scope (ownllm.models.scope): per prompt, "inside" (it ran
        with the adapter) or "outside" (with the base model's own weights); no header for a model without one."""
        if not self.has_scope(requested):
            return {}
        return {SCOPE_HEADER: ",".join("outside" if adapter is None else "inside" for adapter in routed)}

    async def route(self, adapter: str | None, conversation: list[Any] | str) -> str | None:
        """The adapter a request for `adapter` (`adapter_for`) runs with: itself, or the base model (None) when the
        adapter has a scope the conversation is not within."""
        return (await self.routes(adapter, [conversation]))[0]

    async def routes(self, adapter: str | None, conversations: list[Any]) -> list[str | None]:
        """`route` of each of one request's conversations or prompts, embedded together, off the event loop."""
        from starlette.concurrency import run_in_threadpool

        if not self.has_scope(adapter):
            return [adapter] * len(conversations)
        if adapter is None:  # the served model itself: a scoped adapter folder routes in its engine
            return await run_in_threadpool(self.engine.routes, conversations)
        scope = self.scopes[adapter]
        return [adapter if covered else None for covered in await run_in_threadpool(scope.covers_each, conversations)]

    async def recall_prompt(self, requested: str | None, routed: str | None, messages: list[Any],
                            routed_by: list[Any], prompt_ids: list[int], render: Callable[[list[Any]], list[int]],
                            params: SamplingParams, *, length_given: bool = True) -> tuple[list[int], SamplingParams]:
        """The prompt a conversation runs with, and its params: routed inside a scope that keeps its training
        examples, with the nearest of them before its latest user message (ownllm.models.scope) where that leaves
        room for the answer; else `prompt_ids` (`messages` as the caller rendered them with `render`) and `params`.
        `routed_by`: the user's own messages. A request that gave no max_tokens (`length_given` False) has the
        default cut to what the context has left (`default_max_tokens`): the examples are put in while at least
        `RECALL_ANSWER_ROOM` tokens stay for the answer, and its default is then taken from the longer prompt."""
        from starlette.concurrency import run_in_threadpool

        params = self.capped(params)  # the room the answer takes is what it may have under --max-tokens
        if routed is None or not self.has_scope(requested):
            return prompt_ids, params
        scope_recalled = self.engine.recalled if requested is None else self.scopes[requested].recalled
        recalled = await run_in_threadpool(scope_recalled, routed_by)
        if not recalled:
            return prompt_ids, params
        ids = await run_in_threadpool(render, with_recalled(messages, recalled))
        room = params.max_new_tokens if length_given else min(params.max_new_tokens, RECALL_ANSWER_ROOM)
        if len(ids) + room > self.context_length:
            return prompt_ids, params
        if not length_given:
            params = dataclasses.replace(params, max_new_tokens=self.default_max_tokens(len(ids)))
        return ids, params

    def check_key(self, authorization: str | None) -> None:
        """`Authorization: Bearer KEY` with one of the server's keys (when it has any), else 401."""
        if not self.api_keys:
            return
        scheme, _, token = (authorization or "").strip().partition(" ")
        if authorization and scheme.lower() != "bearer":
            raise APIError(401, "The Authorization header must be 'Bearer YOUR_KEY'", code="invalid_api_key")
        given = token.strip().encode()
        # compare against every key, always, so timing says nothing about which key nearly matched
        matched = False
        for key in self.api_keys:
            matched |= hmac.compare_digest(given, key.encode())
        if not matched:
            raise APIError(401, "Incorrect API key provided" if given else "Missing API key (Authorization: "
                           "Bearer ...)", code="invalid_api_key")

    def default_max_tokens(self, prompt_tokens: int) -> int:
        """max_tokens when a request gives none: the server's default (under `--max-tokens`), cut to what the
        context has left (as OpenAI and vLLM do), so a long prompt without max_tokens is answered rather than
        refused."""
        return max(1, min(self.capped_tokens(self.limits.default_max_tokens), self.context_length - prompt_tokens))

    def capped_tokens(self, asked: int) -> int:
        """How many tokens a request that asks for `asked` may generate: at most the server's `--max-tokens`."""
        return asked if self.limits.max_tokens is None else min(asked, self.limits.max_tokens)

    def capped(self, params: SamplingParams) -> SamplingParams:
        """`params` with max_new_tokens cut to the server's `--max-tokens` (unchanged without one)."""
        cap = self.capped_tokens(params.max_new_tokens)
        return params if cap == params.max_new_tokens else dataclasses.replace(params, max_new_tokens=cap)

    def submit(self, prompts: list[list[int]], params: SamplingParams, *, n: int = 1,
               adapter: str | list[str | None] | None = None, prompt_param: str = "messages",
               stream: bool = True, choices_param: str = "n") -> Generation:
        """Check every prompt, then queue all `len(prompts) x n` sequences of one API request at once, all or none,
        before a response starts (so a stream never opens with 200 and then fails on something knowable).
        Sequence `p * n + c` is choice c of prompt p; with a seed, it samples with seed + that index; `adapter`: one
        for all prompts, or prompt p's at index p. `stream`:
        the handler reads each piece of text as it comes (`events()`), not only the completions. `choices_param`:
        the field that asked for `n` sequences per prompt (`best_of` on completions), named when they are too many."""
        params = self.capped(params)
        self.check_prompts(prompts, params, prompt_param)
        return Generation(self, prompts, params, n, adapter, stream, choices_param)

    def check_prompts(self, prompts: list[list[int]], params: SamplingParams, prompt_param: str = "messages"
                      ) -> None:
        """The engine's check of each prompt (room in the context window, token ids, the constraint) as a 400;
        handlers call it before the costlier routing (`routes`), and `submit` again."""
        params = self.capped(params)
        for ids in prompts:
            try:
                self.engine.check_request(ids, params, window=self.context_length, prompt_param=prompt_param)
            except ContextWindowExceeded as exc:
                where = "the messages" if prompt_param == "messages" else "the prompt"
                raise APIError(400, exc.openai_message(where), param=prompt_param, code=exc.code) from None
            except OwnLLMError as exc:
                raise APIError(400, str(exc), param=exc.param, code=exc.code) from None


class Generation:
    """The sequences of one API request, queued; iterate `events()` once for (sequence index, event) as they come.
    Leaving the iteration early (client gone) or `close()` cancels what still runs.

    Without `stream`, the pieces of text never reach the event loop, only each sequence's Completion (and errors):
    a piece handed over wakes the loop's thread at every token, on the cores the decode step's threads run on (the
    loop's CPU per token for such a reply went from 0.23 to ~0.05 ms; bench/RESULTS.md, session 40). Their TTFT
    and ITL are then taken where the engine emits them, a streamed reply's where the loop hands them on."""

    def __init__(self, state: ServerState, prompts: list[list[int]], params: SamplingParams, n: int,
                 adapter: str | list[str | None] | None, stream: bool = True, choices_param: str = "n") -> None:
        self.state, self.count, self.stream = state, len(prompts) * n, stream
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
        self.first_seen: dict[int, float] = {}  # sequence -> when its latest piece came (the TTFT and ITL metrics)
        adapters = adapter if isinstance(adapter, list) else [adapter] * len(prompts)
        # a prompt's tokens are scored once, by its first choice: the others take that choice's scores and may start
        # from its cached prefix (scoring needs every position's logits, so a scored prompt is prefilled whole)
        self.choices = n
        unscored = dataclasses.replace(params, prompt_logprobs=None)
        self.prompt_scores: dict[int, Any] = {}  # prompt -> its first choice's prompt_logprobs, once done
        self.waiting_for_scores: dict[int, list[tuple[int, Completion]]] = {}  # prompt -> other choices, done
        self.requests = [Request(ids, params if index == 0 else unscored, params.seed_for(index),
                                 self._sink(p * n + index), adapter=adapters[p])
                         for p, ids in enumerate(prompts) for index in range(n)]
        self.scores_prompts = params.prompt_logprobs is not None and n > 1
        self.started = time.perf_counter()
        # QueueFull -> 429, shutting down -> 503: nothing queued
        state.scheduler.submit_all(self.requests, choices_param)
        state.metrics.prompt_tokens.inc(sum(len(ids) for ids in prompts) * n)

    def _sink(self, index: int) -> Any:
        def sink(event: Any) -> None:
            if not self.stream and isinstance(event, TextDelta):
                self._observe_piece(index, time.perf_counter())  # (in the engine's thread: nobody reads the piece)
                return
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, event))

        return sink

    def _observe_piece(self, index: int, now: float) -> None:
        metrics = self.state.metrics
        if index not in self.first_seen:
            metrics.ttft.observe(now - self.started)
        else:
            metrics.itl.observe(now - self.first_seen[index])
        self.first_seen[index] = now

    def close(self) -> None:
        for request in self.requests:
            request.cancel()  # no-op for finished requests; frees the slot of abandoned ones

    async def events(self) -> AsyncIterator[tuple[int, TextDelta | Completion]]:
        metrics = self.state.metrics
        open_sequences = set(range(self.count))
        try:
            while open_sequences:
                index, event = await self.queue.get()
                if isinstance(event, BaseException):
                    raise event
                if isinstance(event, TextDelta):
                    self._observe_piece(index, time.perf_counter())
                    yield index, event
                    continue
                open_sequences.discard(index)
                metrics.generated_tokens.inc(event.completion_tokens)
                for done in self._with_prompt_scores(index, event):
                    yield done
        finally:
            self.close()

    def _with_prompt_scores(self, index: int, completion: Completion) -> list[tuple[int, Completion]]:
        """The completions that can go out now that `index` is done: a choice other than its prompt's first waits
        for the first's prompt scores and goes out with them."""
        if not self.scores_prompts:
            return [(index, completion)]
        prompt, choice = divmod(index, self.choices)
        if choice == 0:
            self.prompt_scores[prompt] = completion.prompt_logprobs
            held = self.waiting_for_scores.pop(prompt, [])
        elif prompt in self.prompt_scores:
            held = [(index, completion)]
        else:
            self.waiting_for_scores.setdefault(prompt, []).append((index, completion))
            return []
        scored = [(i, dataclasses.replace(c, prompt_logprobs=self.prompt_scores[prompt])) for i, c in held]
        return [(index, completion), *scored] if choice == 0 else scored

    async def completions(self) -> list[Completion]:
        """Run to the end: every sequence's Completion, in sequence order."""
        done: dict[int, Completion] = {}
        async for index, event in self.events():
            if isinstance(event, Completion):
                done[index] = event
        return [done[i] for i in range(self.count)]

    async def completions_while_connected(self, http_request: Any) -> list[Completion]:
        """`completions()`, watching the client: one that leaves first (nobody will read the answer) gets its
        sequences cancelled at once instead of holding batch slots to the end (a 500-question comparison nobody
        waits for would hold everybody else's for minutes), and a 499."""
        task = asyncio.ensure_future(self.completions())
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=0.5)
                if done:
                    return task.result()
                if await http_request.is_disconnected():
                    raise APIError(499, "the client closed the request", code="client_closed_request")
        finally:
            if not task.done():
                task.cancel()
                self.close()


def render_prompt(engine: Engine, messages: list[dict[str, str]]) -> list[int]:
    try:
        return engine.render_chat(messages)  # type: ignore[arg-type]
    except OwnLLMError as exc:
        raise APIError(400, str(exc), param=exc.param or "messages") from None
