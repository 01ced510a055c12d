"""Prometheus metrics: one registry per app, so several apps can live in one process
(tests, the launcher) without colliding in the global default registry."""

from __future__ import annotations

from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

__all__ = ["LATENCY_BUCKETS_S", "metrics_response", "new_registry"]

# From 1 ms to 2 min: CPU demo latencies sit in the hundreds of ms, GPU ones in ms.
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


def new_registry() -> CollectorRegistry:
    return CollectorRegistry(auto_describe=True)


def metrics_response(registry: CollectorRegistry) -> Response:
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
