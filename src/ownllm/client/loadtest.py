"""Load-test any OpenAI-compatible server, like `vllm bench serve` (what `ownllm bench serve` and bench/serve.py run).

For each concurrency level, `requests` streaming chat requests run with at most `concurrency` in flight;
per request we time the first token (TTFT), the gaps between streamed pieces (ITL), time per output token
after the first (TPOT) and end to end; the level reports output tok/s and requests/s over its wall time.
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


@dataclass
class RequestResult:
    ok: bool
    ttft: float = 0.0
    e2e: float = 0.0
    tokens: int = 0
    itl: list[float] = field(default_factory=list)
    error: str = ""


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

    @property
    def tokens_per_second(self) -> float:
        return self.output_tokens / self.seconds if self.seconds else 0.0

    @property
    def requests_per_second(self) -> float:
        return (self.requests - self.errors) / self.seconds if self.seconds else 0.0

    def percentile(self, name: str, q: float) -> float:
        values = sorted(getattr(self, name))
        if not values:
            return float("nan")
        if len(values) == 1:
            return values[0]
        return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]

    def as_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"concurrency": self.concurrency, "requests": self.requests, "errors": self.errors,
                                "seconds": round(self.seconds, 3), "output_tokens": self.output_tokens,
                                "output_tokens_per_s": round(self.tokens_per_second, 2),
                                "requests_per_s": round(self.requests_per_second, 3)}
        for name in ("ttft", "tpot", "itl", "e2e"):
            for q in (50, 95, 99):
                data[f"{name}_p{q}_ms"] = round(self.percentile(name, q) * 1000, 1)
        if self.first_error:
            data["first_error"] = self.first_error
        return data


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
                    result.tokens = chunk["usage"].get("completion_tokens", 0)
                for choice in chunk.get("choices") or []:
                    if (choice.get("delta") or {}).get("content"):
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
    good = [r for r in results if r.ok]
    return LevelResult(
        concurrency=concurrency, requests=len(results), errors=len(results) - len(good), seconds=seconds,
        output_tokens=sum(r.tokens for r in good), ttft=[r.ttft for r in good],
        tpot=[(r.e2e - r.ttft) / (r.tokens - 1) for r in good if r.tokens > 1],
        itl=[gap for r in good for gap in r.itl], e2e=[r.e2e for r in good],
        first_error=next((r.error for r in results if not r.ok), ""))


def discover_model(url: str, headers: dict[str, str]) -> str:
    import httpx

    try:
        data = httpx.get(f"{url}/v1/models", headers=headers, timeout=10).json()
        return data["data"][0]["id"]
    except (httpx.HTTPError, KeyError, IndexError, ValueError):
        raise OwnLLMError(f"cannot list models at {url}", kind="not_found", param="url",
                          hint="is the server running? pass --model") from None


def run_benchmark(url: str, *, concurrency: list[int], prompts: str = "random", max_tokens: int = 128,
                  requests_per_level: int | None = None, model: str | None = None, api_key: str | None = None
                  ) -> list[LevelResult]:
    """Load-test `url` at each concurrency level; `requests_per_level` defaults to 2 x concurrency (min 4)."""
    url = url.rstrip("/").removesuffix("/v1")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    model = model or discover_model(url, headers)
    if not concurrency or min(concurrency) < 1:
        raise OwnLLMError("concurrency levels must be at least 1", param="concurrency")
    results = []
    for level in concurrency:
        count = requests_per_level or max(4, 2 * level)
        results.append(asyncio.run(_level(url, model, load_prompts(prompts, count, seed=level), level, max_tokens,
                                          headers)))
    return results
