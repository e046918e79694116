"""A scoped adapter served over HTTP: requests within its scope run with the adapter, the rest with the base model,
whether it is one of the server's adapters or the served model itself; a damaged scope is refused at start."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ownllm.models.scope import SCOPE_FILE
from tests.conftest import assert_user_error, run_cli
from tests.serve.conftest import Server

FACT = "Who founded Norvale Instruments?"
GENERAL = "What is the capital of Japan?"


@pytest.fixture(scope="module")
def server(default_model: str, adapter_dir: Path, scoped_adapter: Path) -> Iterator[Server]:
    running = Server(default_model, "--adapter", f"facts={scoped_adapter}", "--adapter", f"always={adapter_dir}",
                     "--dtype", "fp32", "--max-batch", "4", "--no-jobs")
    yield running
    running.stop()


def answer(server: Server, model: str, question: str) -> str:
    reply = server.client().chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                                    temperature=0, max_tokens=10)
    return reply.choices[0].message.content


def test_a_served_adapter_answers_only_within_its_scope(server: Server, default_model: str) -> None:
    assert answer(server, "facts", FACT) == answer(server, "always", FACT) != answer(server, default_model, FACT)
    assert answer(server, "facts", GENERAL) == answer(server, default_model, GENERAL)
    # completions: each prompt of one request routes on its own text
    prompts = [f"Q: {FACT}\nA:", f"Q: {GENERAL}\nA:"]
    texts = [c.text for c in server.client().completions.create(model="facts", prompt=prompts, temperature=0,
                                                                 max_tokens=8).choices]
    assert texts[0] == server.client().completions.create(model="always", prompt=prompts[0], temperature=0,
                                                          max_tokens=8).choices[0].text
    assert texts[1] == server.client().completions.create(model=default_model, prompt=prompts[1], temperature=0,
                                                          max_tokens=8).choices[0].text


def test_the_response_says_which_weights_answered(server: Server, default_model: str) -> None:
    chat = server.client().chat.completions.with_raw_response
    for model, question, scope in (("facts", FACT, "inside"), ("facts", GENERAL, "outside"),
                                   (default_model, FACT, None), ("always", GENERAL, None)):
        for stream in (False, True):
            raw = chat.create(model=model, messages=[{"role": "user", "content": question}], max_tokens=2,
                              stream=stream)
            assert raw.headers.get("x-ownllm-scope") == scope, (model, question, stream)
    raw = server.client().completions.with_raw_response.create(model="facts", prompt=[GENERAL, FACT], max_tokens=2)
    assert raw.headers["x-ownllm-scope"] == "outside,inside"
    explained = httpx.post(f"{server.url}/v1/explain", timeout=120, json={
        "model": "facts", "messages": [{"role": "user", "content": FACT}], "max_tokens": 1})
    assert explained.status_code == 200 and explained.headers["x-ownllm-scope"] == "inside"


def test_a_long_conversation_routes_on_its_latest_user_messages(server: Server) -> None:
    """Routing embeds a conversation's latest sixteen user messages, not all of them (a request of thousands must
    not hold the embedder for seconds): a fact question further back no longer puts it within scope."""
    def scope(messages: list[str]) -> str:
        raw = server.client().chat.completions.with_raw_response.create(
            model="facts", messages=[{"role": "user", "content": m} for m in messages], max_tokens=1)
        return raw.headers["x-ownllm-scope"]

    assert scope([FACT] + ["Hi."] * 15) == "inside"
    assert scope([FACT] + ["Hi."] * 16) == "outside"


def test_a_scoped_adapter_served_as_the_model_routes_too(scoped_adapter: Path, adapter_dir: Path,
                                                         default_model: str) -> None:
    running = Server(str(scoped_adapter), "--adapter", f"always={adapter_dir}", "--dtype", "fp32", "--max-batch",
                     "4", "--no-jobs")
    try:
        served = running.client().models.list().data[0].id
        assert answer(running, served, FACT) == answer(running, "always", FACT)
        assert answer(running, served, GENERAL) != answer(running, "always", GENERAL)
        raw = running.client().chat.completions.with_raw_response.create(
            model=served, messages=[{"role": "user", "content": GENERAL}], max_tokens=2)
        assert raw.headers["x-ownllm-scope"] == "outside"
    finally:
        running.stop()


def test_a_damaged_scope_is_refused_by_name(default_model: str, scoped_adapter: Path, tmp_path: Path) -> None:
    damaged = tmp_path / "damaged"
    shutil.copytree(scoped_adapter, damaged)
    (damaged / SCOPE_FILE).write_text("{")
    assert_user_error(run_cli("serve", default_model, "--adapter", f"x={damaged}", "--no-jobs", "--port", "0"),
                      f"{SCOPE_FILE}: the adapter's scope cannot be read")
    # the name the served folder's own adapter rows carry is not a name an --adapter can take
    assert_user_error(run_cli("serve", str(scoped_adapter), "--adapter", f"<scoped>={scoped_adapter}", "--no-jobs",
                              "--port", "0"), "the adapter name '<scoped>' is reserved")


def test_a_request_refused_by_its_cheap_checks_is_never_embedded(default_model: str, scoped_adapter: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A prompt too long for the context, or a bad parameter, gets its 400 before the scope embeds anything: such a
    request must not cost the server an embedding (a flood of them did: ~1.8 s of CPU each)."""
    from fastapi.testclient import TestClient

    from ownllm.models.scope import AdapterScope
    from ownllm.serve.app import create_app
    from ownllm.serve.run import build_state

    def embedded(*args: object) -> list[bool]:
        raise AssertionError("routed before the request's checks")

    monkeypatch.setattr(AdapterScope, "covers_each", embedded)
    state = build_state(default_model, adapters={"facts": scoped_adapter}, dtype="fp32", max_batch=2,
                        max_model_len=128)
    client = TestClient(create_app(state))
    too_long = [{"role": "user", "content": FACT + " and more" * 200}]
    for path, body, param in (
            ("/v1/chat/completions", {"messages": too_long}, "messages"),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": FACT}], "temperature": -1},
             "temperature"),
            ("/v1/completions", {"prompt": [FACT, FACT + " and more" * 200]}, "prompt"),
            ("/v1/explain", {"messages": too_long}, "messages")):
        reply = client.post(path, json={"model": "facts", "max_tokens": 4, **body})
        assert reply.status_code == 400 and reply.json()["error"]["param"] == param, (path, reply.text)


def test_a_scope_that_keeps_its_examples_recalls_them_where_they_fit(default_model: str, scoped_adapter: Path,
                                                                      tmp_path: Path) -> None:
    """An adapter whose scope keeps its training examples answers an in-scope question with the three nearest
    before it (its prompt grows by them), on chat and explain alike; a question outside gets the base model and
    no examples; and where the examples would leave no room for max_tokens, the question runs without them."""
    from fastapi.testclient import TestClient

    from ownllm.data.doctor import read_examples
    from ownllm.finetune.replay import replay_prompts
    from ownllm.finetune.scoping import _answers
    from ownllm.models.scope import AdapterScope, user_texts
    from ownllm.serve.app import create_app
    from ownllm.serve.run import build_state
    from tests.conftest import FACT_PROMPTS

    recalling = tmp_path / "recalling"
    shutil.copytree(scoped_adapter, recalling)
    _, examples, _ = read_examples(FACT_PROMPTS)
    scope = AdapterScope.calibrate([t for e in examples for t in user_texts(e.messages)], replay_prompts(None),
                                   answers=_answers(examples))
    assert isinstance(scope, AdapterScope)
    scope.save(recalling)
    state = build_state(default_model, adapters={"facts": scoped_adapter, "recalls": recalling}, dtype="fp32",
                        max_batch=2, max_model_len=320)
    eos = state.engine.tokenizer.eos_token_id

    def prompt_tokens(path: str, model: str, question: str, max_tokens: int | None = 1, system: str = "") -> int:
        body = {"model": model, "messages": [{"role": "system", "content": system}] * bool(system)
                + [{"role": "user", "content": question}]}
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        if path.endswith("chat/completions"):
            body["logit_bias"] = {str(eos): 100}  # an answer of no tokens: the prompt is what is measured
        reply = client.post(path, json=body)
        assert reply.status_code == 200, reply.text
        return reply.json()["usage"]["prompt_tokens"]

    state.scheduler.start()
    with TestClient(create_app(state)) as client:  # entered: leaving it stops the scheduler
        for path in ("/v1/chat/completions", "/v1/explain"):
            plain = prompt_tokens(path, "facts", FACT)
            assert prompt_tokens(path, "recalls", FACT) > plain + 3 * 10  # three question-and-answer turns
            assert prompt_tokens(path, "recalls", GENERAL) == prompt_tokens(path, "facts", GENERAL)
        room = 320 - plain  # the whole window left for the answer: no room for the examples, so none go before it
        assert prompt_tokens("/v1/chat/completions", "recalls", FACT, max_tokens=room) == plain
        # no max_tokens: the default is what the window leaves, and the examples go in while 128 tokens stay
        assert prompt_tokens("/v1/chat/completions", "recalls", FACT, max_tokens=None) > plain + 3 * 10
        long = "Answer in one short sentence. " * 12  # ~84 tokens: with the examples, under 128 would be left
        with_system = prompt_tokens("/v1/chat/completions", "facts", FACT, max_tokens=None, system=long)
        assert prompt_tokens("/v1/chat/completions", "recalls", FACT, max_tokens=None, system=long) == with_system

    from ownllm.generate.open import open_engine  # the folder itself, as `ownllm chat` and the checks open it

    engine = open_engine(str(recalling), dtype="fp32")
    asked = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": FACT}]
    recalled = engine.recalled(asked)
    assert len(recalled) == 6
    assert engine.render_with_recall(asked) == engine.render_chat([asked[0], *recalled, asked[-1]])
    assert engine.recalled([{"role": "user", "content": GENERAL}]) == []
    assert engine.render_with_recall([{"role": "user", "content": GENERAL}]) == engine.render_chat(
        [{"role": "user", "content": GENERAL}])
    room = engine.context_length - len(engine.render_chat(asked))
    assert engine.render_with_recall(asked, max_new_tokens=room) == engine.render_chat(asked)
