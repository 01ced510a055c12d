"""The encoder's observability: Prometheus metrics and Triton's statistics extension.

Both views are fed from the same events (a request finished, a batch ran), so
``/metrics`` and ``GET /v2/models/{name}/stats`` never disagree. Prometheus is what
dashboards scrape; the statistics document is what ``perf_analyzer`` reads to split
server-side latency into queue / compute-input / compute-infer / compute-output.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.common.metrics import LATENCY_BUCKETS_S, new_registry

__all__ = ["STAGES", "EncoderMetrics", "InferenceStatistics", "StageTimings"]

STAGES = ("queue", "preprocess", "forward", "serialize")
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass(frozen=True)
class StageTimings:
    """Milliseconds one request spent in each stage (what responses carry as ``timings``)."""

    queue_ms: float
    preprocess_ms: float
    forward_ms: float
    serialize_ms: float
    total_ms: float

    def as_dict(self) -> dict[str, float]:
        return {name: round(value, 3) for name, value in self.__dict__.items()}


@dataclass
class _Duration:
    count: int = 0
    ns: int = 0

    def add(self, seconds: float, count: int = 1) -> None:
        self.count += count
        self.ns += int(seconds * 1e9)

    def as_dict(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


@dataclass
class _BatchStats:
    compute_infer: _Duration = field(default_factory=_Duration)


class InferenceStatistics:
    """Counters in the shape of Triton's model statistics (``/v2/models/{m}/stats``).

    Requests are counted on the event loop, batches on the worker thread; one lock
    keeps the two consistent when a reader takes a snapshot.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.success = _Duration()
        self.fail = _Duration()
        self.queue = _Duration()
        self.compute_input = _Duration()
        self.compute_infer = _Duration()
        self.compute_output = _Duration()
        self.inference_count = 0  # images
        self.execution_count = 0  # forwards
        self.last_inference_ms = 0
        self.batches: dict[int, _BatchStats] = {}

    def request_succeeded(self, timings: StageTimings, images: int) -> None:
        with self._lock:
            self.success.add(timings.total_ms / 1000.0)
            self.queue.add(timings.queue_ms / 1000.0)
            self.compute_input.add(timings.preprocess_ms / 1000.0)
            self.compute_infer.add(timings.forward_ms / 1000.0)
            self.compute_output.add(timings.serialize_ms / 1000.0)
            self.inference_count += images
            self.last_inference_ms = int(time.time() * 1000)

    def request_failed(self, seconds: float) -> None:
        with self._lock:
            self.fail.add(seconds)

    def batch_ran(self, images: int, forward_s: float) -> None:
        with self._lock:
            self.execution_count += 1
            self.batches.setdefault(images, _BatchStats()).compute_infer.add(forward_s)

    def snapshot(self, name: str, version: str) -> dict[str, Any]:
        """One entry of ``model_stats``, as Triton's HTTP endpoint writes it."""
        empty = _Duration().as_dict()
        with self._lock:
            return {
                "name": name,
                "version": version,
                "last_inference": self.last_inference_ms,
                "inference_count": self.inference_count,
                "execution_count": self.execution_count,
                "inference_stats": {
                    "success": self.success.as_dict(),
                    "fail": self.fail.as_dict(),
                    "queue": self.queue.as_dict(),
                    "compute_input": self.compute_input.as_dict(),
                    "compute_infer": self.compute_infer.as_dict(),
                    "compute_output": self.compute_output.as_dict(),
                    "cache_hit": empty,
                    "cache_miss": empty,
                },
                "response_stats": {},
                "batch_stats": [
                    {"batch_size": size, "compute_input": empty,
                     "compute_infer": stats.compute_infer.as_dict(), "compute_output": empty}
                    for size, stats in sorted(self.batches.items())
                ],
                "memory_usage": [],
            }


class EncoderMetrics:
    """Prometheus series of one encoder app, in a registry of its own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else new_registry()
        self.statistics = InferenceStatistics()
        self.requests = Counter("step37_encoder_requests",
                                "Requests by route (rpc:METHOD for the call channel) and status code",
                                ["route", "code"], registry=self.registry)
        self.errors = Counter("step37_encoder_errors", "Errors answered, by kind", ["kind"],
                              registry=self.registry)
        self.images = Counter("step37_encoder_images", "Images encoded", registry=self.registry)
        self.queue_depth = Gauge("step37_encoder_queue_depth", "Requests waiting for a batch",
                                 registry=self.registry)
        self.batch_size = Histogram("step37_encoder_batch_size", "Images per forward",
                                    buckets=_BATCH_BUCKETS, registry=self.registry)
        self.stage_seconds = Histogram("step37_encoder_stage_seconds", "Per-request time in each stage",
                                       ["stage"], buckets=LATENCY_BUCKETS_S, registry=self.registry)
        self.request_seconds = Histogram("step37_encoder_request_seconds",
                                         "Request latency by route (rpc:METHOD for the call channel)", ["route"],
                                         buckets=LATENCY_BUCKETS_S, registry=self.registry)

    def track_queue_depth(self, depth: Callable[[], float]) -> None:
        self.queue_depth.set_function(depth)

    def error(self, kind: str) -> None:
        self.errors.labels(kind=kind).inc()

    def batch_ran(self, images: int, forward_s: float) -> None:
        self.batch_size.observe(images)
        self.statistics.batch_ran(images, forward_s)

    def request_succeeded(self, timings: StageTimings, images: int) -> None:
        self.images.inc(images)
        for stage in STAGES:
            self.stage_seconds.labels(stage=stage).observe(getattr(timings, f"{stage}_ms") / 1000.0)
        self.statistics.request_succeeded(timings, images)

    def request_failed(self, seconds: float) -> None:
        self.statistics.request_failed(seconds)

    def http_request(self, route: str, code: int, seconds: float) -> None:
        self.requests.labels(route=route, code=str(code)).inc()
        self.request_seconds.labels(route=route).observe(seconds)
