"""Load-test any OpenAI-compatible server, like `vllm bench serve` (what `ownllm bench serve` and bench/serve.py run).

For each concurrency level, `requests` streaming chat requests run with at most `concurrency` in flight;
per request we time the first token (TTFT), the gaps between streamed pieces (ITL), time per output token
after the first (TPOT) and end to end; the level reports output tok/s and requests/s over its wall time.

Workloads: `random` (independent prompts asking for long answers, or a prompts file), `chat` (conversations of six
turns, each turn resending the history with the server's previous answer, ~1,500 tokens by the last: TTFT is
reported per turn) and `rag` (a ~1,000-token system prompt every request shares, four retrieved passages drawn from
twenty, a question) — the traffic a prefix cache is for.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ownllm.errors import OwnLLMError

WORDS = ("the river city market light winter garden story engine music harbour school forest bridge travel "
         "history science letter mountain kitchen ocean village planet window machine").split()


WORKLOADS = ("random", "chat", "rag")
CHAT_TURNS = 6


@dataclass
class RequestResult:
    ok: bool
    ttft: float = 0.0
    e2e: float = 0.0
    tokens: int = 0
    cached_tokens: int = 0  # usage.prompt_tokens_details.cached_tokens, where the server reports it
    prompt_tokens: int = 0
    itl: list[float] = field(default_factory=list)
    error: str = ""
    text: str = ""
    turn: int = 0


@dataclass
class LevelResult:
    concurrency: int
    requests: int
    errors: int
    seconds: float
    output_tokens: int
    ttft: list[float]
    tpot: list[float]
    itl: list[float]
    e2e: list[float]
    first_error: str = ""
    ttft_by_turn: dict[int, list[float]] = field(default_factory=dict)  # chat: turn (1-based) -> TTFTs
    prompt_tokens: int = 0
    cached_tokens: int = 0

    @property
    def tokens_per_second(self) -> float:
        return self.output_tokens / self.seconds if self.seconds else 0.0

    @property
    def requests_per_second(self) -> float:
        return (self.requests - self.errors) / self.seconds if self.seconds else 0.0

    def percentile(self, name: str, q: float) -> float:
        return _quantile(sorted(getattr(self, name)), q)

    def as_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"concurrency": self.concurrency, "requests": self.requests, "errors": self.errors,
                                "seconds": round(self.seconds, 3), "output_tokens": self.output_tokens,
                                "output_tokens_per_s": round(self.tokens_per_second, 2),
                                "requests_per_s": round(self.requests_per_second, 3)}
        for name in ("ttft", "tpot", "itl", "e2e"):
            for q in (50, 95, 99):
                data[f"{name}_p{q}_ms"] = round(self.percentile(name, q) * 1000, 1)
        data["prompt_tokens"], data["cached_tokens"] = self.prompt_tokens, self.cached_tokens
        for turn, values in sorted(self.ttft_by_turn.items()):
            ordered = sorted(values)
            data[f"turn{turn}_ttft_p50_ms"] = round(_quantile(ordered, 50) * 1000, 1)
            data[f"turn{turn}_ttft_p95_ms"] = round(_quantile(ordered, 95) * 1000, 1)
        if self.first_error:
            data["first_error"] = self.first_error
        return data

    def later_turns_ttft(self, q: float) -> float:
        """Chat: the TTFT percentile over turns 2 and later (the ones a prefix cache serves)."""
        values = sorted(v for turn, vs in self.ttft_by_turn.items() if turn >= 2 for v in vs)
        return _quantile(values, q) if values else float("nan")


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def _words(rng: random.Random, count: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(count))


def rag_prompts(count: int, seed: int = 0) -> list[list[dict[str, str]]]:
    """Requests of the `rag` workload: one shared system prompt of ~1,000 tokens, four of twenty passages, a
    question."""
    shared = random.Random(1234)  # the same system prompt and passages at every level and for every server
    system = ("You answer questions about the documents below. Cite passages by number. Rules: "
              + _words(shared, 900))
    passages = [f"Passage {i + 1}: " + _words(shared, 90) for i in range(20)]
    rng = random.Random(seed)
    prompts = []
    for _ in range(count):
        chosen = rng.sample(passages, 4)
        prompts.append([{"role": "system", "content": system},
                        {"role": "user", "content": "\n\n".join(chosen) + "\n\nQuestion: what do these passages "
                         f"say about the {rng.choice(WORDS)} and the {rng.choice(WORDS)}? Answer at length."}])
    return prompts


def chat_turns(count: int, seed: int = 0) -> list[list[str]]:
    """User messages of the `chat` workload: `count` conversations of CHAT_TURNS turns (~100 tokens each)."""
    rng = random.Random(seed)
    return [[f"Turn {turn + 1}. Tell me more, in detail, about " + _words(rng, 80) + "."
             for turn in range(CHAT_TURNS)] for _ in range(count)]


def load_prompts(source: str, count: int, seed: int = 0) -> list[list[dict[str, str]]]:
    """`random`: synthetic requests for long answers; or a file: .jsonl (`prompt` or `messages`) or text lines."""
    if source == "random":
        rng = random.Random(seed)
        return [[{"role": "user", "content": "Write a long, detailed story about "
                  + " ".join(rng.choice(WORDS) for _ in range(12)) + "."}] for _ in range(count)]
    path = Path(source)
    if not path.is_file():
        raise OwnLLMError(f"no such prompts file: {source}", kind="not_found", param="prompts")
    conversations = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            row = json.loads(line)
            conversations.append(row.get("messages") or [{"role": "user", "content": row["prompt"]}])
        else:
            conversations.append([{"role": "user", "content": line}])
    if not conversations:
        raise OwnLLMError(f"{source} holds no prompts", param="prompts")
    return [conversations[i % len(conversations)] for i in range(count)]


async def _one(client: Any, url: str, model: str, messages: list[dict[str, str]], max_tokens: int,
               headers: dict[str, str]) -> RequestResult:
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "stream": True, "temperature": 0.8,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    result = RequestResult(ok=False)
    last = None
    pieces = 0
    try:
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data:") or line.strip() == "data: [DONE]":
                    continue
                chunk = json.loads(line[5:])
                if "error" in chunk:
                    result.error = str(chunk["error"])[:200]
                    return result
                if chunk.get("usage"):
                    usage = chunk["usage"]
                    result.tokens = usage.get("completion_tokens", 0)
                    result.prompt_tokens = usage.get("prompt_tokens", 0)
                    result.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
                for choice in chunk.get("choices") or []:
                    if (choice.get("delta") or {}).get("content"):
                        result.text += choice["delta"]["content"]
                        now = time.perf_counter()
                        if last is None:
                            result.ttft = now - start
                        else:
                            result.itl.append(now - last)
                        last = now
                        pieces += 1
    except Exception as exc:  # a benchmark reports failures, it does not stop on them
        result.error = f"{exc.__class__.__name__}: {exc}"[:200]
        return result
    result.e2e = time.perf_counter() - start
    result.tokens = result.tokens or pieces
    result.ok = last is not None
    if not result.ok:
        result.error = "no tokens streamed"
    return result


async def _level(url: str, model: str, prompts: list[list[dict[str, str]]], concurrency: int, max_tokens: int,
                 headers: dict[str, str]) -> LevelResult:
    import httpx

    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        async def guarded(messages: list[dict[str, str]]) -> RequestResult:
            async with gate:
                return await _one(client, url, model, messages, max_tokens, headers)

        start = time.perf_counter()
        results = await asyncio.gather(*(guarded(p) for p in prompts))
        seconds = time.perf_counter() - start
    return _summary(concurrency, list(results), seconds)


async def _chat_level(url: str, model: str, conversations: list[list[str]], concurrency: int, max_tokens: int,
                      headers: dict[str, str]) -> LevelResult:
    """Conversations, `concurrency` at a time; each turn sends the whole history with the server's answers."""
    import httpx

    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        async def conversation(turns: list[str]) -> list[RequestResult]:
            messages = [{"role": "system", "content": "You are a helpful assistant."}]
            results = []
            async with gate:
                for turn, text in enumerate(turns, start=1):
                    messages.append({"role": "user", "content": text})
                    result = await _one(client, url, model, messages, max_tokens, headers)
                    result.turn = turn
                    results.append(result)
                    if not result.ok:
                        break
                    messages.append({"role": "assistant", "content": result.text})
            return results

        start = time.perf_counter()
        done = await asyncio.gather(*(conversation(c) for c in conversations))
        seconds = time.perf_counter() - start
    return _summary(concurrency, [r for results in done for r in results], seconds)


def _summary(concurrency: int, results: list[RequestResult], seconds: float) -> LevelResult:
    good = [r for r in results if r.ok]
    by_turn: dict[int, list[float]] = {}
    for result in good:
        if result.turn:
            by_turn.setdefault(result.turn, []).append(result.ttft)
    return LevelResult(
        concurrency=concurrency, requests=len(results), errors=len(results) - len(good), seconds=seconds,
        output_tokens=sum(r.tokens for r in good), ttft=[r.ttft for r in good],
        tpot=[(r.e2e - r.ttft) / (r.tokens - 1) for r in good if r.tokens > 1],
        itl=[gap for r in good for gap in r.itl], e2e=[r.e2e for r in good],
        first_error=next((r.error for r in results if not r.ok), ""), ttft_by_turn=by_turn,
        prompt_tokens=sum(r.prompt_tokens for r in good), cached_tokens=sum(r.cached_tokens for r in good))


def discover_model(url: str, headers: dict[str, str]) -> str:
    import httpx

    try:
        data = httpx.get(f"{url}/v1/models", headers=headers, timeout=10).json()
        return data["data"][0]["id"]
    except (httpx.HTTPError, KeyError, IndexError, ValueError):
        raise OwnLLMError(f"cannot list models at {url}", kind="not_found", param="url",
                          hint="is the server running? pass --model") from None


def run_benchmark(url: str, *, concurrency: list[int], prompts: str = "random", max_tokens: int = 128,
                  requests_per_level: int | None = None, model: str | None = None, api_key: str | None = None,
                  workload: str = "random") -> list[LevelResult]:
    """Load-test `url` at each concurrency level; `requests_per_level` defaults to 2 x concurrency (min 4) — for the
    chat workload it counts conversations (default max(10, concurrency)) of CHAT_TURNS turns each."""
    url = url.rstrip("/").removesuffix("/v1")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    model = model or discover_model(url, headers)
    if not concurrency or min(concurrency) < 1:
        raise OwnLLMError("concurrency levels must be at least 1", param="concurrency")
    if workload not in WORKLOADS:
        raise OwnLLMError(f"workload must be one of {', '.join(WORKLOADS)}, got '{workload}'", param="workload")
    results = []
    for level in concurrency:
        if workload == "chat":
            count = requests_per_level or max(10, level)
            results.append(asyncio.run(_chat_level(url, model, chat_turns(count, seed=level), level, max_tokens,
                                                   headers)))
            continue
        count = requests_per_level or max(4, 2 * level)
        chosen = rag_prompts(count, seed=level) if workload == "rag" else load_prompts(prompts, count, seed=level)
        results.append(asyncio.run(_level(url, model, chosen, level, max_tokens, headers)))
    return results
