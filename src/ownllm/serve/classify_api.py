"""POST /v1/classify (an ownllm extension, the shape of /v1/embeddings): the label and probabilities a
classification run (`ownllm finetune --task classify`) gives each text, for runs served with
`ownllm serve MODEL --classifier NAME=RUN`."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request

from ownllm.serve.errors import APIError
from ownllm.serve.protocol import ClassifyRequest
from ownllm.serve.state import ServerState

MAX_TOKENS = 32_768  # per request, counted after truncation: a CPU answers that in about a minute, not ten
CHUNK = 8  # texts per forward


def router(state: ServerState) -> APIRouter:
    api = APIRouter()

    @api.post("/v1/classify")
    async def classify(body: ClassifyRequest, request: Request) -> dict[str, Any]:
        classifier = state.classifiers.get(body.model)
        if classifier is None:
            served = ", ".join(sorted(state.classifiers)) or "none: start the server with --classifier NAME=RUN"
            raise APIError(404, f"The classifier '{body.model}' does not exist (classifiers here: {served})",
                           param="model", code="model_not_found")
        texts = [body.input] if isinstance(body.input, str) else body.input
        loop = asyncio.get_running_loop()
        encoded = await loop.run_in_executor(None, lambda: classifier.tokenizer(texts, add_special_tokens=True))
        lengths = [len(ids) for ids in encoded.input_ids]
        tokens = sum(min(length, classifier.max_length) for length in lengths)
        if tokens > MAX_TOKENS:
            raise APIError(400, f"input is {tokens:,} tokens after truncation to {classifier.max_length} per text; "
                           f"at most {MAX_TOKENS:,} per request: send it in several", param="input",
                           code="too_many_tokens")
        results: list[tuple[str, dict[str, float]]] = []
        for start in range(0, len(texts), CHUNK):  # a client that leaves stops the work between chunks
            if await request.is_disconnected():
                raise APIError(499, "the client closed the request", code="client_closed_request")
            results += await loop.run_in_executor(None, classifier.classify, texts[start : start + CHUNK])
        data = [{"object": "classification", "index": index, "label": label, "probabilities": probabilities,
                 "truncated": length > classifier.max_length}
                for index, ((label, probabilities), length) in enumerate(zip(results, lengths, strict=True))]
        return {"object": "list", "data": data, "model": body.model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    return api
