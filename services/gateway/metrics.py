"""The gateway's Prometheus metrics, all under ``step37_gateway_``.

Request counts by route and status, request and per-stage latency histograms,
tokens and images served, downstream errors by service and code, requests in
flight. Cache and endpoint state are read from the objects that own it at scrape
time (a custom collector), so the cache and pools stay free of Prometheus and there
is no second copy of their counters to drift.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from services.common.metrics import LATENCY_BUCKETS_S, new_registry
from services.gateway.cache import FeatureCache
from services.gateway.errors import GatewayError
from services.gateway.pool import EndpointPool

__all__ = ["GatewayMetrics"]

PREFIX = "step37_gateway"


class _StateCollector(Collector):
    def __init__(self, cache: FeatureCache, pools: Iterable[EndpointPool]) -> None:
        self.cache = cache
        self.pools = list(pools)

    def collect(self) -> Iterator[Metric]:
        stats = self.cache.stats
        for name, value, help_text in (
            ("cache_hits", stats.hits, "images whose features came from the cache"),
            ("cache_misses", stats.misses, "images sent to the encoder"),
            ("cache_coalesced", stats.coalesced, "misses that joined another request's in-flight encode"),
            ("cache_evictions", stats.evictions, "entries evicted to stay within the byte bound"),
        ):
            yield CounterMetricFamily(f"{PREFIX}_{name}", help_text, value=value)
        yield GaugeMetricFamily(f"{PREFIX}_cache_bytes", "bytes of features cached", value=self.cache.bytes)
        yield GaugeMetricFamily(f"{PREFIX}_cache_entries", "images cached", value=len(self.cache))
        ready = GaugeMetricFamily(f"{PREFIX}_endpoint_ready", "1 if the endpoint is in rotation",
                                  labels=["service", "url"])
        outstanding = GaugeMetricFamily(f"{PREFIX}_endpoint_outstanding", "requests in flight to the endpoint",
                                        labels=["service", "url"])
        for pool in self.pools:
            for endpoint in pool.endpoints:
                ready.add_metric([pool.name, endpoint.url], float(endpoint.ready))
                outstanding.add_metric([pool.name, endpoint.url], endpoint.outstanding)
        yield ready
        yield outstanding


class GatewayMetrics:
    """One registry per app (tests run several apps in one process)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else new_registry()
        r = self.registry
        self.requests = Counter(f"{PREFIX}_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        self.request_seconds = Histogram(f"{PREFIX}_request_duration_seconds", "HTTP request latency by route",
                                         ["route"], buckets=LATENCY_BUCKETS_S, registry=r)
        self.stage_seconds = Histogram(f"{PREFIX}_stage_duration_seconds", "latency added by each stage",
                                       ["stage"], buckets=LATENCY_BUCKETS_S, registry=r)
        self.upstream_errors = Counter(f"{PREFIX}_upstream_errors", "downstream failures by service and code",
                                       ["service", "code"], registry=r)
        self.errors = Counter(f"{PREFIX}_errors", "error answers by code", ["code"], registry=r)
        self.in_flight = Gauge(f"{PREFIX}_in_flight_requests", "HTTP requests being served", registry=r)
        self.tokens = Counter(f"{PREFIX}_tokens", "tokens served", ["kind"], registry=r)
        self.images = Counter(f"{PREFIX}_images", "images received", registry=r)
        self.lm_features = Counter(f"{PREFIX}_lm_features", "requests' image features sent to an LM worker: by_name "
                                   "(it kept them), whole, or resent (whole again: it no longer had them)", ["how"],
                                   registry=r)

    def watch(self, cache: FeatureCache, pools: Iterable[EndpointPool]) -> None:
        self.registry.register(_StateCollector(cache, pools))

    def observe_stages(self, stages_ms: Mapping[str, float]) -> None:
        for stage, ms in stages_ms.items():
            self.stage_seconds.labels(stage=stage).observe(ms / 1e3)

    def upstream_error(self, service: str, error: GatewayError) -> None:
        self.upstream_errors.labels(service=service, code=error.code).inc()

    def error(self, error: GatewayError | None) -> None:
        self.errors.labels(code=error.code if error is not None else "internal_error").inc()

    def usage(self, prompt_tokens: int, completion_tokens: int) -> None:
        self.tokens.labels(kind="prompt").inc(prompt_tokens)
        self.tokens.labels(kind="completion").inc(completion_tokens)
