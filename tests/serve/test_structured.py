"""Structured output on the server (issue 14): `response_format` json_object and json_schema, enforced, through the
official `openai` client, streamed and not, n > 1, concurrent requests with different schemas; bad formats are a
400 in OpenAI's envelope naming the field, before anything is generated (a stream never opens)."""

from __future__ import annotations

import concurrent.futures
import json
from typing import Any

import httpx
import jsonschema
import pytest
from pydantic import BaseModel

from tests.generate.json_schemas import SCHEMAS

pytestmark = pytest.mark.slow
MODEL = "smollm2-135m-instruct"
RATING = {"type": "object", "properties": {"movie": {"enum": ["Alien", "Heat", "Up"]},
                                           "stars": {"type": "integer", "minimum": 1, "maximum": 5}},
          "required": ["movie", "stars"], "additionalProperties": False}


def json_schema_format(schema: dict[str, Any], name: str = "answer") -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def ask(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


def test_json_object_is_enforced(server) -> None:
    reply = server.client().chat.completions.create(
        model=MODEL, messages=ask("Give the capital of France as a JSON object."), max_tokens=64, temperature=0,
        response_format={"type": "json_object"})
    choice = reply.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    assert isinstance(json.loads(choice.message.content), dict)


def test_json_schema_streamed_equals_non_streamed(server) -> None:
    client = server.client()
    options = {"model": MODEL, "messages": ask("Rate a movie."), "max_tokens": 48, "seed": 5,
               "response_format": json_schema_format(RATING)}
    plain = client.chat.completions.create(**options)
    content = plain.choices[0].message.content
    assert plain.choices[0].finish_reason == "stop", content
    jsonschema.validate(json.loads(content), RATING)
    chunks = list(client.chat.completions.create(**options, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]


def test_n_choices_each_valid(server) -> None:
    reply = server.client().chat.completions.create(
        model=MODEL, messages=ask("Rate a movie."), n=2, seed=2, max_tokens=48,
        response_format=json_schema_format(RATING))
    for choice in reply.choices:
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), RATING)


def test_pydantic_parse_through_the_official_client(server) -> None:
    class Rating(BaseModel):
        movie: str
        stars: int

    reply = server.client().chat.completions.parse(model=MODEL, messages=ask("Rate the movie Alien."),
                                                   response_format=Rating, max_tokens=48, temperature=0)
    parsed = reply.choices[0].message.parsed
    assert reply.choices[0].finish_reason == "stop" and isinstance(parsed, Rating)


def test_completions_take_response_format(server) -> None:
    reply = server.client().completions.create(
        model=MODEL, prompt="A movie rating as JSON:", max_tokens=48, temperature=0,
        extra_body={"response_format": json_schema_format(RATING)})
    assert reply.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(reply.choices[0].text), RATING)


def test_concurrent_requests_with_different_schemas_and_none(server) -> None:
    """Eight streams at once, seven with their own schema and one free: each valid for its own request."""
    names = ["boolean flag", "enum color", "enum mixed", "null only", "string pattern", "integer range",
             "multiple of"]
    jobs = [(prompt, schema) for name, prompt, schema, *_ in SCHEMAS if name in names] + [("Say hi.", None)]
    client = server.client()

    def run(prompt: str, schema: dict[str, Any] | None) -> tuple[str, str | None]:
        extra = {"response_format": json_schema_format(schema)} if schema is not None else {}
        chunks = client.chat.completions.create(model=MODEL, messages=ask(prompt), temperature=0, stream=True,
                                                max_tokens=40 if schema is not None else 12, **extra)
        text, finish = "", None
        for chunk in chunks:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
        return text, finish

    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda job: run(*job), jobs))
    for (prompt, schema), (text, finish) in zip(jobs, results, strict=True):
        if schema is None:
            assert text
            continue
        assert finish == "stop", (prompt, text)
        jsonschema.validate(json.loads(text), schema)


@pytest.mark.parametrize(("path", "body", "param", "words"), [
    ("/v1/chat/completions", {"response_format": {"type": "xml"}}, "response_format.type", "json_schema"),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema"}}, "response_format", "json_schema"),
    ("/v1/chat/completions", {"response_format": json_schema_format({"$ref": "#/$defs/Nope"})},
     "response_format.json_schema.schema", "/$defs/Nope"),
    ("/v1/chat/completions", {"response_format": json_schema_format({"type": "strang"})},
     "response_format.json_schema.schema", "strang"),
    ("/v1/chat/completions", {"response_format": json_schema_format({"type": "array", "uniqueItems": True})},
     "response_format.json_schema.schema", "uniqueItems"),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {"name": "x",
                                                                                          "schema": [1]}}},
     "response_format.json_schema.schema", "dict"),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}},
     "response_format.json_schema.name", "pattern"),
    ("/v1/completions", {"response_format": json_schema_format({"type": "string", "pattern": "(("})},
     "response_format.json_schema.schema", "unclosed group"),
    ("/v1/chat/completions", {"response_format": json_schema_format({"type": "object", "patternProperties": {
        "^x{200000}$": {"type": "string"}}})}, "response_format.json_schema.schema", "200,000 positions"),
])
def test_bad_response_formats_are_400_before_generation(server, path: str, body: dict[str, Any], param: str,
                                                        words: str) -> None:
    base = {"model": MODEL, "max_tokens": 8, "stream": True}
    base.update({"messages": ask("Hi")} if path == "/v1/chat/completions" else {"prompt": "Hi"})
    response = httpx.post(f"{server.url}{path}", json={**base, **body}, timeout=60)
    assert response.status_code == 400, response.text
    assert response.headers["content-type"].startswith("application/json")  # refused before a stream opened
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error", error
    assert words in error["message"], error
