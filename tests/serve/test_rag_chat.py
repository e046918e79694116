"""A chat with `rag` answers through Index.context, as `ownllm rag ask` does: the same numbered sources, the same
prompt, and "I don't know." without running the model when nothing retrieved is close enough."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from ownllm.rag.context import IDK
from ownllm.rag.index import Index

MODEL = "smollm2-135m-instruct"
QUESTION = "Who founded Lumen Bikes?"
CONVERSATION = [{"role": "system", "content": "Talk like a pirate."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Ahoy!"}, {"role": "user", "content": QUESTION}]


@pytest.fixture(scope="module")
def index(rag_store: Path) -> Index:
    """The server's own store, opened here to compute what the server should answer from."""
    return Index(rag_store)


def chat(server: Any, **body: Any) -> dict[str, Any]:
    response = httpx.post(f"{server.url}/v1/chat/completions", timeout=120,
                          json={"model": MODEL, "messages": CONVERSATION, "temperature": 0, "max_tokens": 8, **body})
    assert response.status_code == 200, response.text
    return response.json()


def chat_stream(server: Any, **body: Any) -> list[Any]:
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", timeout=120,
                      json={"model": MODEL, "messages": CONVERSATION, "temperature": 0, "max_tokens": 8,
                            "stream": True, **body}) as response:
        assert response.status_code == 200
        lines = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    return [line if line == "[DONE]" else json.loads(line) for line in lines]


def assert_same_sources(got: list[dict[str, Any]], expected: list[dict[str, Any]]) -> None:
    assert [{**s, "score": pytest.approx(s["score"], abs=1e-6)} for s in expected] == got


def test_abstains_without_running_the_model(server: Any, index: Index) -> None:
    expected = index.context(QUESTION, k=2, min_score=1.0)
    assert expected.abstain and expected.hits
    reply = chat(server, rag={"k": 2, "min_score": 1.0}, n=2)
    assert [(c["message"]["content"], c["finish_reason"]) for c in reply["choices"]] == [(IDK, "stop")] * 2
    assert reply["usage"] == {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0,
                              "prompt_tokens_details": {"cached_tokens": 0}}
    assert_same_sources(reply["sources"], expected.sources)  # what was found, though not good enough


def test_abstains_when_streamed(server: Any, index: Index) -> None:
    role, content, finish, sources, usage, done = chat_stream(server, rag={"k": 2, "min_score": 1.0},
                                                              stream_options={"include_usage": True})
    assert role["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert content["choices"][0]["delta"] == {"content": IDK} and content["choices"][0]["finish_reason"] is None
    assert finish["choices"][0]["delta"] == {} and finish["choices"][0]["finish_reason"] == "stop"
    assert sources["choices"] == []
    assert_same_sources(sources["sources"], index.context(QUESTION, k=2, min_score=1.0).sources)
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 0
    assert done == "[DONE]"
    assert len({e["id"] for e in (role, content, finish, sources, usage)}) == 1


def test_answers_from_the_same_sources_and_prompt(server: Any, index: Index) -> None:
    expected = index.context(QUESTION, k=2, min_score=-1)
    assert not expected.abstain
    reply = chat(server, rag={"k": 2, "min_score": -1})
    assert_same_sources(reply["sources"], expected.sources)
    assert reply["sources"][0]["source"].endswith("company.html")
    assert reply["usage"]["completion_tokens"] > 0  # the model ran
    # the model read exactly Index.context's prompt for this conversation (the client's system message replaced)
    prompt = httpx.post(f"{server.url}/tokenize", json={"messages": expected.messages(CONVERSATION)}).json()
    assert reply["usage"]["prompt_tokens"] == prompt["count"]
    events = chat_stream(server, rag={"k": 2, "min_score": -1})
    assert events[-1] == "[DONE]"
    assert_same_sources(next(e["sources"] for e in events[:-1] if "sources" in e), expected.sources)
    assert "".join(c["delta"].get("content") or "" for e in events[:-1] for c in e["choices"]) == \
        reply["choices"][0]["message"]["content"]
