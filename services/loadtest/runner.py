"""Driving load: a sweep of load points, each a closed loop (fixed concurrency) or an
open loop (Poisson arrivals at a fixed rate), each preceded by uncounted warm-up.

Closed loop: ``concurrency`` workers, each sending its next request as soon as the
previous one finished — measures capacity. Open loop: requests arrive at exponential
intervals whatever the server does (optionally capped by ``max_concurrency``) — measures
latency at a given offered load, and exposes queueing a closed loop hides. In rate mode
each record keeps its scheduled time, so a client that fell behind its schedule shows
up in the report instead of passing for server latency.

Every load point is bounded: it stops issuing at its request count or duration, and
nothing outlives its hard deadline (``max_run_s`` after the point started; in duration
mode also ``duration_s + timeout_s`` after the measurement started): a request still
running then is cut off and recorded as a ``RunDeadline`` timeout. Request bodies are
built ahead of time by ``SpecFeed`` in a worker thread, so encoding stays out of the
measured latencies.
"""

from __future__ import annotations

import asyncio
import math
import random
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
from tqdm import tqdm

from services.common.transport import AiohttpTransport, LeanClient
from services.loadtest.client import RequestSender
from services.loadtest.errors import RUN_DEADLINE, ConfigError
from services.loadtest.feed import SpecFeed
from services.loadtest.records import RequestRecord
from services.loadtest.workload import RequestSpec, Workload

__all__ = ["LoadPoint", "LoadTester", "PointResult", "RunSettings", "arrival_offsets"]


def arrival_offsets(rate_per_s: float, rng: random.Random) -> Iterator[float]:
    """Arrival times (seconds from the start) of a Poisson process of ``rate_per_s``.

    Inter-arrival gaps are exponential with mean ``1 / rate_per_s``; an infinite rate
    sends everything at once (a burst). A generator of numbers, not of sleeps, so the
    schedule can be tested without waiting for it.
    """
    offset = 0.0
    while True:
        if not math.isinf(rate_per_s):
            offset += rng.expovariate(rate_per_s)
        yield offset


@dataclass(frozen=True)
class LoadPoint:
    """One point of a sweep: a concurrency, or a request rate (optionally capped)."""

    concurrency: int | None = None
    rate_per_s: float | None = None
    max_concurrency: int | None = None

    def __post_init__(self) -> None:
        if (self.concurrency is None) == (self.rate_per_s is None):
            raise ConfigError("load", self, "give exactly one of concurrency and rate")
        if self.concurrency is not None and self.concurrency < 1:
            raise ConfigError("concurrency", self.concurrency, "must be at least 1")
        if self.rate_per_s is not None and not self.rate_per_s > 0:
            raise ConfigError("rate", self.rate_per_s, "must be positive (inf for a burst)")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ConfigError("max_concurrency", self.max_concurrency, "must be at least 1")

    @property
    def mode(self) -> str:
        return "concurrency" if self.concurrency is not None else "rate"

    @property
    def label(self) -> str:
        if self.concurrency is not None:
            return f"concurrency={self.concurrency}"
        cap = f" (max {self.max_concurrency})" if self.max_concurrency else ""
        return f"rate={self.rate_per_s:g}/s{cap}"

    def describe(self) -> dict[str, Any]:
        rate = self.rate_per_s
        return {"mode": self.mode, "label": self.label, "concurrency": self.concurrency,
                "rate_per_s": None if rate is None or math.isinf(rate) else rate,
                "burst": rate is not None and math.isinf(rate), "max_concurrency": self.max_concurrency}


@dataclass(frozen=True)
class RunSettings:
    """How long and how hard. Exactly one of ``requests`` and ``duration_s``; both per point."""

    url: str
    endpoint: str = "chat"
    requests: int | None = 100
    duration_s: float | None = None
    warmup_requests: int = 2
    timeout_s: float = 60.0
    max_run_s: float = 3600.0
    api_key: str | None = None
    seed: int = 0
    prefetch: int = 256
    progress: bool = True

    def __post_init__(self) -> None:
        if (self.requests is None) == (self.duration_s is None):
            raise ConfigError("requests/duration", (self.requests, self.duration_s), "give exactly one")
        for name in ("requests", "duration_s", "timeout_s", "max_run_s", "prefetch"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(name, value, "must be positive")
        if self.warmup_requests < 0:
            raise ConfigError("warmup_requests", self.warmup_requests, "must not be negative")

    def describe(self) -> dict[str, Any]:
        described = {name: getattr(self, name) for name in self.__dataclass_fields__}
        described["api_key"] = "<redacted>" if self.api_key else None
        return described


@dataclass
class PointResult:
    """The records of one load point, warm-up included (flagged), in completion order."""

    point: LoadPoint
    started_at_unix_s: float
    records: list[RequestRecord] = field(default_factory=list)
    not_sent: int = 0  # count mode: planned requests left unsent at the hard deadline
    deadline_hit: bool = False
    workload_waits: int = 0  # sends that waited for the workload thread (client too slow)


class LoadTester:
    """Runs a sweep of load points against one endpoint. ``results`` grows as points
    run, so an interrupted run still has every record made before the interrupt."""

    def __init__(self, settings: RunSettings, workload: Workload, *,
                 transport: httpx.AsyncBaseTransport | None = None,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.settings = settings
        self.workload = workload
        self.transport = transport
        self.clock = clock
        self.results: list[PointResult] = []

    async def run(self, points: Sequence[LoadPoint]) -> list[PointResult]:
        settings = self.settings
        headers = {"authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}
        # The client's own cost per request is part of every latency it reports: send
        # through aiohttp's cheaper connection handling unless a test supplies a
        # transport. Connections unbounded: concurrency is bounded by the workers, and a
        # pool limit would add client-side queueing to the measured latency.
        transport = self.transport or AiohttpTransport(max_connections=None, trust_env=True)
        feed = SpecFeed(self.workload, settings.prefetch)
        feed.start()
        if settings.requests is None:
            await feed.allow(None)  # duration mode: how many is not known in advance
        try:
            async with LeanClient(transport=transport, headers=headers, timeout=None) as client:
                for index, point in enumerate(points):
                    result = PointResult(point, time.time())
                    self.results.append(result)
                    await self._run_point(client, feed, point, result, index)
        finally:
            await feed.close()
        return self.results

    async def _run_point(self, client: httpx.AsyncClient, feed: SpecFeed, point: LoadPoint,
                         result: PointResult, point_index: int) -> None:
        settings = self.settings
        if settings.requests is not None:
            await feed.allow(settings.warmup_requests + settings.requests)
        await feed.fill(settings.warmup_requests + (settings.requests or settings.prefetch))
        waits_before = feed.waits
        bar = tqdm(total=settings.requests, desc=point.label, unit="req", file=sys.stderr,
                   disable=not settings.progress, dynamic_ncols=True)
        errors = 0

        def sink(record: RequestRecord) -> None:
            nonlocal errors
            result.records.append(record)
            if not record.warmup:
                errors += not record.ok
                bar.update(1)
                if errors:
                    bar.set_postfix(failed=errors, refresh=False)

        sender = RequestSender(client, settings.url, settings.endpoint, timeout_s=settings.timeout_s,
                               sink=sink, clock=self.clock)
        origin = self.clock()
        deadline = origin + settings.max_run_s
        try:
            workers = point.concurrency or point.max_concurrency or 1
            await self._closed_loop(sender, feed, workers, origin, deadline, count=settings.warmup_requests,
                                    stop_s=None, warmup=True)
            start = self.clock()
            if settings.duration_s is not None:
                deadline = min(deadline, start + settings.duration_s + settings.timeout_s)
            stop_s = None if settings.duration_s is None else start + settings.duration_s
            if point.concurrency is not None:
                await self._closed_loop(sender, feed, point.concurrency, origin, deadline,
                                        count=settings.requests, stop_s=stop_s, warmup=False)
            else:
                rng = random.Random(f"{settings.seed}:{point_index}")
                await self._open_loop(sender, feed, point, rng, origin, start, deadline, stop_s)
        finally:
            # Also when interrupted: every request sent has its record by now, so the
            # planned requests without one were never sent.
            bar.close()
            if settings.requests is not None:
                result.not_sent = settings.requests - sum(not record.warmup for record in result.records)
            result.deadline_hit = any(record.error_type == RUN_DEADLINE for record in result.records) or (
                result.not_sent > 0 and self.clock() >= deadline)
            result.workload_waits = feed.waits - waits_before

    async def _closed_loop(self, sender: RequestSender, feed: SpecFeed, workers: int, origin: float,
                           deadline: float, *, count: int | None, stop_s: float | None, warmup: bool) -> None:
        sent = 0

        def may_send() -> bool:
            now = self.clock()
            return (count is None or sent < count) and (stop_s is None or now < stop_s) and now < deadline

        async def worker() -> None:
            nonlocal sent
            while may_send():
                sent += 1  # claimed before the await, so workers never overshoot the count
                spec = await feed.get()
                await sender.send(spec, origin_s=origin, deadline_s=deadline, warmup=warmup)

        await asyncio.gather(*(worker() for _ in range(workers)))

    async def _open_loop(self, sender: RequestSender, feed: SpecFeed, point: LoadPoint, rng: random.Random,
                         origin: float, start: float, deadline: float, stop_s: float | None) -> None:
        count = self.settings.requests
        limiter = asyncio.Semaphore(point.max_concurrency) if point.max_concurrency else None
        tasks: list[asyncio.Task[RequestRecord]] = []

        async def send(spec: RequestSpec, scheduled: float) -> RequestRecord:
            if limiter is None:
                return await sender.send(spec, origin_s=origin, deadline_s=deadline, warmup=False,
                                         scheduled_s=scheduled - origin)
            async with limiter:
                return await sender.send(spec, origin_s=origin, deadline_s=deadline, warmup=False,
                                         scheduled_s=scheduled - origin)

        try:
            for offset in arrival_offsets(point.rate_per_s or math.inf, rng):
                scheduled = start + offset
                if (count is not None and len(tasks) >= count) or (stop_s is not None and scheduled >= stop_s) \
                        or scheduled >= deadline:
                    break
                if (delay := scheduled - self.clock()) > 0:
                    await asyncio.sleep(delay)
                spec = await feed.get()
                tasks.append(asyncio.create_task(send(spec, scheduled)))
            await asyncio.gather(*tasks)
        finally:
            # Only reached with tasks pending when this coroutine is cancelled: take the
            # requests down with it (each records itself as cancelled).
            for task in tasks:
                task.cancel()
