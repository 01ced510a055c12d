"""One record per request sent: the raw material every statistic is computed from.

The report stores every record, so a figure can always be recomputed (or recomputed
differently) from the JSON without running the load again. Times are seconds on the
client's monotonic clock, relative to the start of the load point; latencies are in
milliseconds because that is how people read them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from services.loadtest.errors import OUTCOME_OK, OUTCOMES

__all__ = ["RequestRecord"]


@dataclass
class RequestRecord:
    """What happened to one request, successful or not.

    ``outcome`` is exactly one of ``ok``, ``error``, ``timeout``, so counting outcomes
    always accounts for every request sent. ``scheduled_s`` is set in rate mode only:
    ``start_s - scheduled_s`` is how late the client sent the request compared with
    its Poisson schedule (a client that cannot keep up shows here, not as server
    latency). ``image_ids`` are content hashes, so reuse can be checked after the fact.
    """

    index: int
    warmup: bool
    start_s: float
    end_s: float
    outcome: str
    images: int
    reused_images: int
    request_bytes: int
    image_ids: list[str] = field(default_factory=list)
    scheduled_s: float | None = None
    status_code: int | None = None
    error_type: str | None = None
    error_message: str | None = None
    ttft_ms: float | None = None
    output_tokens: int | None = None
    output_tokens_source: str | None = None  # "usage" (server-counted) or "chunks" (SSE chunks)
    prompt_tokens: int | None = None
    server_timings_ms: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {OUTCOMES}, got {self.outcome!r}")

    @property
    def latency_ms(self) -> float:
        return (self.end_s - self.start_s) * 1000.0

    @property
    def ok(self) -> bool:
        return self.outcome == OUTCOME_OK

    def to_wire(self) -> dict[str, Any]:
        wire = asdict(self)
        wire["latency_ms"] = self.latency_ms
        return wire

    @classmethod
    def from_wire(cls, wire: dict[str, Any]) -> RequestRecord:
        fields = {name: value for name, value in wire.items() if name != "latency_ms"}
        return cls(**fields)
