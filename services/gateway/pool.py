"""Endpoint pools: least-outstanding-requests choice, readiness probes, ejection.

Each downstream tier (encoders, LM workers) is a pool of base URLs. A request goes to
the ready endpoint with the fewest requests in flight from this gateway — the
choice that adapts to uneven request costs (a 16-image encode next to 1-image ones)
without knowing them; ties rotate so idle replicas share the load. An endpoint that
fails ``eject_after_failures`` times in a row (connection errors, timeouts, 5xx; not
"busy" answers) leaves the rotation; a background probe of its ``/ready`` — the same
endpoint compose and the test fixtures poll, which runs a tiny forward pass — puts
it back once it answers 200. Given an ``rpc`` client, the probe also learns the port
of the endpoint's call channel (``rpc_port`` in the ``/ready`` body) and connects to
it, off the request path: calls go there once that worked, over HTTP otherwise, and
over HTTP again for a while after a call finds the channel unreachable.

A request may carry an *affinity* key (the LM tier's: its first image and the text
before it). Rendezvous hashing ranks the ready endpoints for that key; the top one
takes the request unless it has more than ``affinity_slack`` requests in flight beyond
the least busy endpoint. The same image thus keeps reaching the LM worker whose prefix
cache holds its prompt, endpoints joining or leaving move only their own keys, and a
hot image cannot pile its requests onto one worker while others idle.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import httpx

from services.common.rpc import RpcClient, RpcError
from services.gateway.errors import ServiceUnavailable

__all__ = ["Endpoint", "EndpointPool"]

logger = logging.getLogger(__name__)

RPC_CONNECT_IN_PROBE_S = 1.0  # how long a probe waits to connect to a newly reported call channel
MAX_NAMED_FEATURES = 65536  # names remembered per endpoint (a worker keeps what its memory bound allows)


@dataclass(eq=False)
class Endpoint:
    url: str
    outstanding: int = 0
    consecutive_failures: int = 0
    ready: bool = True  # optimistic until told otherwise: the launcher starts us after its children are ready
    requests: int = 0
    rpc_port: int | None = None  # the call channel, once a probe connected to it
    # A channel that could not be reached is not used again until this (monotonic) time,
    # unless the endpoint reports another port (it restarted).
    rpc_unreachable: tuple[int, float] | None = None
    # What an LM worker's /ready offers: named image features kept up to this many bytes
    # (0: none), and cache_salt honoured; and the names it was sent features under
    # (GenerateRequest.feature_refs), most recent last.
    feature_store_bytes: int = 0
    honours_cache_salt: bool = False
    named_features: OrderedDict[str, None] = field(default_factory=OrderedDict)

    def __post_init__(self) -> None:
        self.host = httpx.URL(self.url).host or "127.0.0.1"

    def holds_features(self, names: Sequence[str]) -> bool:
        """Whether every one of ``names`` was sent here with its features (and may be
        kept still: a worker that evicted one answers 400 and is sent it again)."""
        return self.feature_store_bytes > 0 and bool(names) and all(name in self.named_features for name in names)

    def sent_features(self, names: Sequence[str]) -> None:
        for name in names:
            self.named_features[name] = None
            self.named_features.move_to_end(name)
        while len(self.named_features) > MAX_NAMED_FEATURES:
            self.named_features.popitem(last=False)

    def forget_features(self, names: Sequence[str]) -> None:
        for name in names:
            self.named_features.pop(name, None)

    @property
    def rpc_address(self) -> tuple[str, int] | None:
        """Host and port of the call channel, when the endpoint has one we may use."""
        if self.rpc_port is None:
            return None
        return self.host, self.rpc_port

    def rpc_failed(self, reason: str, retry_after_s: float = 60.0) -> None:
        """The call channel could not be reached: use HTTP for ``retry_after_s``."""
        logger.warning("call channel of %s (port %s) unreachable (%s); using HTTP for %g s", self.url,
                       self.rpc_port, reason, retry_after_s)
        if self.rpc_port is not None:
            self.rpc_unreachable = (self.rpc_port, time.monotonic() + retry_after_s)
        self.rpc_port = None

    def rpc_usable(self, port: int) -> bool:
        """Not the port that just failed (a restarted endpoint reports another)."""
        failed = self.rpc_unreachable
        return failed is None or port != failed[0] or time.monotonic() >= failed[1]

    def to_dict(self) -> dict[str, object]:
        return {"url": self.url, "ready": self.ready, "outstanding": self.outstanding,
                "consecutive_failures": self.consecutive_failures, "rpc_port": self.rpc_port}


class EndpointPool:
    """The endpoints of one downstream service (``name`` appears in errors and metrics)."""

    def __init__(self, name: str, urls: Iterable[str], *, ready_path: str = "/ready",
                 eject_after_failures: int = 3, probe_timeout_s: float = 5.0, rpc: RpcClient | None = None,
                 affinity_slack: int = -1) -> None:
        """``affinity_slack``: how many more requests in flight than the least busy endpoint
        the one an affinity key ranks first may have and still take the request (-1: keys
        are ignored, the least busy endpoint always takes it)."""
        self.name = name
        self.endpoints = [Endpoint(url.rstrip("/")) for url in urls]
        if not self.endpoints:
            raise ValueError(f"the {name} pool needs at least one URL")
        self.ready_path = ready_path
        self.eject_after_failures = eject_after_failures
        self.probe_timeout = httpx.Timeout(probe_timeout_s)
        self.rpc = rpc
        self.affinity_slack = affinity_slack
        self._rotation = itertools.count()

    # ---- choice ------------------------------------------------------------------
    def choose(self, exclude: Iterable[Endpoint] = (), affinity: bytes | None = None) -> Endpoint:
        """The ready endpoint with the fewest requests in flight (ties rotate), or the one
        ``affinity`` ranks first while it is within ``affinity_slack`` of that."""
        excluded = set(exclude)
        candidates = [e for e in self.endpoints if e.ready and e not in excluded]
        if not candidates:
            raise ServiceUnavailable(
                f"no ready {self.name} endpoint ({len(self.endpoints)} configured, "
                f"{sum(e.ready for e in self.endpoints)} ready, {len(excluded)} already tried)")
        fewest = min(e.outstanding for e in candidates)
        if affinity is not None and self.affinity_slack >= 0:
            preferred = max(candidates, key=lambda e: hashlib.blake2b(affinity + e.url.encode(), digest_size=8).digest())
            if preferred.outstanding <= fewest + self.affinity_slack:
                return preferred
        tied = [e for e in candidates if e.outstanding == fewest]
        return tied[next(self._rotation) % len(tied)]

    def acquire(self, exclude: Iterable[Endpoint] = (), affinity: bytes | None = None) -> Endpoint:
        """:meth:`choose`, counting the request as outstanding until :meth:`release`."""
        endpoint = self.choose(exclude, affinity)
        endpoint.outstanding += 1
        endpoint.requests += 1
        return endpoint

    def release(self, endpoint: Endpoint) -> None:
        endpoint.outstanding -= 1

    # ---- health --------------------------------------------------------------------
    def record_success(self, endpoint: Endpoint) -> None:
        endpoint.consecutive_failures = 0

    def record_failure(self, endpoint: Endpoint, reason: str) -> None:
        endpoint.consecutive_failures += 1
        if endpoint.ready and endpoint.consecutive_failures >= self.eject_after_failures:
            endpoint.ready = False
            logger.warning("%s endpoint %s ejected after %d consecutive failures (last: %s)", self.name,
                           endpoint.url, endpoint.consecutive_failures, reason)

    @property
    def ready_count(self) -> int:
        return sum(endpoint.ready for endpoint in self.endpoints)

    async def probe_once(self, client: httpx.AsyncClient) -> int:
        """Probe every endpoint concurrently; returns how many answered ready just now
        (rotation changes only after ``eject_after_failures`` misses, this count at once)."""
        results = await asyncio.gather(*(self._probe(client, endpoint) for endpoint in self.endpoints))
        return sum(results)

    async def _probe(self, client: httpx.AsyncClient, endpoint: Endpoint) -> bool:
        try:
            response = await client.get(endpoint.url + self.ready_path, timeout=self.probe_timeout)
            ok, reason = response.status_code == 200, f"HTTP {response.status_code}"
        except httpx.HTTPError as exc:
            ok, reason = False, type(exc).__name__
        if ok:
            try:
                body = response.json()
            except ValueError:
                body = None
            body = body if isinstance(body, dict) else {}
            store = body.get("feature_store_bytes")
            endpoint.feature_store_bytes = store if isinstance(store, int) and not isinstance(store, bool) else 0
            if endpoint.feature_store_bytes <= 0:  # off, or a worker from before: features go whole
                endpoint.feature_store_bytes = 0
                endpoint.named_features.clear()
            endpoint.honours_cache_salt = body.get("cache_salt") is True
            if self.rpc is not None:
                await self._learn_rpc_port(endpoint, body)
        if ok:
            if not endpoint.ready:
                logger.info("%s endpoint %s is ready again", self.name, endpoint.url)
            endpoint.ready = True
            endpoint.consecutive_failures = 0
        else:
            self.record_failure(endpoint, f"readiness probe: {reason}")
        return ok

    async def _learn_rpc_port(self, endpoint: Endpoint, body: dict) -> None:
        port = body.get("rpc_port")
        if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
            endpoint.rpc_port = None
            return
        if port == endpoint.rpc_port or not endpoint.rpc_usable(port):
            return
        # A channel that cannot be reached costs this probe a bounded wait, not a request
        # (and keeps the gateway's own /ready, which probes, within a healthcheck's timeout).
        try:
            await asyncio.wait_for(self.rpc.connect((endpoint.host, port)),  # type: ignore[union-attr]
                                   min(RPC_CONNECT_IN_PROBE_S, self.probe_timeout.connect or RPC_CONNECT_IN_PROBE_S))
        except (RpcError, asyncio.TimeoutError) as exc:
            endpoint.rpc_port = port
            endpoint.rpc_failed(str(exc) or "no answer to the connection")
            return
        logger.info("%s endpoint %s: calls over its channel on port %d", self.name, endpoint.url, port)
        endpoint.rpc_port = port

    async def run_probes(self, client: httpx.AsyncClient, interval_s: float) -> None:
        """Probe forever (a background task; cancel it to stop)."""
        while True:
            try:
                await self.probe_once(client)
            except Exception:  # a bug here must not stop health checking for good
                logger.exception("%s readiness probe round failed", self.name)
            await asyncio.sleep(interval_s)

    def to_dict(self) -> dict[str, object]:
        return {"ready": self.ready_count, "endpoints": [e.to_dict() for e in self.endpoints]}
