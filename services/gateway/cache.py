"""The feature cache: LRU bounded in bytes, with single-flight encodes.

Vision features are a pure function of (image bytes, encoder weights, output dtype),
so they are keyed by exactly that — the content's sha256, the encoder model id and
the dtype, plus the request's ``cache_salt`` when it gives one (a hit answers faster
than a miss, so salted requests share features only with the same salt) — and a
repeated image (a retry, a shared meme, a follow-up question on
the same photo) skips the encoder. The bound is in bytes, not entries: one image is
~2 MB of bf16 features at full Step3.7 size and a few KB at demo size.

Single-flight: concurrent requests for an image that is being encoded share that one
encode (a *flight*) instead of each starting their own. A flight runs in its own task
so that one waiter's disconnect does not fail the others; it is cancelled when its
last waiter leaves, so abandoned work still stops.

Lookup is synchronous (:meth:`FeatureCache.lookup`), so a request's misses are
registered as in flight before it yields to the event loop, and the wait is a
separate step (:meth:`CacheLookup.wait`) the caller can time as "encode".
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from services.gateway.errors import ClientError
from services.gateway.features import EncodedImage

__all__ = ["CacheLookup", "CacheStats", "FeatureCache", "FeatureKey", "Loader"]

logger = logging.getLogger(__name__)


class FeatureKey(NamedTuple):
    sha256: str
    model: str
    dtype: str
    salt: str | None = None  # the request's cache_salt: a hit is faster, so tenants share nothing


Loader = Callable[[list[FeatureKey]], Awaitable[Mapping[FeatureKey, EncodedImage]]]


@dataclass
class CacheStats:
    """Monotonic counters (Prometheus reads them at scrape time)."""

    hits: int = 0
    misses: int = 0
    coalesced: int = 0  # misses that joined another request's in-flight encode
    evictions: int = 0
    rejected: int = 0  # entries larger than the whole cache


class _Flight:
    """One encoder call for a set of keys, awaited by one or more requests."""

    def __init__(self, keys: list[FeatureKey], task: asyncio.Task[Mapping[FeatureKey, EncodedImage]]) -> None:
        self.keys = keys
        self.task = task
        self.waiters = 0


class CacheLookup:
    """Hits available now; misses resolved by :meth:`wait`."""

    def __init__(self, cache: FeatureCache, keys: Sequence[FeatureKey], found: dict[FeatureKey, EncodedImage],
                 flights: list[_Flight], own: _Flight | None, load: Loader) -> None:
        self._cache = cache
        self._keys = list(keys)
        self._found = found
        self._flights = flights
        self._own = own
        self._load = load

    @property
    def pending(self) -> bool:
        return bool(self._flights)

    async def wait(self) -> list[EncodedImage]:
        """The features of every key, in the order asked (duplicates included)."""
        outcomes = await self._cache._await_flights(self._flights)
        for flight, outcome in zip(self._flights, outcomes, strict=True):
            needed = [key for key in flight.keys if key in self._keys]
            if isinstance(outcome, BaseException):
                if flight is self._own or not isinstance(outcome, (ClientError, asyncio.CancelledError)):
                    raise outcome
                # Another request's batch failed on *its* bad image (or was abandoned):
                # ours may be fine, so encode them on our own.
                values = await self._load(needed)
                for key in needed:
                    self._cache.put(key, values[key])
                outcome = values
            self._found.update({key: outcome[key] for key in needed})
        return [self._found[key] for key in self._keys]


class FeatureCache:
    """LRU of ``EncodedImage`` bounded by ``max_bytes`` (0: nothing is kept, flights still shared)."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self.stats = CacheStats()
        self._entries: OrderedDict[FeatureKey, EncodedImage] = OrderedDict()
        self._bytes = 0
        self._inflight: dict[FeatureKey, _Flight] = {}

    @property
    def bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def get(self, key: FeatureKey) -> EncodedImage | None:
        """The cached value, marked most recently used; no statistics."""
        value = self._entries.get(key)
        if value is not None:
            self._entries.move_to_end(key)
        return value

    def put(self, key: FeatureKey, value: EncodedImage) -> None:
        if value.nbytes > self.max_bytes:
            self.stats.rejected += 1
            return
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= old.nbytes
        self._entries[key] = value
        self._bytes += value.nbytes
        while self._bytes > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self._bytes -= evicted.nbytes
            self.stats.evictions += 1

    def lookup(self, keys: Sequence[FeatureKey], load: Loader) -> CacheLookup:
        """Split ``keys`` into hits, joins of in-flight encodes, and one new flight
        (``load`` called once with all remaining misses)."""
        found: dict[FeatureKey, EncodedImage] = {}
        flights: list[_Flight] = []
        missing: list[FeatureKey] = []
        for key in dict.fromkeys(keys):
            value = self.get(key)
            if value is not None:
                self.stats.hits += 1
                found[key] = value
                continue
            flight = self._inflight.get(key)
            if flight is not None:
                self.stats.coalesced += 1
                if flight not in flights:
                    flights.append(flight)
            else:
                self.stats.misses += 1
                missing.append(key)
        own = self._start_flight(missing, load) if missing else None
        if own is not None:
            flights.append(own)
        return CacheLookup(self, keys, found, flights, own, load)

    def _start_flight(self, keys: list[FeatureKey], load: Loader) -> _Flight:
        async def run() -> Mapping[FeatureKey, EncodedImage]:
            values = await load(keys)
            absent = [key for key in keys if key not in values]
            if absent:
                raise RuntimeError(f"the loader returned no value for {len(absent)} of {len(keys)} keys")
            for key in keys:
                self.put(key, values[key])
            return values

        flight = _Flight(keys, asyncio.ensure_future(run()))
        for key in keys:
            self._inflight[key] = flight
        flight.task.add_done_callback(lambda _task: self._land(flight))
        return flight

    def _land(self, flight: _Flight) -> None:
        for key in flight.keys:
            if self._inflight.get(key) is flight:
                del self._inflight[key]
        task = flight.task
        if task.done() and not task.cancelled() and task.exception() is not None and flight.waiters == 0:
            # Waiters get the exception through their own await; this one had none left.
            logger.info("encode of %d image(s) failed with no request waiting: %r", len(flight.keys),
                        task.exception())

    async def _await_flights(self, flights: list[_Flight]) -> list[Mapping[FeatureKey, EncodedImage] | BaseException]:
        for flight in flights:
            flight.waiters += 1
        try:
            # shield: a waiter's cancellation must not cancel work others wait for.
            return await asyncio.gather(*(asyncio.shield(f.task) for f in flights), return_exceptions=True)
        finally:
            for flight in flights:
                flight.waiters -= 1
                if flight.waiters == 0 and not flight.task.done():
                    flight.task.cancel()  # the last waiter left: stop the encode
                    self._land(flight)  # and let new requests start afresh
