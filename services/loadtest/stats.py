"""Statistics of a load point, computed from its per-request records and nothing else,
so anyone holding the report JSON can recompute (and check) every figure.

Choices worth knowing when reading the numbers:

- Warm-up records are excluded from everything.
- Latency, TTFT and TPOT distributions are over successful requests only: a fast 500
  or a request cut off at its timeout would otherwise pull percentiles either way.
  Failures are counted, by type and by status, instead.
- Throughput divides by the measurement window, from the first measured request's
  start to the last one's end (what vLLM's ``benchmark_serving`` calls the duration),
  and counts successful work only: requests, their images, their output tokens.
- Percentiles use numpy's default (linear interpolation between closest ranks).
- TPOT (time per output token after the first) is ``(latency - ttft) / (tokens - 1)``
  for streamed requests with at least two tokens, as in vLLM and aiperf.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from services.loadtest.errors import OUTCOMES
from services.loadtest.records import RequestRecord

__all__ = ["PERCENTILES", "distribution", "summarize"]

PERCENTILES = (50, 90, 95, 99)


def distribution(values: Iterable[float]) -> dict[str, float] | None:
    """count, mean, stdev, min, max and the ``PERCENTILES`` of ``values``; None if empty."""
    samples = np.asarray(list(values), dtype=np.float64)
    if samples.size == 0:
        return None
    summary = {"count": int(samples.size), "mean": float(samples.mean()), "stdev": float(samples.std()),
               "min": float(samples.min()), "max": float(samples.max())}
    for percentile, value in zip(PERCENTILES, np.percentile(samples, PERCENTILES), strict=True):
        summary[f"p{percentile}"] = float(value)
    return summary


def _per_second(total: float, window_s: float) -> float | None:
    return total / window_s if window_s > 0 else None


def summarize(records: Sequence[RequestRecord], *, not_sent: int = 0) -> dict[str, Any]:
    """The summary of one load point (schema in ``services.loadtest.report``)."""
    measured = [record for record in records if not record.warmup]
    outcomes = Counter(record.outcome for record in measured)
    ok = [record for record in measured if record.ok]
    failed = [record for record in measured if not record.ok]
    window_s = (max(r.end_s for r in measured) - min(r.start_s for r in measured)) if measured else 0.0

    tokens = [record.output_tokens for record in ok if record.output_tokens is not None]
    streamed = [record for record in ok if record.ttft_ms is not None]
    tpot = [(record.latency_ms - record.ttft_ms) / (record.output_tokens - 1) for record in streamed
            if record.output_tokens is not None and record.output_tokens > 1]
    stages = sorted({stage for record in ok for stage in record.server_timings_ms})
    images_sent = sum(record.images for record in measured)
    images_reused = sum(record.reused_images for record in measured)
    lags = [(record.start_s - record.scheduled_s) * 1000.0 for record in measured if record.scheduled_s is not None]
    first_messages: dict[str, str] = {}
    for record in failed:
        first_messages.setdefault(str(record.error_type), str(record.error_message))

    return {
        "requests": {
            "sent": len(measured),
            **{outcome: outcomes.get(outcome, 0) for outcome in OUTCOMES},
            "not_sent": not_sent,
            "warmup": len(records) - len(measured),
        },
        "window_s": window_s,
        "throughput": {
            "requests_per_s": _per_second(len(ok), window_s),
            "images_per_s": _per_second(sum(record.images for record in ok), window_s),
            "output_tokens_per_s": _per_second(sum(tokens), window_s) if tokens else None,
        },
        "latency_ms": distribution(record.latency_ms for record in ok),
        "ttft_ms": distribution(record.ttft_ms for record in streamed),
        "tpot_ms": distribution(tpot),
        "output_tokens": {
            "total": sum(tokens),
            "mean": float(np.mean(tokens)) if tokens else None,
            "estimated_from_chunks": sum(record.output_tokens_source == "chunks" for record in ok),
        },
        "images": {
            "sent": images_sent,
            "reused": images_reused,
            "reuse_ratio": images_reused / images_sent if images_sent else None,
        },
        "errors_by_type": dict(Counter(str(record.error_type) for record in failed).most_common()),
        "errors_by_status": dict(Counter(str(record.status_code) for record in failed
                                         if record.status_code is not None).most_common()),
        "error_examples": first_messages,
        "server_timings_ms": {
            stage: distribution(record.server_timings_ms[stage] for record in ok if stage in record.server_timings_ms)
            for stage in stages
        },
        "schedule_lag_ms": distribution(lags),
    }
