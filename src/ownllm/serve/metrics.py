"""Prometheus metrics of one server (its own registry, so several apps can live in one process)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

_LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self, waiting: Callable[[], int], running: Callable[[], int],
                 kv_cache: Callable[[], Any] | None = None) -> None:
        """`kv_cache` gives the scheduler's `KVCache` (None for a server that runs one request at a time)."""
        self.registry = CollectorRegistry()
        self.requests = Counter("ownllm_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=self.registry)
        self.prompt_tokens = Counter("ownllm_prompt_tokens", "prompt tokens processed", registry=self.registry)
        self.generated_tokens = Counter("ownllm_generation_tokens", "tokens generated", registry=self.registry)
        # a reply that is not streamed is timed where the engine emits its pieces, a streamed one where they are sent
        self.ttft = Histogram("ownllm_time_to_first_token_seconds", "request arrival to first token",
                              buckets=_LATENCY, registry=self.registry)
        self.itl = Histogram("ownllm_inter_token_latency_seconds", "time between pieces of text",
                             buckets=_LATENCY, registry=self.registry)
        queue = Gauge("ownllm_queue_depth", "requests waiting for a batch slot", registry=self.registry)
        queue.set_function(waiting)
        running_gauge = Gauge("ownllm_running_sequences", "sequences in the running batch", registry=self.registry)
        running_gauge.set_function(running)
        if kv_cache is not None:
            self.registry.register(_KVCacheCollector(kv_cache))


class _KVCacheCollector:
    """The KV budget and the prefix cache, read from the scheduler's `KVCache` at scrape time (vLLM reports the
    same as prefix_cache_queries / prefix_cache_hits / kv_cache_usage_perc)."""

    def __init__(self, kv_cache: Callable[[], Any]) -> None:
        self.kv_cache = kv_cache

    def collect(self) -> Iterator[Metric]:
        cache = self.kv_cache()
        if cache is None:
            return
        stats = cache.stats
        yield CounterMetricFamily("ownllm_prefix_cache_queried_tokens", "prompt tokens looked up in the prefix cache",
                                  value=stats.queried_tokens)
        yield CounterMetricFamily("ownllm_prefix_cache_hit_tokens", "prompt tokens the prefix cache had (not "
                                  "computed again)", value=stats.hit_tokens)
        yield CounterMetricFamily("ownllm_prefix_cache_evictions", "finished sequences dropped for room",
                                  value=stats.evictions)
        yield CounterMetricFamily("ownllm_kv_preemptions", "running sequences sent back to wait for KV memory",
                                  value=stats.preemptions)
        yield GaugeMetricFamily("ownllm_kv_cache_usage_ratio", "share of the KV budget held (running and cached)",
                                value=cache.usage())
        yield GaugeMetricFamily("ownllm_kv_cache_capacity_tokens", "tokens of KV the budget holds",
                                value=cache.budget)
        yield GaugeMetricFamily("ownllm_prefix_cache_tokens", "tokens held by finished sequences for later prefixes",
                                value=cache.cached_tokens)
