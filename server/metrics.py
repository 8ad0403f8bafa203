"""Prometheus metrics of one server (one registry per app, so that apps in one process stay apart)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("qwen2vl_requests", "HTTP requests answered, by route and status",
                                ["route", "status"], registry=r)
        self.prompt_tokens = Counter("qwen2vl_prompt_tokens", "prompt tokens of finished completions", registry=r)
        self.completion_tokens = Counter("qwen2vl_completion_tokens", "generated tokens of finished completions",
                                         registry=r)
        self.ttft = Histogram("qwen2vl_time_to_first_token_seconds",
                              "from a request's arrival in the queue to its first generated token",
                              buckets=TTFT_BUCKETS, registry=r)
        self.queue_depth = Gauge("qwen2vl_queue_depth", "requests waiting for a batch", registry=r)
        self.cancelled_batches = Counter("qwen2vl_cancelled_batches",
                                         "batches stopped early because every client had disconnected", registry=r)
        self.cached_prompt_tokens = Counter("qwen2vl_cached_prompt_tokens",
                                            "prompt tokens of finished completions read from a kept session's "
                                            "KV cache instead of being prefilled", registry=r)
        self.follow_ups = Counter("qwen2vl_follow_ups", "requests continuing an earlier reply's conversation, by "
                                  "whether they found its kept session (found) or ran afresh (missed)", ["session"],
                                  registry=r)
        self.kept_sessions = Gauge("qwen2vl_kept_sessions", "chat sessions kept for a follow-up request",
                                   registry=r)
        self.kept_session_bytes = Gauge("qwen2vl_kept_session_bytes", "memory the kept sessions' KV caches hold",
                                        registry=r)
        self.batch_size = Histogram("qwen2vl_batch_size", "requests per batch run",
                                    buckets=(1, 2, 4, 8, 16, 32), registry=r)

    def count_tokens(self, usage: dict) -> None:
        self.prompt_tokens.inc(usage["prompt_tokens"])
        self.completion_tokens.inc(usage["completion_tokens"])
        self.cached_prompt_tokens.inc(usage.get("cached_prompt_tokens", 0))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
