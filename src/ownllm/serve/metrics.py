"""Prometheus metrics of one server (its own registry, so several apps can live in one process)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self, waiting: Callable[[], int], running: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("ownllm_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=self.registry)
        self.prompt_tokens = Counter("ownllm_prompt_tokens", "prompt tokens processed", registry=self.registry)
        self.generated_tokens = Counter("ownllm_generation_tokens", "tokens generated", registry=self.registry)
        self.ttft = Histogram("ownllm_time_to_first_token_seconds", "request arrival to first token",
                              buckets=_LATENCY, registry=self.registry)
        self.itl = Histogram("ownllm_inter_token_latency_seconds", "time between streamed pieces",
                             buckets=_LATENCY, registry=self.registry)
        queue = Gauge("ownllm_queue_depth", "requests waiting for a batch slot", registry=self.registry)
        queue.set_function(waiting)
        running_gauge = Gauge("ownllm_running_sequences", "sequences in the running batch", registry=self.registry)
        running_gauge.set_function(running)
