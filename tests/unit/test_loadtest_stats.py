"""Statistics of the load tester, from records whose answers are known in advance."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from services.loadtest.records import RequestRecord
from services.loadtest.stats import PERCENTILES, distribution, summarize


def _record(index: int, latency_ms: float, *, outcome: str = "ok", start_s: float = 0.0, warmup: bool = False,
            **fields: object) -> RequestRecord:
    return RequestRecord(index=index, warmup=warmup, start_s=start_s, end_s=start_s + latency_ms / 1000.0,
                         outcome=outcome, images=fields.pop("images", 1), reused_images=fields.pop("reused_images", 0),
                         request_bytes=100, **fields)


def test_percentiles_of_known_samples() -> None:
    summary = distribution(range(1, 101))  # 1..100
    assert summary is not None
    assert summary["count"] == 100
    assert summary["mean"] == pytest.approx(50.5)
    # Linear interpolation between closest ranks: rank (n - 1) q / 100.
    assert summary["p50"] == pytest.approx(50.5)
    assert summary["p90"] == pytest.approx(90.1)
    assert summary["p95"] == pytest.approx(95.05)
    assert summary["p99"] == pytest.approx(99.01)
    assert (summary["min"], summary["max"]) == (1.0, 100.0)
    assert distribution([7.0]) == {"count": 1, "mean": 7.0, "stdev": 0.0, "min": 7.0, "max": 7.0,
                                   "p50": 7.0, "p90": 7.0, "p95": 7.0, "p99": 7.0}
    assert distribution([]) is None


@pytest.mark.parametrize("size", [2, 3, 10, 101, 1000])
def test_percentiles_agree_with_numpy(size: int) -> None:
    samples = np.random.default_rng(size).lognormal(3.0, 1.0, size)  # latency-like, long tail
    summary = distribution(samples.tolist())
    assert summary is not None
    for percentile in PERCENTILES:
        assert summary[f"p{percentile}"] == pytest.approx(float(np.percentile(samples, percentile)), rel=1e-12)
    assert summary["mean"] == pytest.approx(float(samples.mean()))
    assert summary["stdev"] == pytest.approx(float(samples.std()))


def test_every_request_is_accounted_for() -> None:
    records = [
        _record(0, 500.0, warmup=True),  # warm-up: counted apart, in no statistic
        _record(1, 900.0, warmup=True, outcome="error", error_type="ConnectError"),
        *[_record(2 + i, 100.0 + i, start_s=0.1 * i, output_tokens=10) for i in range(6)],
        _record(8, 5.0, outcome="error", error_type="HTTPStatus", status_code=500, error_message="HTTP 500: boom"),
        _record(9, 6.0, outcome="error", error_type="HTTPStatus", status_code=429, error_message="HTTP 429: busy"),
        _record(10, 7.0, outcome="error", error_type="HTTPStatus", status_code=500, error_message="HTTP 500: boom"),
        _record(11, 1.0, outcome="error", error_type="ConnectError", error_message="refused"),
        _record(12, 200.0, outcome="error", error_type="InvalidResponse", status_code=200),
        _record(13, 2000.0, outcome="timeout", error_type="RequestTimeout"),
        _record(14, 300.0, outcome="timeout", error_type="RunDeadline"),
    ]
    summary = summarize(records, not_sent=3)
    counts = summary["requests"]
    assert counts == {"sent": 13, "ok": 6, "error": 5, "timeout": 2, "not_sent": 3, "warmup": 2}
    assert counts["ok"] + counts["error"] + counts["timeout"] == counts["sent"]
    assert counts["sent"] + counts["warmup"] == len(records)
    assert summary["errors_by_type"] == {"HTTPStatus": 3, "ConnectError": 1, "InvalidResponse": 1,
                                         "RequestTimeout": 1, "RunDeadline": 1}
    assert sum(summary["errors_by_type"].values()) == counts["error"] + counts["timeout"]
    assert summary["errors_by_status"] == {"500": 2, "429": 1, "200": 1}
    assert summary["error_examples"]["HTTPStatus"] == "HTTP 500: boom"
    # Latency over the six successful requests only: 100..105 ms.
    assert summary["latency_ms"]["count"] == 6
    assert summary["latency_ms"]["mean"] == pytest.approx(102.5)
    assert summary["latency_ms"]["max"] == pytest.approx(105.0)


def test_throughput_counts_successful_work_over_the_window() -> None:
    records = [_record(i, 1000.0, start_s=float(i), images=2, output_tokens=30) for i in range(4)]
    records.append(_record(4, 500.0, start_s=1.0, outcome="error", error_type="ReadError", images=2))
    summary = summarize(records)
    assert summary["window_s"] == pytest.approx(4.0)  # first start (0 s) to last end (4 s)
    throughput = summary["throughput"]
    assert throughput["requests_per_s"] == pytest.approx(4 / 4.0)
    assert throughput["images_per_s"] == pytest.approx(8 / 4.0)
    assert throughput["output_tokens_per_s"] == pytest.approx(120 / 4.0)
    assert summary["images"] == {"sent": 10, "reused": 0, "reuse_ratio": 0.0}


def test_ttft_tpot_and_server_timings() -> None:
    records = [
        _record(0, 110.0, ttft_ms=20.0, output_tokens=10, output_tokens_source="usage",
                server_timings_ms={"encode": 30.0, "generate": 70.0}),
        _record(1, 210.0, ttft_ms=30.0, output_tokens=10, output_tokens_source="chunks",
                server_timings_ms={"encode": 50.0}),
        _record(2, 50.0, ttft_ms=50.0, output_tokens=1),  # one token: no TPOT
        _record(3, 9.0, outcome="error", error_type="HTTPStatus", status_code=503,
                server_timings_ms={"encode": 1000.0}),  # failed: its timings are left out
    ]
    summary = summarize(records)
    assert summary["ttft_ms"]["count"] == 3
    assert summary["ttft_ms"]["p50"] == pytest.approx(30.0)
    assert summary["tpot_ms"]["count"] == 2
    assert summary["tpot_ms"]["mean"] == pytest.approx(((110 - 20) / 9 + (210 - 30) / 9) / 2)
    assert summary["server_timings_ms"]["encode"]["mean"] == pytest.approx(40.0)
    assert summary["server_timings_ms"]["encode"]["count"] == 2
    assert summary["server_timings_ms"]["generate"]["mean"] == pytest.approx(70.0)
    assert summary["output_tokens"] == {"total": 21, "mean": 7.0, "estimated_from_chunks": 1}


def test_a_point_where_everything_failed_has_no_distributions_and_zero_throughput() -> None:
    records = [_record(i, 10.0, start_s=i, outcome="timeout", error_type="RequestTimeout") for i in range(3)]
    summary = summarize(records)
    assert summary["latency_ms"] is None and summary["ttft_ms"] is None
    assert summary["throughput"]["requests_per_s"] == 0.0
    assert summary["throughput"]["output_tokens_per_s"] is None
    assert summarize([])["requests"]["sent"] == 0


def test_schedule_lag_is_start_minus_scheduled_time() -> None:
    rng = random.Random(3)
    lags_ms = [rng.uniform(0, 5) for _ in range(50)]
    records = [_record(i, 10.0, start_s=i + lag / 1000.0, scheduled_s=float(i)) for i, lag in enumerate(lags_ms)]
    summary = summarize(records)
    assert summary["schedule_lag_ms"]["mean"] == pytest.approx(sum(lags_ms) / len(lags_ms), abs=1e-6)
    assert summarize(records[:1] + [_record(9, 1.0)])["schedule_lag_ms"]["count"] == 1


def test_records_reject_an_unknown_outcome_and_survive_the_wire() -> None:
    with pytest.raises(ValueError, match="outcome"):
        _record(0, 1.0, outcome="skipped")
    record = _record(5, 12.5, ttft_ms=3.0, server_timings_ms={"encode": 1.5}, image_ids=["ab", "cd"])
    wire = record.to_wire()
    assert math.isclose(wire["latency_ms"], 12.5)
    assert RequestRecord.from_wire(wire) == record
