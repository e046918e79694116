"""The OpenAI-compatible server, on loopback, through the official `openai` client and raw HTTP."""

from __future__ import annotations

import base64
import concurrent.futures
import json
import struct
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import openai
import pytest

pytestmark = pytest.mark.slow
MODEL = "smollm2-135m-instruct"
HELLO = [{"role": "user", "content": "Write a short poem about the sea."}]
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_models_list_includes_adapters(server) -> None:
    ids = [m.id for m in server.client().models.list().data]
    assert ids == [MODEL, "tuned", "all-MiniLM-L6-v2"]
    assert server.client().models.retrieve("tuned").id == "tuned"


def test_a_server_of_wide_steps_packs_its_weights_at_start_where_faster(server) -> None:
    """--max-batch 16 in fp32: where its decode steps outgrow the narrow rows and the GGUF's 4-bit ones, the
    weights are packed for oneDNN at start where measured faster here (or it says why not), in /health and the
    start-up line alike; where every decode step runs on the 4-bit weights, nothing is packed."""
    batching = httpx.get(f"{server.url}/health").json()["batching"]
    dense_from = max(batching["narrow_rows"], batching["int4_rows"], 1)
    if dense_from >= 16:
        assert "packed_weights" not in batching and "oneDNN" not in server.log.read_text()
        return
    note = batching["packed_weights"]
    packed = note.startswith(f"products of {dense_from + 1}+ rows on weights packed for oneDNN (+")
    assert packed or note.startswith("packed weights off: "), note
    assert f", {note}" in server.log.read_text()
    assert not (packed and batching["batch_invariant"])


def test_chat_and_greedy_determinism(server) -> None:
    client = server.client()
    first = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "What is 2+2?"}],
                                           temperature=0, max_tokens=16)
    second = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "What is 2+2?"}],
                                            temperature=0, max_tokens=16)
    assert first.choices[0].message.content == second.choices[0].message.content
    assert first.choices[0].message.role == "assistant"
    assert first.usage.completion_tokens <= 16 and first.usage.prompt_tokens > 0
    assert first.object == "chat.completion" and first.id.startswith("chatcmpl-")


def test_stream_with_usage_matches_non_stream(server) -> None:
    client = server.client()
    # messages no other test sends: the first request finds none of its prompt in the shared server's prefix cache
    messages = [{"role": "user", "content": "Write a short poem about the usage of a stream."}]
    plain = client.chat.completions.create(model=MODEL, messages=messages, seed=7, max_tokens=24)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, seed=7, max_tokens=24, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text == plain.choices[0].message.content
    assert finish == [plain.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    streamed, answered = chunks[-1].usage.model_dump(), plain.usage.model_dump()
    # the same messages again: the prefix cache has all but the last prompt token (it is computed for its logits);
    # where one token alone takes other products than its chunk (fp32 here: narrow ones, F.linear for one row
    # beside packed weights), none of that last chunk (this prompt is one), so that it rounds as without the cache
    batching = httpx.get(f"{server.url}/health").json()["batching"]
    alone_otherwise = batching["narrow_rows"] or batching["int4_rows"] or \
        batching.get("packed_weights", "").startswith("products")
    cached = 0 if alone_otherwise else answered["prompt_tokens"] - 1
    assert streamed.pop("prompt_tokens_details")["cached_tokens"] == cached
    assert answered.pop("prompt_tokens_details")["cached_tokens"] < answered["prompt_tokens"] - 1
    assert streamed == answered
    assert all(c.usage is None for c in chunks[:-1])


def test_n_choices_seed_and_stop(server) -> None:
    client = server.client()
    reply = client.chat.completions.create(model=MODEL, messages=HELLO, n=3, seed=1, max_tokens=12)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert len({c.message.content for c in reply.choices}) > 1  # each choice samples with its own seed
    again = client.chat.completions.create(model=MODEL, messages=HELLO, n=3, seed=1, max_tokens=12)
    assert [c.message.content for c in again.choices] == [c.message.content for c in reply.choices]
    full = client.chat.completions.create(model=MODEL, messages=HELLO, temperature=0, max_tokens=30)
    words = full.choices[0].message.content.split()
    cut = client.chat.completions.create(model=MODEL, messages=HELLO, temperature=0, max_tokens=30, stop=[words[2]])
    assert cut.choices[0].finish_reason == "stop" and words[2] not in cut.choices[0].message.content


def test_logprobs_shape(server) -> None:
    reply = server.client().chat.completions.create(model=MODEL, messages=HELLO, max_tokens=5, logprobs=True,
                                                    top_logprobs=3, temperature=0)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    for item in content:
        assert item.logprob <= 0 and len(item.top_logprobs) == 3
        assert item.top_logprobs[0].logprob >= item.logprob - 1e-6


def test_completions(server) -> None:
    client = server.client()
    reply = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4, temperature=0,
                                      echo=True, logprobs=2)
    choice = reply.choices[0]
    assert choice.text.startswith("The capital of France is")
    usage = reply.usage  # echoed with logprobs: the prompt's tokens come first, scored
    assert len(choice.logprobs.tokens) == usage.total_tokens == len(choice.logprobs.top_logprobs)
    many = client.completions.create(model=MODEL, prompt=["One", "Two"], max_tokens=3, temperature=0)
    assert [c.index for c in many.choices] == [0, 1]
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=4, temperature=0, stream=True) if c.choices)
    assert streamed == choice.text.removeprefix("The capital of France is")


def test_echo_with_logprobs_scores_the_prompt_as_openai_does(server) -> None:
    """How lm-evaluation-harness scores a continuation against an OpenAI-style server: token ids in, max_tokens 1,
    logprobs 1, echo; each prompt token comes back with its log-probability given those before it (the first with
    none), the same again when the prefix cache holds the prompt, and in a stream's last chunk."""
    client = server.client()
    ids = httpx.post(f"{server.url}/tokenize", json={"prompt": "The capital of France is Paris"}).json()["tokens"]
    asked = {"model": MODEL, "prompt": [ids], "max_tokens": 1, "temperature": 0, "logprobs": 1, "echo": True}
    first, again = (client.completions.create(**asked).choices[0] for _ in range(2))
    logprobs = first.logprobs
    assert len(logprobs.tokens) == len(ids) + 1 == len(logprobs.token_logprobs) == len(logprobs.top_logprobs)
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    assert all(lp <= 0 for lp in logprobs.token_logprobs[1:])
    assert all(len(top) == 1 for top in logprobs.top_logprobs[1:])
    # the greedy choice at each position is the top one: the prompt's own token is scored at most that high
    pairs = zip(logprobs.token_logprobs[1:], logprobs.top_logprobs[1:], strict=True)
    assert all(lp <= max(top.values()) + 1e-6 for lp, top in pairs)
    assert "".join(logprobs.tokens) == first.text and logprobs.text_offset[0] == 0
    assert logprobs.text_offset[len(ids)] == len(first.text) - len(logprobs.tokens[-1])
    assert again.logprobs.token_logprobs == logprobs.token_logprobs
    streamed = list(client.completions.create(**asked, stream=True))
    assert streamed[0].choices[0].text.startswith("The capital of France is Paris")
    assert streamed[-1].choices[0].logprobs.token_logprobs == logprobs.token_logprobs
    no_echo = client.completions.create(**{**asked, "echo": False}).choices[0].logprobs
    assert no_echo.token_logprobs == logprobs.token_logprobs[-1:] and no_echo.text_offset == [0]
    # several choices: the prompt is scored once (by the first) and each choice comes back with those scores
    sampled = {**asked, "n": 3, "temperature": 1.0, "seed": 5, "max_tokens": 3}
    prompt_scores = logprobs.token_logprobs[:len(ids)]
    assert [c.logprobs.token_logprobs[:len(ids)] for c in client.completions.create(**sampled).choices] == \
        [prompt_scores] * 3
    last_chunks = {c.choices[0].index: c.choices[0] for c in client.completions.create(**sampled, stream=True)
                   if c.choices and c.choices[0].finish_reason}
    assert [last_chunks[i].logprobs.token_logprobs[:len(ids)] for i in range(3)] == [prompt_scores] * 3
    # offsets index the returned text where tokens hold parts of characters ("\ufffd" decoded alone) and where a
    # prompt spells out special tokens, in the prompt and in the completion alike
    for prompt in ("Café 日本語 😀 x", "<|im_start|>user\nHi<|im_end|>\n"):
        reply = client.completions.create(**{**asked, "prompt": prompt, "max_tokens": 6})
        choice = reply.choices[0]
        offsets, tokens = choice.logprobs.text_offset, choice.logprobs.tokens
        assert offsets == sorted(offsets) and offsets[-1] <= len(choice.text)
        for index, (token, offset) in enumerate(zip(tokens, offsets, strict=True)):
            if "\ufffd" in token or (index >= reply.usage.prompt_tokens and token.startswith("<|")):
                continue  # (a completion's special tokens are not in its text)
            assert choice.text.startswith(token, offset), (index, token, offset)


QUESTIONS_SCORED = 5  # of the task's 12 (each is 4 scored prompts, through the server and again in this process)


def test_lm_evaluation_harness_scores_through_the_server_as_in_process(server, engine, tmp_path) -> None:
    """lm-evaluation-harness's `local-completions` model pointed at the server (tokenizing through its
    /tokenizer_info, /tokenize and /detokenize, scoring by echo with logprobs) gives the multiple-choice task's
    log-likelihoods that the harness gives over the model in this process."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from ownllm.evaluate.harness import _harness_lm, _localise

    names = _localise([EXAMPLES / "eval" / "capitals_mc.yaml"], tmp_path)
    served = lm_eval.simple_evaluate(
        model="local-completions", tasks=names, task_manager=TaskManager(include_path=str(tmp_path)),
        log_samples=True, limit=QUESTIONS_SCORED,
        model_args={"base_url": f"{server.url}/v1/completions", "model": MODEL, "max_retries": 1})
    samples = served["samples"][names[0]]
    likelihoods = [response[0][0] for sample in samples for response in sample["resps"]]
    # the same continuations scored by the in-process harness model (its loglikelihood, without lm_eval's run)
    local = [score for score, _ in _harness_lm(engine).loglikelihood(
        [SimpleNamespace(args=tuple(arguments)) for sample in samples for arguments in sample["arguments"]])]
    assert len(likelihoods) == 4 * QUESTIONS_SCORED and np.allclose(likelihoods, local, atol=1e-3)
    choices = [int(np.argmax(local[index : index + 4])) == sample["target"]
               for index, sample in zip(range(0, len(local), 4), samples, strict=True)]
    assert served["results"][names[0]]["acc,none"] == pytest.approx(sum(choices) / len(choices))
    info = httpx.get(f"{server.url}/tokenizer_info").json()
    assert info["eos_token"] and info["model_max_length"] == 2048
    ids = httpx.post(f"{server.url}/tokenize", json={"prompt": "Hello world"}).json()["tokens"]
    assert httpx.post(f"{server.url}/detokenize", json={"tokens": ids}).json() == {"prompt": "Hello world"}
    _error(httpx.post(f"{server.url}/detokenize", json={"tokens": [10**9]}), 400, param="tokens")
    _error(httpx.post(f"{server.url}/detokenize", json={"model": "nope", "tokens": ids}), 404, "model_not_found")


def test_best_of_returns_the_likeliest_of_its_completions(server) -> None:
    """OpenAI's best_of: best_of completions made, the n with the highest log-probability per token returned, and
    every one of them counted in usage."""
    client = server.client()
    asked = {"model": MODEL, "prompt": "My favourite animal is", "max_tokens": 6, "seed": 11, "temperature": 1.2}
    every = client.completions.create(**asked, n=3, logprobs=0)
    per_token = {c.text: sum(c.logprobs.token_logprobs) / len(c.logprobs.token_logprobs) for c in every.choices}
    assert len(per_token) > 1  # the three differ, so there is a best
    best = client.completions.create(**asked, n=1, best_of=3)
    assert [c.index for c in best.choices] == [0]
    assert best.choices[0].text == max(per_token, key=per_token.get)
    assert best.usage.completion_tokens == every.usage.completion_tokens
    two = client.completions.create(**asked, n=2, best_of=3)
    assert [c.text for c in two.choices] == sorted(per_token, key=per_token.get, reverse=True)[:2]
    url = f"{server.url}/v1/completions"
    _error(httpx.post(url, json={**asked, "n": 2, "best_of": 1}), 400, param="best_of")
    _error(httpx.post(url, json={**asked, "best_of": 2, "stream": True}), 400, param="best_of")
    _error(httpx.post(url, json={**asked, "best_of": 17}), 400, param="best_of")
    too_many = _error(httpx.post(url, json={**asked, "prompt": ["a"] * 8, "best_of": 16}), 400, param="best_of")
    assert "prompts x best_of" in too_many["message"]
    # an empty completion (the end token first) counts that token: it is not 0 per token, above every other
    # (regression: with the end token made likely, best_of returned "" over ',' at -0.08 per token)
    likely_end = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 8, "seed": 5, "logit_bias": {"2": 19}}
    every = client.completions.create(**likely_end, n=8)
    best = client.completions.create(**likely_end, n=1, best_of=8)
    assert "" in [c.text for c in every.choices] and best.choices[0].text != ""


def test_embeddings(server) -> None:
    client = server.client()
    floats = client.embeddings.create(model="all-MiniLM-L6-v2", input=["a sentence", "a sentence", "other"])
    a, b, c = (np.array(d.embedding) for d in floats.data)
    assert float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) == pytest.approx(1.0, abs=1e-5)
    assert len(a) == 384 and float(a @ c) < 0.99
    raw = httpx.post(f"{server.url}/v1/embeddings", json={"input": "a sentence", "encoding_format": "base64"}).json()
    decoded = struct.unpack(f"<{384}f", base64.b64decode(raw["data"][0]["embedding"]))
    assert np.allclose(decoded, a, atol=1e-6)
    assert raw["usage"]["prompt_tokens"] > 0


def test_adapter_and_base_differ(server) -> None:
    client = server.client()
    base = client.chat.completions.create(model=MODEL, messages=HELLO, temperature=0, max_tokens=12)
    tuned = client.chat.completions.create(model="tuned", messages=HELLO, temperature=0, max_tokens=12)
    assert base.choices[0].message.content != tuned.choices[0].message.content
    assert tuned.model == "tuned"


def _error(response: httpx.Response, status: int, code: str | None = None, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code:
        assert error["code"] == code
    if param:
        assert error["param"] == param
    return error


def test_error_envelopes(server) -> None:
    url = f"{server.url}/v1/chat/completions"
    for body in (b"{not json", b'{"model": "\xff"}', b"[" * 5000 + b"]" * 5000, b'{"n": ' + b"9" * 5000 + b"}"):
        _error(httpx.post(url, content=body, headers={"content-type": "application/json"}), 400, "invalid_json")
    _error(httpx.post(url, json={"model": "nope", "messages": HELLO}), 404, "model_not_found", "model")
    _error(httpx.post(url, json={"model": MODEL}), 400, param="messages")
    _error(httpx.post(url, json={"model": MODEL, "messages": HELLO, "temperature": -3}), 400, param="temperature")
    _error(httpx.post(url, json={"model": MODEL, "messages": HELLO, "top_p": 0}), 400, param="top_p")
    _error(httpx.post(url, json={"model": MODEL, "messages": HELLO, "min_p": 1.5}), 400, param="min_p")
    _error(httpx.post(url, json={"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}), 400)
    long_prompt = [{"role": "user", "content": "word " * 3000}]
    _error(httpx.post(url, json={"model": MODEL, "messages": long_prompt, "max_tokens": 100}), 400,
           "context_length_exceeded")
    with pytest.raises(openai.NotFoundError):
        server.client().chat.completions.create(model="nope", messages=HELLO)


def test_sixteen_concurrent_streams_complete(server) -> None:
    client = server.client()

    def run(i: int) -> tuple[str | None, int]:
        pieces, finish = [], None
        for chunk in client.chat.completions.create(model=MODEL, messages=HELLO, seed=i, max_tokens=24, stream=True):
            if chunk.choices:
                pieces.append(chunk.choices[0].delta.content or "")
                finish = chunk.choices[0].finish_reason or finish
        return finish, len("".join(pieces))

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(run, range(16)))
    assert all(finish in ("stop", "length") and length > 0 for finish, length in results)


def test_disconnect_frees_the_slot(server) -> None:
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 1500, "stream": True, "temperature": 1,
            "stop": ["never-appears-xyz"], "ignore_eos": True}
    seen: list[list[str]] = []
    # Up to three tries to catch the request running: in about one full-suite run in three, on a loaded box, the
    # first try's request was no longer running three chunks in (not yet explained; the lines are kept to say how).
    for _ in range(3):
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as response:
            stream = response.iter_lines()
            lines = [line for _, line in zip(range(5), stream, strict=False)]
            deadline = time.monotonic() + 5
            while httpx.get(f"{server.url}/health").json()["running"] != 1 and time.monotonic() < deadline:
                time.sleep(0.05)
            running = httpx.get(f"{server.url}/health").json()["running"]
            if running != 1:
                seen.append([*lines, *(line for _, line in zip(range(6), stream, strict=False))])
                continue
        break  # left the stream while its request was running: the slot must come free
    else:
        raise AssertionError(f"the request was never seen running; its streams: {seen}")
    deadline = time.monotonic() + 10
    while httpx.get(f"{server.url}/health").json()["running"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert httpx.get(f"{server.url}/health").json()["running"] == 0


def test_metrics_move(server) -> None:
    def value(name: str) -> float:
        text = httpx.get(f"{server.url}/metrics").text
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))

    before = value("ownllm_generation_tokens_total")
    requests_before = value('ownllm_requests_total{endpoint="/v1/chat/completions",status="200"}')
    firsts, gaps = value("ownllm_time_to_first_token_seconds_count"), value("ownllm_inter_token_latency_seconds_count")
    server.client().chat.completions.create(model=MODEL, messages=HELLO, max_tokens=3, temperature=0,
                                            extra_body={"ignore_eos": True})
    assert value("ownllm_generation_tokens_total") >= before + 1
    assert value('ownllm_requests_total{endpoint="/v1/chat/completions",status="200"}') == requests_before + 1
    # a reply that is not streamed is timed all the same (in the engine's thread: its pieces never reach the loop)
    assert value("ownllm_time_to_first_token_seconds_count") == firsts + 1
    assert value("ownllm_inter_token_latency_seconds_count") >= gaps + 1
    stream = server.client().chat.completions.create(model=MODEL, messages=HELLO, max_tokens=3, temperature=0,
                                                     stream=True)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert value("ownllm_time_to_first_token_seconds_count") == firsts + 2
    text = httpx.get(f"{server.url}/metrics").text
    assert "ownllm_queue_depth" in text and "ownllm_running_sequences" in text


def test_the_second_turn_starts_from_the_first_and_says_so(server) -> None:
    """A conversation's next turn resends the history: the prefix cache has it (prompt and answer), the usage says
    how much, and /metrics counts it."""
    def value(name: str) -> float:
        text = httpx.get(f"{server.url}/metrics").text
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))

    client = server.client()
    hits_before = value("ownllm_prefix_cache_hit_tokens_total")
    history = [{"role": "system", "content": "You are a ship's cook. Answer briefly."},
               {"role": "user", "content": "What do sailors eat on a long voyage?"}]
    first = client.chat.completions.create(model=MODEL, messages=history, max_tokens=20, temperature=0)
    history += [{"role": "assistant", "content": first.choices[0].message.content},
                {"role": "user", "content": "And to drink?"}]
    second = client.chat.completions.create(model=MODEL, messages=history, max_tokens=5, temperature=0)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert first.usage.prompt_tokens <= cached < second.usage.prompt_tokens
    assert value("ownllm_prefix_cache_hit_tokens_total") >= hits_before + cached
    assert value("ownllm_prefix_cache_queried_tokens_total") >= second.usage.prompt_tokens
    assert 0 < value("ownllm_kv_cache_usage_ratio") <= 1
    assert value("ownllm_kv_cache_capacity_tokens") >= 2048


def test_tokenize_and_tgi_generate(server) -> None:
    tokens = httpx.post(f"{server.url}/tokenize", json={"prompt": "Hello world"}).json()
    assert tokens["count"] == len(tokens["tokens"]) >= 2 and tokens["max_model_len"] == 2048
    result = httpx.post(f"{server.url}/generate", json={"inputs": "The capital of France is",
                                                        "parameters": {"max_new_tokens": 4, "details": True}}).json()
    assert result["generated_text"] and result["details"]["generated_tokens"] <= 4
    with httpx.stream("POST", f"{server.url}/generate_stream",
                      json={"inputs": "Hello", "parameters": {"max_new_tokens": 3}}) as response:
        events = [json.loads(line[5:]) for line in response.iter_lines() if line.startswith("data:")]
    assert events[-1]["generated_text"] is not None


def test_auth(strict_server) -> None:
    url = f"{strict_server.url}/v1/models"
    _error(httpx.get(url), 401, "invalid_api_key")
    _error(httpx.get(url, headers={"Authorization": "Bearer wrong"}), 401, "invalid_api_key")
    assert httpx.get(url, headers={"Authorization": "Bearer sk-test-2"}).status_code == 200
    assert httpx.get(f"{strict_server.url}/health").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        strict_server.client("bad").chat.completions.create(model=MODEL, messages=HELLO)


def test_body_limit_and_queue_full(strict_server) -> None:
    headers = {"Authorization": "Bearer sk-test-1"}
    url = f"{strict_server.url}/v1/chat/completions"
    _error(httpx.post(url, json={"model": MODEL, "messages": [{"role": "user", "content": "x" * 5000}]},
                      headers=headers), 413)
    # 80 tokens (over a second on any CPU) outlast the 0.2 s in which the five requests are sent
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 80, "stop": ["never-appears-xyz"], "ignore_eos": True}
    responses: list[httpx.Response] = []

    def post() -> None:
        responses.append(httpx.post(url, json=body, headers=headers, timeout=120))

    threads = [threading.Thread(target=post) for _ in range(5)]
    for thread in threads:
        thread.start()
        time.sleep(0.05)
    for thread in threads:
        thread.join()
    statuses = sorted(r.status_code for r in responses)
    assert 200 in statuses and 429 in statuses  # one runs, one waits, the rest are turned away
    busy = next(r for r in responses if r.status_code == 429)
    assert busy.headers["Retry-After"] == "1" and busy.json()["error"]["code"] == "queue_full"


def test_chat_with_rag_sources(server) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Who founded Lumen Bikes?"}], "temperature": 0,
            "max_tokens": 32, "rag": {"k": 2}}
    reply = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60).json()
    assert [s["index"] for s in reply["sources"]] == [1, 2]
    assert reply["sources"][0]["source"].endswith("company.html")
    assert reply["choices"][0]["message"]["content"]
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json={**body, "stream": True}) as response:
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and any('"sources"' in e for e in events)


def test_graceful_shutdown_finishes_streams(default_model: str) -> None:
    import signal

    from tests.serve.conftest import Server

    own = Server(default_model, "--dtype", "fp32")
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 40, "temperature": 0, "stream": True,
            "ignore_eos": True}
    lines = []
    with httpx.stream("POST", f"{own.url}/v1/chat/completions", json=body, timeout=60) as response:
        for line in response.iter_lines():
            if not line:
                continue
            lines.append(line)
            if len(lines) == 3:
                own.process.send_signal(signal.SIGTERM)
    assert lines[-1] == "data: [DONE]"
    assert any('"finish_reason": "length"' in line for line in lines)
    assert own.process.wait(timeout=60) in (0, -15)  # uvicorn re-raises SIGTERM once it has shut down cleanly
