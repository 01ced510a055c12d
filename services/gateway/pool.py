"""Endpoint pools: least-outstanding-requests choice, readiness probes, ejection.

Each downstream tier (encoders, LM workers) is a pool of base URLs. A request goes to
the ready endpoint with the fewest requests in flight from this gateway — the
choice that adapts to uneven request costs (a 16-image encode next to 1-image ones)
without knowing them; ties rotate so idle replicas share the load. An endpoint that
fails ``eject_after_failures`` times in a row (connection errors, timeouts, 5xx; not
"busy" answers) leaves the rotation; a background probe of its ``/ready`` — the same
endpoint compose and the test fixtures poll, which runs a tiny forward pass — puts
it back once it answers 200.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Iterable
from dataclasses import dataclass

import httpx

from services.gateway.errors import ServiceUnavailable

__all__ = ["Endpoint", "EndpointPool"]

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class Endpoint:
    url: str
    outstanding: int = 0
    consecutive_failures: int = 0
    ready: bool = True  # optimistic until told otherwise: the launcher starts us after its children are ready
    requests: int = 0

    def to_dict(self) -> dict[str, object]:
        return {"url": self.url, "ready": self.ready, "outstanding": self.outstanding,
                "consecutive_failures": self.consecutive_failures}


class EndpointPool:
    """The endpoints of one downstream service (``name`` appears in errors and metrics)."""

    def __init__(self, name: str, urls: Iterable[str], *, ready_path: str = "/ready",
                 eject_after_failures: int = 3, probe_timeout_s: float = 5.0) -> None:
        self.name = name
        self.endpoints = [Endpoint(url.rstrip("/")) for url in urls]
        if not self.endpoints:
            raise ValueError(f"the {name} pool needs at least one URL")
        self.ready_path = ready_path
        self.eject_after_failures = eject_after_failures
        self.probe_timeout = httpx.Timeout(probe_timeout_s)
        self._rotation = itertools.count()

    # ---- choice ------------------------------------------------------------------
    def choose(self, exclude: Iterable[Endpoint] = ()) -> Endpoint:
        """The ready endpoint with the fewest requests in flight (ties rotate)."""
        excluded = set(exclude)
        candidates = [e for e in self.endpoints if e.ready and e not in excluded]
        if not candidates:
            raise ServiceUnavailable(
                f"no ready {self.name} endpoint ({len(self.endpoints)} configured, "
                f"{sum(e.ready for e in self.endpoints)} ready, {len(excluded)} already tried)")
        fewest = min(e.outstanding for e in candidates)
        tied = [e for e in candidates if e.outstanding == fewest]
        return tied[next(self._rotation) % len(tied)]

    def acquire(self, exclude: Iterable[Endpoint] = ()) -> Endpoint:
        """:meth:`choose`, counting the request as outstanding until :meth:`release`."""
        endpoint = self.choose(exclude)
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
            if not endpoint.ready:
                logger.info("%s endpoint %s is ready again", self.name, endpoint.url)
            endpoint.ready = True
            endpoint.consecutive_failures = 0
        else:
            self.record_failure(endpoint, f"readiness probe: {reason}")
        return ok

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
