"""Per-request stage timings: what the ``server-timing`` header and ``timings`` field report.

Stages are wall-clock spans. A stage entered several times concurrently (one
generate per image in a captions request) reports the span from its first start to
its last end — the latency it added, not the sum of work. ``transfer`` is the time a
downstream call took beyond what the downstream itself reports (network, message
(de)serialisation, queueing in HTTP stacks). Downstream-reported stages appear with
a prefix (``encoder.forward``, ``lm.prefill``). All values are milliseconds.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping

__all__ = ["StageTimer", "remote_stages_ms", "reported_total_ms"]


_NOT_DURATIONS = ("_per_s", "_s", "_bytes", "_count")


def remote_stages_ms(timings: Mapping[str, float]) -> dict[str, float]:
    """A downstream's stage durations in ms, named without the ``_ms`` suffix.

    The services report ``{"queue_ms": …, "tokens_per_s": …}``: keys ending in ``_ms``
    are durations, keys with another unit suffix (a rate, a count) are not; a key
    without a suffix is taken as milliseconds, as the wire contract says.
    """
    out: dict[str, float] = {}
    for key, value in timings.items():
        if key.endswith("_ms"):
            out[key[:-3]] = float(value)
        elif not key.endswith(_NOT_DURATIONS):
            out[key] = float(value)
    return out


def reported_total_ms(timings: Mapping[str, float]) -> float:
    """A downstream's own time for a call: its ``total`` if given, else the sum of its stages
    (which over-counts if stages overlap: transfer is then under-estimated, never invented)."""
    stages = remote_stages_ms(timings)
    if "total" in stages:
        return stages["total"]
    return sum(stages.values())


class StageTimer:
    """Collects stage spans and downstream timings for one request."""

    def __init__(self) -> None:
        self._started = time.perf_counter()
        self._spans: dict[str, tuple[float, float]] = {}
        self._added: dict[str, float] = {}
        self._remote: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.record(name, start, time.perf_counter())

    def record(self, name: str, start: float, end: float) -> None:
        """A span measured by the caller (``time.perf_counter`` seconds), e.g. across a stream."""
        first, last = self._spans.get(name, (start, end))
        self._spans[name] = (min(first, start), max(last, end))

    def add(self, name: str, ms: float) -> None:
        """Accumulate a computed duration (``transfer``)."""
        self._added[name] = self._added.get(name, 0.0) + max(ms, 0.0)

    def add_call(self, prefix: str, wall_ms: float, reported: Mapping[str, float]) -> None:
        """Record a downstream call: its own stages, and the rest of its wall time as transfer."""
        for key, value in remote_stages_ms(reported).items():
            name = f"{prefix}.{key}"
            self._remote[name] = max(self._remote.get(name, 0.0), value)
        self.add("transfer", wall_ms - reported_total_ms(reported) if reported else 0.0)

    def elapsed_ms(self) -> float:
        return 1e3 * (time.perf_counter() - self._started)

    def stages_ms(self) -> dict[str, float]:
        """The gateway's own stages (no downstream breakdown), for metrics."""
        out = {name: 1e3 * (end - start) for name, (start, end) in self._spans.items()}
        for name, value in self._added.items():
            out[name] = out.get(name, 0.0) + value
        return out

    def as_dict(self) -> dict[str, float]:
        out = {**self.stages_ms(), **self._remote, "total": self.elapsed_ms()}
        return {name: round(value, 3) for name, value in out.items()}

    def server_timing(self) -> str:
        """The ``server-timing`` header value (W3C Server Timing)."""
        return ", ".join(f"{name};dur={value}" for name, value in self.as_dict().items())
