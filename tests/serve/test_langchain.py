"""LangChain as a drop-in (issue 14): `langchain-openai`'s `ChatOpenAI` and `OpenAIEmbeddings`, unmodified, pointed at
`ownllm serve` with `base_url`. What LangChain apps use: `invoke`, `stream`, `bind_tools` (a call whose arguments
validate, streamed and not), `with_structured_output` with a pydantic class (both ways LangChain asks for it: a
JSON schema response format and a forced tool call), and embeddings for a vector store."""

from __future__ import annotations

import math
from typing import Literal

import jsonschema
import pytest
from pydantic import BaseModel, Field

pytestmark = pytest.mark.slow
langchain_openai = pytest.importorskip("langchain_openai", reason="langchain-openai (dev extra) is not installed")
MODEL = "smollm2-135m-instruct"


class Weather(BaseModel):
    """The current weather in a city."""

    city: str = Field(description="The city's name", max_length=20)
    unit: Literal["celsius", "fahrenheit"]


class Person(BaseModel):
    """A person mentioned in the text."""

    name: str = Field(max_length=30)
    age: int = Field(ge=0, le=150)


def chat(server, **options):
    return langchain_openai.ChatOpenAI(base_url=f"{server.url}/v1", api_key="none", model=MODEL, temperature=0,
                                       max_retries=0, timeout=120, **options)


def test_invoke_and_stream_give_the_same_greedy_reply(server) -> None:
    llm = chat(server, max_tokens=16)
    reply = llm.invoke("Name one colour.")
    assert isinstance(reply.content, str) and reply.content
    assert reply.usage_metadata["output_tokens"] >= 1 and reply.response_metadata["finish_reason"] in ("stop",
                                                                                                      "length")
    pieces = [chunk.content for chunk in llm.stream("Name one colour.")]
    assert len(pieces) > 2 and "".join(pieces) == reply.content


def test_bind_tools_yields_a_call_that_validates(server) -> None:
    llm = chat(server, max_tokens=64).bind_tools([Weather], tool_choice="Weather")
    message = llm.invoke("What is the weather like in Paris, in celsius?")
    assert len(message.tool_calls) >= 1
    call = message.tool_calls[0]
    assert call["name"] == "Weather" and call["id"].startswith("call_")
    jsonschema.validate(call["args"], Weather.model_json_schema())

    streamed = None
    for chunk in llm.stream("What is the weather like in Paris, in celsius?"):
        streamed = chunk if streamed is None else streamed + chunk
    assert streamed is not None and streamed.tool_calls[0]["name"] == "Weather"
    assert streamed.tool_calls[0]["args"] == call["args"]  # greedy: the fragments rebuild the same arguments


def test_tool_results_go_back_for_a_final_answer(server) -> None:
    from langchain_core.messages import HumanMessage, ToolMessage

    llm = chat(server, max_tokens=48)
    question = HumanMessage("What is the weather like in Paris, in celsius?")
    asked = llm.bind_tools([Weather], tool_choice="required").invoke([question])
    call = asked.tool_calls[0]
    answer = llm.bind_tools([Weather]).invoke(
        [question, asked, ToolMessage("18 degrees and sunny", tool_call_id=call["id"])])
    assert isinstance(answer.content, str) and answer.content and not answer.tool_calls


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_with_structured_output_returns_the_pydantic_object(server, method: str) -> None:
    llm = chat(server, max_tokens=64).with_structured_output(Person, method=method)
    person = llm.invoke("Alice is 31 years old. Extract the person.")
    assert isinstance(person, Person) and person.name and 0 <= person.age <= 150


def test_embeddings_for_a_vector_store(server) -> None:
    # check_embedding_ctx_length=False: otherwise LangChain cuts text with OpenAI's tiktoken tokenizer (downloaded
    # at run time, and not the embedding model's) and sends token ids instead of the text.
    embeddings = langchain_openai.OpenAIEmbeddings(base_url=f"{server.url}/v1", api_key="none",
                                                   model="all-MiniLM-L6-v2", check_embedding_ctx_length=False)
    documents = embeddings.embed_documents(["The cat sat on the mat.", "Stock markets fell sharply today."])
    query = embeddings.embed_query("Where did the cat sit?")
    assert len(documents) == 2 and all(len(vector) == 384 for vector in [*documents, query])

    def cosine(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b, strict=True)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))

    assert cosine(query, documents[0]) > cosine(query, documents[1])
