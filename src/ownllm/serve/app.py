"""The HTTP routes: thin translations between OpenAI's wire format and the engine's scheduler."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ownllm.errors import OwnLLMError
from ownllm.generate.engine import Completion, TextDelta
from ownllm.rag.context import IDK, RagContext
from ownllm.serve import classify_api, errors, formats, tool_calls, ui_api, ui_static
from ownllm.serve.errors import APIError
from ownllm.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    RagOptions,
    TGIRequest,
    TokenizeRequest,
)
from ownllm.serve.state import Generation, ServerState, render_prompt

PUBLIC_PATHS = {"/health", "/openapi.json"}
PUBLIC_PATHS |= ui_static.public_paths()  # the web UI's page and assets; its API calls carry the key
# Header bytes a request may carry (the request line aside). The HTTP parser reads up to READ_HEADER_BYTES of them
# (`serve.run`), so a request past this limit is whole when it is refused: a 431 the client reads, where h11's own
# 16 KB limit answered a plain-text 400 and closed with the rest unread (the client saw a connection reset).
MAX_HEADER_BYTES = 32 << 10
READ_HEADER_BYTES = 1 << 20


class _Guard:
    """ASGI middleware, before anything reads the body: the API key (401), the body size limit (413, declared or
    counted as it arrives), and request counting by route template and status (bounded label values: never a raw
    path with somebody's file or job id in it)."""

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        limit = self.state.limits.max_upload if path == "/v1/files" else self.state.limits.max_body
        status = {"code": 500}

        async def counted_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        public = path in PUBLIC_PATHS or (path == "/metrics" and self.state.metrics_public)
        try:
            # every header counted, a name sent many times as often as it is sent
            sizes = [(len(name) + len(value), name) for name, value in scope.get("headers") or []]
            total = sum(size for size, _ in sizes)
            if total > MAX_HEADER_BYTES:
                size, name = max(sizes)
                raise APIError(431, f"the request's headers are {total} bytes, more than the {MAX_HEADER_BYTES} "
                                    f"this server reads (the largest: {name.decode('latin-1')!r}, {size} bytes)",
                               code="headers_too_large")
            if not public:
                authorization = headers.get(b"authorization")
                self.state.check_key(authorization.decode("latin-1") if authorization is not None else None)
        except APIError as exc:
            await errors.envelope(exc.status, exc.message, exc.param, exc.code)(scope, receive, counted_send)
        else:
            if declared is not None and declared.isdigit() and int(declared) > limit:
                await errors.envelope(413, f"request body is larger than {limit} bytes", code="body_too_large")(
                    scope, receive, counted_send)
            else:
                received = {"bytes": 0}

                async def limited_receive() -> Message:
                    message = await receive()
                    received["bytes"] += len(message.get("body", b""))
                    if received["bytes"] > limit:  # a chunked body has no length to check up front
                        raise HTTPException(413, f"request body is larger than {limit} bytes")
                    return message

                try:
                    await self.app(scope, limited_receive, counted_send)
                finally:  # an unhandled error is answered 500 further out: count it here as such
                    self._count(scope, status["code"])
                return
        self._count(scope, status["code"])

    def _count(self, scope: Scope, status: int) -> None:
        # the route the router matched (set in this scope while routing); refused before routing: "unrouted"
        route = getattr(scope.get("route"), "path", None) or "unrouted"
        self.state.metrics.requests.labels(route, str(status)).inc()


def create_app(state: ServerState) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await asyncio.get_running_loop().run_in_executor(None, state.scheduler.stop, 10.0)

    # No /docs or /redoc: their pages load scripts from a CDN, blank on the offline machines this runs on.
    app = FastAPI(title="ownllm", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="OpenAI-compatible API over a local model, with continuous batching.")
    app.state.ownllm = state
    errors.install(app)
    app.add_middleware(_Guard, state=state)

    # --- models, health, metrics ------------------------------------------------------------
    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": state.model_name, "running": len(state.scheduler.running_requests()),
                "waiting": len(state.scheduler.waiting), "batching": state.scheduler.batching}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return PlainTextResponse(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        if state.jobs is not None:
            state.jobs.publish_models()  # a job reported as succeeded is listed at once
        cards = [formats.model_card(state.model_name, state.created, max_model_len=state.context_length)]
        cards += [formats.model_card(name, state.created, parent=state.model_name, root=name)
                  for name in state.adapters]  # where its files are is the server's business
        cards.append(formats.model_card(state.embedding_model, state.created, owned_by="sentence-transformers"))
        cards += [formats.model_card(name, state.created, task="classify")
                  for name in state.classifiers]  # POST /v1/classify, not chat
        return {"object": "list", "data": cards}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> dict[str, Any]:
        for card in (await list_models())["data"]:
            if card["id"] == model_id:
                return card
        raise APIError(404, f"The model '{model_id}' does not exist", param="model", code="model_not_found")

    @app.delete("/v1/models/{model_id:path}")
    async def delete_model(model_id: str) -> dict[str, Any]:
        if state.jobs is not None:
            state.jobs.publish_models()
        if model_id not in state.adapters:
            if model_id in state.model_ids() or model_id in (state.embedding_model, *state.classifiers):
                raise APIError(403, f"The model '{model_id}' is a base model of this server and cannot be deleted",
                               param="model", code="model_not_deletable")
            raise APIError(404, f"The model '{model_id}' does not exist", param="model", code="model_not_found")
        if state.jobs is None or not state.jobs.delete_model(model_id):
            state.remove_adapter(model_id)  # an --adapter of this server: it stops serving it, files stay
        return {"id": model_id, "object": "model", "deleted": True}

    if state.jobs is not None:
        from ownllm.serve.fine_tuning import router

        app.include_router(router(state.jobs.store, state.jobs, state.model_name))
    app.include_router(ui_api.router(state))  # explain, data check, documents: the web UI's extensions
    app.include_router(classify_api.router(state))
    ui_static.mount(app)

    # --- chat -------------------------------------------------------------------------------
    @app.post("/v1/chat/completions", response_model=None)
    async def chat(body: ChatCompletionRequest, request: Request, http_response: Response) -> Any:
        adapter = state.adapter_for(body.model)
        plan = _params(body.tool_plan)  # tools and tool_choice, checked before anything runs
        messages = own_messages = [m.to_message() for m in body.messages]
        extra: dict[str, Any] = {}
        if body.rag:
            context = await _retrieve(state, messages, body.rag)
            extra = {"sources": context.sources}
            if context.abstain:
                return _abstain(state, body, extra)
            messages = context.messages(messages)
        hint = body.response_format.hint() if body.response_format is not None else None
        if hint:  # the sampler enforces the format; telling the model too gets better content inside it
            messages = [{"role": "system", "content": hint}, *messages]
        # a long conversation's template and tokens: off the event loop, where other streams are being sent
        prompt_ids = await run_in_threadpool(tool_calls.render_prompt, state.engine, messages, plan)
        params = _params(body.to_sampling_params, state.default_max_tokens(len(prompt_ids)))
        await _check_prompts(state, [prompt_ids], params, "messages")
        # routed by the user's own messages (before any context is added), once the cheap checks have passed
        (routed,) = await state.routes(adapter, [own_messages])
        prompt_ids, params = await state.recall_prompt(
            adapter, routed, messages, own_messages, prompt_ids,
            lambda m: tool_calls.render_prompt(state.engine, m, plan), params,
            length_given=bool(body.max_completion_tokens or body.max_tokens))
        headers = state.scope_header(adapter, [routed])
        http_response.headers.update(headers)
        generation = state.submit([prompt_ids], params, n=body.n, adapter=routed, stream=body.stream)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        if body.stream and plan is not None:
            chunks = tool_calls.chat_stream(body.model, len(prompt_ids), body.n, generation.events(), include_usage)
            return _sse((_data(chunk) async for chunk in chunks), generation, headers=headers)
        if body.stream:
            return _sse(_chat_stream(body.model, len(prompt_ids), body.n, generation.events(), include_usage, extra),
                        generation, headers=headers)
        completions = await generation.completions_while_connected(request)
        response = formats.chat_response(body.model, len(prompt_ids), completions, extra)
        return tool_calls.apply_to_response(response, completions) if plan is not None else response

    # --- completions --------------------------------------------------------------------------
    @app.post("/v1/completions", response_model=None)
    async def complete(body: CompletionRequest, request: Request, http_response: Response) -> Any:
        adapter = state.adapter_for(body.model)
        prompts = body.prompts()
        if body.stream and len(prompts) != 1:
            raise APIError(400, "streaming takes one prompt", param="prompt")
        try:
            encoded = await run_in_threadpool(lambda: [state.engine.encode(p) for p in prompts])
        except OwnLLMError as exc:
            raise APIError(400, str(exc), param=exc.param) from None
        texts = [p if isinstance(p, str) else state.engine.tokenizer.decode(p) for p in prompts]
        params = _params(body.to_sampling_params, state.default_max_tokens(max(len(ids) for ids in encoded)))
        candidates = _params(body.candidates)
        if params.prompt_logprobs is not None and state.scheduler.batching["mode"] != "batched":
            raise APIError(400, "echo with logprobs scores the prompt in the batched forward, and this model runs "
                                f"one request at a time ({state.scheduler.batching.get('reason')})", param="echo")
        await _check_prompts(state, encoded, params, "prompt")
        routed = await state.routes(adapter, texts)
        headers = state.scope_header(adapter, routed)
        http_response.headers.update(headers)
        generation = state.submit(encoded, params, n=candidates, adapter=routed, prompt_param="prompt",
                                  stream=body.stream, choices_param="best_of" if candidates > body.n else "n")
        if body.stream:
            return _sse(_text_stream(body.model, len(encoded[0]), generation.events(), texts[0] if body.echo else "",
                                     bool(body.stream_options and body.stream_options.include_usage),
                                     state.engine.tokenizer), generation, headers=headers)
        generated = await generation.completions_while_connected(request)
        chosen = [best for start in range(0, len(generated), candidates)
                  for best in formats.best_of(generated[start : start + candidates], body.n)]
        items = [(texts[index // body.n] if body.echo else None, c) for index, c in enumerate(chosen)]
        return formats.text_response(body.model, sum(len(ids) for ids in encoded), items, generated, candidates,
                                     state.engine.tokenizer)

    # --- embeddings, tokenize -------------------------------------------------------------------
    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest) -> dict[str, Any]:
        from ownllm.models.embeddings import load_embedder

        name = body.model or state.embedding_model
        if name not in (state.embedding_model, f"sentence-transformers/{state.embedding_model}"):
            raise APIError(404, f"The embedding model '{name}' does not exist", param="model",
                           code="model_not_found")
        texts = [body.input] if isinstance(body.input, str) else body.input
        if not texts or any(not t for t in texts):
            raise APIError(400, "input must be non-empty text", param="input")
        loop = asyncio.get_running_loop()
        embedder = await loop.run_in_executor(None, load_embedder, state.embedding_model)
        if body.dimensions is not None and body.dimensions != embedder.dimensions:
            raise APIError(400, f"{state.embedding_model} makes {embedder.dimensions}-dimensional embeddings only "
                           f"(dimensions={body.dimensions} was asked for)", param="dimensions")
        vectors = await loop.run_in_executor(None, embedder.embed, texts)
        tokens = sum(embedder.count_tokens(t) for t in texts)
        data = []
        for index, vector in enumerate(vectors):
            value: Any = (base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()
                          if body.encoding_format == "base64" else vector.tolist())
            data.append({"object": "embedding", "index": index, "embedding": value})
        return {"object": "list", "data": data, "model": state.embedding_model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        if body.model is not None:  # every model served shares the tokenizer; one not served is still a 404
            state.adapter_for(body.model)
        if body.messages is not None:
            ids = render_prompt(state.engine, [{"role": m.role, "content": m.text()} for m in body.messages])
        else:
            ids = state.engine.tokenizer.encode(body.prompt or "", add_special_tokens=body.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": state.context_length}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        if body.model is not None:
            state.adapter_for(body.model)
        state.engine.check_token_ids(body.tokens, "tokens")
        return {"prompt": state.engine.tokenizer.decode(body.tokens)}

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict[str, Any]:
        """The served tokenizer's special tokens and chat template, as vLLM's endpoint gives them: with /tokenize
        and /detokenize, what clients such as lm-evaluation-harness's `local-completions` tokenize through
        instead of loading the tokenizer themselves."""
        tokenizer = state.engine.tokenizer
        template = getattr(tokenizer, "chat_template", None)
        info = {name: getattr(tokenizer, name, None) for name in ("eos_token", "bos_token", "pad_token", "unk_token")}
        return {"tokenizer_class": type(tokenizer).__name__, **info,
                "chat_template": template if isinstance(template, str) else None,
                "model_max_length": state.context_length, "vocab_size": state.engine.vocab_size}

    # --- TGI-style generate ----------------------------------------------------------------------
    async def tgi_request(body: TGIRequest) -> tuple[list[int], Any, str | None]:
        """The inputs' token ids, the sampling parameters and the route, once the request's checks pass."""
        params = _params(body.parameters.to_sampling_params)
        ids = await run_in_threadpool(state.engine.encode, body.inputs, "inputs")
        state.check_prompts([ids], params, "inputs")
        return ids, params, await state.route(None, body.inputs)

    @app.post("/generate", response_model=None)
    async def tgi_generate(body: TGIRequest, request: Request, http_response: Response) -> Any:
        if body.stream:
            return await tgi_stream(body)
        ids, params, routed = await tgi_request(body)
        http_response.headers.update(state.scope_header(None, [routed]))
        generation = state.submit([ids], params, adapter=routed, prompt_param="inputs", stream=False)
        (completion,) = await generation.completions_while_connected(request)
        result: dict[str, Any] = {"generated_text": completion.text}
        if body.parameters.details:
            result["details"] = _tgi_details(completion)
        return result

    @app.post("/generate_stream", response_model=None)
    async def tgi_stream(body: TGIRequest) -> StreamingResponse:
        ids, params, routed = await tgi_request(body)
        generation = state.submit([ids], params, adapter=routed, prompt_param="inputs")

        async def stream() -> AsyncIterator[str]:
            async for _, event in generation.events():
                if isinstance(event, TextDelta):
                    yield _data({"token": {"id": event.token_ids[-1] if event.token_ids else None,
                                           "text": event.text, "logprob": None, "special": False},
                                 "generated_text": None, "details": None})
                else:
                    yield _data({"token": {"id": None, "text": "", "logprob": None, "special": True},
                                 "generated_text": event.text, "details": _tgi_details(event)})

        return _sse(stream(), generation, done=False, headers=state.scope_header(None, [routed]))

    return app


# --- helpers ----------------------------------------------------------------------------------
def _params(build: Any, *args: Any) -> Any:
    try:
        return build(*args)
    except OwnLLMError as exc:
        raise APIError(400, str(exc), param=exc.param) from None


async def _check_prompts(state: ServerState, prompts: list[list[int]], params: Any, prompt_param: str) -> None:
    """A request's checks before the costlier work of routing it: each prompt's room in the context window and
    token ids (first: a prompt refused for its length never compiles a grammar), then its constraint
    (response_format) compiled off the event loop, as a large schema takes a while and other requests' streams must
    not wait for it. A constraint that cannot be used raises OwnLLMError (400 naming the field); `submit` then
    finds it compiled."""
    state.check_prompts(prompts, dataclasses.replace(params, constraint=None), prompt_param)
    if params.constraint is not None:
        await asyncio.get_running_loop().run_in_executor(None, state.engine.check_constraint, params.constraint)


def _data(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _sse(chunks: AsyncIterator[str], generation: Generation | None, *, done: bool = True,
         headers: dict[str, str] | None = None) -> StreamingResponse:
    async def framed() -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield chunk
        except APIError as exc:
            yield f"data: {json.dumps(errors.body(exc.status, exc.message, exc.param, exc.code))}\n\n"
        except Exception as exc:  # after the first byte, errors travel inside the stream
            yield errors.sse_error(exc)
        if done:
            yield "data: [DONE]\n\n"

    # The background close also runs when the client leaves before the first chunk (the generator never started).
    background = BackgroundTask(generation.close) if generation is not None else None
    return StreamingResponse(framed(), media_type="text/event-stream", background=background,
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})})


async def _chat_stream(model: str, prompt_tokens: int, n: int, events: AsyncIterator[tuple[int, Any]],
                       include_usage: bool, extra: dict[str, Any]) -> AsyncIterator[str]:
    chunk_id, created = formats.new_id("chatcmpl"), int(time.time())

    def chunk(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> str:
        payload = formats.chat_chunk(chunk_id, model, created, choices, usage, include_usage)
        return _data(payload)

    for index in range(n):
        yield chunk([{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None}])
    completions: list[Completion] = []
    async for index, event in events:
        if isinstance(event, TextDelta):
            if event.text:
                yield chunk([{"index": index, "delta": {"content": event.text}, "logprobs": None,
                              "finish_reason": None}])
        else:
            completions.append(event)
            logprobs = formats.chat_logprobs(event.logprobs)
            yield chunk([{"index": index, "delta": {}, "logprobs": logprobs, "finish_reason": event.finish_reason}])
    if extra:
        yield _data({"id": chunk_id, "object": "chat.completion.chunk", "created": created, "model": model,
                     "choices": [], **extra})
    if include_usage:
        yield _data(formats.chat_chunk(chunk_id, model, created, [], formats.usage(prompt_tokens, completions), True))


async def _text_stream(model: str, prompt_tokens: int, events: AsyncIterator[tuple[int, Any]], echo: str,
                       include_usage: bool, tokenizer: Any) -> AsyncIterator[str]:
    chunk_id, created = formats.new_id("cmpl"), int(time.time())
    completions: list[Completion] = []
    echoed: set[int] = set()

    def chunk(index: int, text: str, finish: str | None, logprobs: dict[str, Any] | None = None) -> str:
        body = {"id": chunk_id, "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}]}
        if include_usage:
            body["usage"] = None
        return _data(body)

    async for index, event in events:
        prefix = "" if index in echoed else echo
        echoed.add(index)
        if isinstance(event, TextDelta):
            if event.text or prefix:
                yield chunk(index, prefix + event.text, None)
        else:  # the last chunk carries the choice's log-probabilities, as a chat stream's does
            completions.append(event)
            yield chunk(index, prefix, event.finish_reason, formats.completion_logprobs(event, echo or None, tokenizer))
    if include_usage:
        yield _data({"id": chunk_id, "object": "text_completion", "created": created, "model": model,
                     "choices": [], "usage": formats.usage(prompt_tokens, completions)})


def _tgi_details(completion: Completion) -> dict[str, Any]:
    return {"finish_reason": {"stop": "eos_token", "length": "length"}.get(completion.finish_reason, "stop_sequence"),
            "generated_tokens": completion.completion_tokens, "seed": completion.seed}


async def _retrieve(state: ServerState, messages: list[dict[str, str]], options: RagOptions | bool
                    ) -> RagContext:
    """What the server's RAG store holds for the last user message, as `ownllm rag ask` would answer from it.
    The search runs off the event loop: embedding the question takes a while."""
    if state.rag_index is None:
        raise APIError(400, "this server has no document store (start it with --rag-store)", param="rag")
    question = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
    if not question:
        raise APIError(400, "rag needs a user message to search for", param="messages")
    rag = options if isinstance(options, RagOptions) else RagOptions()
    return await asyncio.get_running_loop().run_in_executor(
        None, lambda: state.rag_index.context(question, k=rag.k, min_score=rag.min_score))


def _abstain(state: ServerState, body: ChatCompletionRequest, extra: dict[str, Any]) -> Any:
    """The chat answer when retrieval found nothing relevant: "I don't know." in every choice, without running the
    model (no tokens), as `ownllm rag ask` answers; streamed like any other answer."""
    _params(body.to_sampling_params, state.default_max_tokens(0))  # a request that would be refused still is
    answers = [Completion(IDK, [], "stop", prompt_tokens=0, seed=None, sequence_logprob=0.0) for _ in range(body.n)]
    if not body.stream:
        return formats.chat_response(body.model, 0, answers, extra)

    async def events() -> AsyncIterator[tuple[int, TextDelta | Completion]]:
        for index, answer in enumerate(answers):
            yield index, TextDelta(answer.text, [])
            yield index, answer

    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return _sse(_chat_stream(body.model, 0, body.n, events(), include_usage, extra), None)


__all__ = ["JSONResponse", "create_app"]
