"""Prometheus metrics of the LM worker, fed by the scheduler through its observer hooks.

One registry per service instance (several can live in one test process). The engine
thread updates them; ``prometheus_client`` metrics are thread-safe. Names follow the
Prometheus conventions (``_seconds``, ``_total``); ``lm_worker_generation_tokens_per_second``
is a convenience gauge over the last few seconds for dashboards without PromQL, the
counter is the one to ``rate()``.
"""

from __future__ import annotations

import threading
import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.common.metrics import LATENCY_BUCKETS_S, new_registry

__all__ = ["LMWorkerMetrics"]

BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
STAGES = ("queue", "prefill", "decode", "ttft", "total")


class LMWorkerMetrics:
    """Gauges, counters and histograms of one worker; implements ``SchedulerObserver``."""

    def __init__(self, registry: CollectorRegistry | None = None, *, rate_window_s: float = 10.0) -> None:
        self.registry = registry or new_registry()
        r = self.registry
        self.running = Gauge("lm_worker_running_sequences", "Sequences in the running batch", registry=r)
        self.waiting = Gauge("lm_worker_waiting_sequences", "Requests waiting for a slot", registry=r)
        self.free_slots = Gauge("lm_worker_kv_cache_free_slots", "KV-cache slots free", registry=r)
        self.batch_size = Histogram("lm_worker_decode_batch_size", "Sequences per decode step",
                                    buckets=BATCH_SIZE_BUCKETS, registry=r)
        self.step_seconds = Histogram("lm_worker_step_seconds", "Model call duration by phase",
                                      ["phase"], buckets=LATENCY_BUCKETS_S, registry=r)
        self.prefill_tokens = Counter("lm_worker_prefill_tokens", "Prompt tokens prefilled", registry=r)
        self.prefix_cache_queries = Counter("lm_worker_prefix_cache_queried_tokens",
                                            "Prompt tokens looked up in the prefix cache", registry=r)
        self.prefix_cache_hits = Counter("lm_worker_prefix_cache_hit_tokens",
                                         "Prompt tokens copied from the prefix cache instead of prefilled",
                                         registry=r)
        self.generated_tokens = Counter("lm_worker_generated_tokens", "Tokens generated", registry=r)
        self.stage_seconds = Histogram("lm_worker_request_stage_seconds", "Per-request latency by stage",
                                       ["stage"], buckets=LATENCY_BUCKETS_S, registry=r)
        self.requests = Counter("lm_worker_requests", "Finished requests by finish reason",
                                ["finish_reason"], registry=r)
        self.errors = Counter("lm_worker_errors", "Errors by kind", ["kind"], registry=r)
        self.feature_refs = Counter("lm_worker_feature_refs", "Image features named by the caller: hit (sent "
                                    "by name, found), miss (sent by name, no longer kept: 400), kept (received "
                                    "with a name and kept)", ["result"], registry=r)
        self.calls = Counter("lm_worker_channel_calls", "Calls on the call channel by method (generate, "
                             "generate:stream) and status code", ["method", "code"], registry=r)
        self.tokens_per_second = Gauge("lm_worker_generation_tokens_per_second",
                                       "Tokens generated per second over the last few seconds",
                                       registry=r)
        self.tokens_per_second.set_function(self._recent_rate)
        self._window_s = rate_window_s
        self._recent: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()

    # ---- SchedulerObserver -----------------------------------------------------------
    def on_queue(self, running: int, waiting: int, free_slots: int) -> None:
        self.running.set(running)
        self.waiting.set(waiting)
        self.free_slots.set(free_slots)

    def on_prefill(self, sequences: int, tokens: int, seconds: float) -> None:
        self.step_seconds.labels("prefill").observe(seconds)
        self.prefill_tokens.inc(tokens)

    def on_prefix_cache(self, query_tokens: int, hit_tokens: int) -> None:
        self.prefix_cache_queries.inc(query_tokens)
        self.prefix_cache_hits.inc(hit_tokens)

    def on_decode(self, batch_size: int, seconds: float) -> None:
        self.batch_size.observe(batch_size)
        self.step_seconds.labels("decode").observe(seconds)

    def on_tokens(self, count: int) -> None:
        self.generated_tokens.inc(count)
        now = time.monotonic()
        with self._lock:
            self._recent.append((now, count))
            self._trim(now)

    def on_finish(self, finish_reason: str, timings: dict[str, float], prompt_tokens: int,
                  completion_tokens: int) -> None:
        self.requests.labels(finish_reason).inc()
        for stage in STAGES:
            ms = timings.get(f"{stage}_ms")
            if ms is not None:
                self.stage_seconds.labels(stage).observe(ms / 1e3)

    # ---- the HTTP layer --------------------------------------------------------------
    def on_error(self, kind: str) -> None:
        """Count one failed request (called where the error is answered, so once each)."""
        self.errors.labels(kind).inc()

    def on_call(self, method: str, status: int, seconds: float) -> None:
        """Count one finished call on the call channel (``RpcServer``'s ``on_call``)."""
        self.calls.labels(method=method, code=str(status)).inc()

    # ---- tokens per second -----------------------------------------------------------
    def _trim(self, now: float) -> None:
        while self._recent and self._recent[0][0] < now - self._window_s:
            self._recent.popleft()

    def _recent_rate(self) -> float:
        now = time.monotonic()
        with self._lock:
            self._trim(now)
            total = sum(count for _, count in self._recent)
        return total / self._window_s
