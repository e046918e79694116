"""POST /v1/classify (an ownllm extension, the shape of /v1/embeddings): the label and probabilities a
classification run (`ownllm finetune --task classify`) gives each text, for runs served with
`ownllm serve MODEL --classifier NAME=RUN`."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter

from ownllm.serve.errors import APIError
from ownllm.serve.protocol import ClassifyRequest
from ownllm.serve.state import ServerState


def router(state: ServerState) -> APIRouter:
    api = APIRouter()

    @api.post("/v1/classify")
    async def classify(body: ClassifyRequest) -> dict[str, Any]:
        classifier = state.classifiers.get(body.model)
        if classifier is None:
            served = ", ".join(sorted(state.classifiers)) or "none: start the server with --classifier NAME=RUN"
            raise APIError(404, f"The classifier '{body.model}' does not exist (classifiers here: {served})",
                           param="model", code="model_not_found")
        texts = [body.input] if isinstance(body.input, str) else body.input
        results = await asyncio.get_running_loop().run_in_executor(None, classifier.classify, texts)
        lengths = [len(ids) for ids in classifier.tokenizer(texts, add_special_tokens=True).input_ids]
        data = [{"object": "classification", "index": index, "label": label, "probabilities": probabilities,
                 "truncated": length > classifier.max_length}
                for index, ((label, probabilities), length) in enumerate(zip(results, lengths, strict=True))]
        tokens = sum(min(length, classifier.max_length) for length in lengths)
        return {"object": "list", "data": data, "model": body.model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    return api
