"""The runner against the mock OpenAI-compatible server, in-process (httpx ASGITransport).

The mock answers by a script of arrival numbers, so each test knows how many requests
should have failed, and how: the records must say exactly that, and add up.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import statistics
import time
from collections import Counter

import httpx
import pytest

from services.loadtest.images import EncodedImage, GeneratedImages
from services.loadtest.mock_server import MockServerConfig, create_app
from services.loadtest.runner import (
    LoadPoint,
    LoadTester,
    PointResult,
    RunSettings,
    arrival_offsets,
)
from services.loadtest.stats import summarize
from services.loadtest.workload import Workload, WorkloadConfig

PATHS = {"chat": "/v1/chat/completions", "captions": "/v1/captions"}


def _tester(mock: MockServerConfig | None = None, *, transport: httpx.AsyncBaseTransport | None = None,
            workload: dict | None = None, **settings: object) -> LoadTester:
    workload_config = WorkloadConfig(**{"model": "mock-model", **(workload or {})})
    run_settings = RunSettings(**{"url": f"http://mock{PATHS[workload_config.endpoint]}",
                                  "endpoint": workload_config.endpoint, "requests": 12, "warmup_requests": 2,
                                  "timeout_s": 5.0, "progress": False, **settings})
    source = GeneratedImages("noise", image_size=8)
    return LoadTester(run_settings, Workload(workload_config, source),
                      transport=transport or httpx.ASGITransport(create_app(mock or MockServerConfig())))


def _measured(result: PointResult) -> list:
    return [record for record in result.records if not record.warmup]


def _assert_accounted(result: PointResult, planned: int | None) -> dict:
    summary = summarize(result.records, not_sent=result.not_sent)
    counts = summary["requests"]
    assert counts["ok"] + counts["error"] + counts["timeout"] == counts["sent"] == len(_measured(result))
    if planned is not None:
        assert counts["sent"] + counts["not_sent"] == planned
    assert len({record.index for record in result.records}) == len(result.records)  # no request twice
    return summary


def test_poisson_arrivals_have_the_requested_rate_and_exponential_gaps() -> None:
    offsets = list(zip(range(5000), arrival_offsets(20.0, random.Random(11)), strict=False))
    gaps = [b - a for (_, a), (_, b) in zip(offsets, offsets[1:], strict=False)]
    mean_gap = statistics.fmean(gaps)
    assert mean_gap == pytest.approx(1 / 20.0, rel=0.10)
    # Exponential: standard deviation equal to the mean (a fixed-interval schedule gives 0).
    assert statistics.pstdev(gaps) / mean_gap == pytest.approx(1.0, rel=0.10)
    assert all(gap >= 0 for gap in gaps)
    again = [offset for _, offset in zip(range(5), arrival_offsets(20.0, random.Random(11)), strict=False)]
    assert again == [offset for _, offset in offsets[:5]]  # seeded: the same schedule every run
    burst = arrival_offsets(math.inf, random.Random(0))
    assert [next(burst) for _ in range(3)] == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("stream", [False, True])
async def test_closed_loop_sweep_records_every_request(stream: bool) -> None:
    mock = MockServerConfig(tokens=4)
    tester = _tester(mock, workload={"stream": stream, "max_tokens": 16})
    results = await tester.run([LoadPoint(concurrency=1), LoadPoint(concurrency=3)])
    assert [result.point.concurrency for result in results] == [1, 3]
    assert sum(mock.answered.values()) == 2 * (12 + 2)  # every request reached the server once
    for result in results:
        summary = _assert_accounted(result, planned=12)
        assert summary["requests"] == {"sent": 12, "ok": 12, "error": 0, "timeout": 0, "not_sent": 0, "warmup": 2}
        for record in _measured(result):
            assert (record.output_tokens, record.output_tokens_source, record.status_code) == (4, "usage", 200)
            assert record.server_timings_ms["encode"] == pytest.approx(2.0)
            assert (record.ttft_ms is not None) == stream
            if stream:
                assert 0 <= record.ttft_ms <= record.latency_ms
        assert not result.deadline_hit
    # One workload for the sweep: the second point's images are new, not the first's again.
    first, second = ({image for record in result.records for image in record.image_ids} for result in results)
    assert not first & second


async def test_failures_timeouts_and_bad_bodies_are_all_accounted_for() -> None:
    mock = MockServerConfig(hang_every=5, hang_s=10.0, fail_every=3, reject_every=4, malformed_every=7)
    tester = _tester(mock, requests=35, warmup_requests=0, timeout_s=0.2)
    started = time.perf_counter()
    (result,) = await tester.run([LoadPoint(concurrency=4)])
    assert time.perf_counter() - started < 5.0  # hung requests cost their timeout, not the mock's 10 s
    expected = Counter(mock.behaviour(arrival) for arrival in range(1, 36))
    assert mock.answered == expected
    summary = _assert_accounted(result, planned=35)
    assert summary["requests"]["ok"] == expected["ok"]
    assert summary["requests"]["timeout"] == expected["hang"]
    assert summary["errors_by_type"] == {name: count for name, count in (
        ("HTTPStatus", expected["500"] + expected["429"]), ("RequestTimeout", expected["hang"]),
        ("InvalidResponse", expected["malformed"])) if count}
    assert summary["errors_by_status"] == {"500": expected["500"], "429": expected["429"], "200": expected["malformed"]}
    timed_out = [record for record in result.records if record.outcome == "timeout"]
    assert all(190 <= record.latency_ms < 2000 for record in timed_out)


@pytest.mark.parametrize("max_concurrency", [None, 2])
async def test_rate_mode_follows_its_schedule(max_concurrency: int | None) -> None:
    tester = _tester(MockServerConfig(tokens=2), requests=30, warmup_requests=1, seed=4)
    (result,) = await tester.run([LoadPoint(rate_per_s=400.0, max_concurrency=max_concurrency)])
    _assert_accounted(result, planned=30)
    measured = _measured(result)
    assert all(record.ok for record in measured)
    assert all(record.scheduled_s is not None for record in measured)
    assert all(record.scheduled_s is None for record in result.records if record.warmup)
    # Never early: a request waits for its scheduled time (lateness is the client's, and recorded).
    assert all(record.start_s >= record.scheduled_s - 1e-6 for record in measured)
    scheduled = sorted(record.scheduled_s for record in measured)
    expected = [offset for _, offset in zip(range(30), arrival_offsets(400.0, random.Random("4:0")), strict=False)]
    assert scheduled == pytest.approx([scheduled[0] - expected[0] + offset for offset in expected])


async def test_duration_mode_stops_by_itself() -> None:
    tester = _tester(MockServerConfig(tokens=4, token_interval_s=0.005), requests=None, duration_s=0.3)
    started = time.perf_counter()
    (result,) = await tester.run([LoadPoint(concurrency=2)])
    assert time.perf_counter() - started < 3.0
    measured = _measured(result)
    assert len(measured) >= 2
    _assert_accounted(result, planned=None)
    first_start = min(record.start_s for record in measured)
    assert all(record.start_s <= first_start + 0.3 + 0.05 for record in measured)


@pytest.mark.parametrize("point", [LoadPoint(concurrency=2), LoadPoint(rate_per_s=math.inf)])
async def test_hard_deadline_cuts_off_hung_requests(point: LoadPoint) -> None:
    tester = _tester(MockServerConfig(hang_every=1, hang_s=30.0), requests=10, warmup_requests=0,
                     timeout_s=20.0, max_run_s=0.3)
    started = time.perf_counter()
    (result,) = await tester.run([point])
    assert time.perf_counter() - started < 3.0
    summary = _assert_accounted(result, planned=10)
    assert summary["requests"]["timeout"] == summary["requests"]["sent"] > 0
    assert set(summary["errors_by_type"]) == {"RunDeadline"}
    assert result.deadline_hit
    if point.concurrency:
        assert (summary["requests"]["sent"], result.not_sent) == (2, 8)


async def test_cancelled_run_still_records_the_requests_in_flight() -> None:
    mock = MockServerConfig(hang_every=1, hang_s=30.0)
    tester = _tester(mock, requests=10, warmup_requests=0)
    run = asyncio.create_task(tester.run([LoadPoint(concurrency=3)]))
    deadline = time.monotonic() + 5.0
    while sum(mock.answered.values()) < 3 and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    (result,) = tester.results
    assert [record.error_type for record in result.records] == ["Cancelled"] * 3
    _assert_accounted(result, planned=None)


async def test_captions_endpoint_multipart_and_json() -> None:
    for body in ("multipart", "json"):
        tester = _tester(workload={"endpoint": "captions", "images_per_request": 2, "captions_body": body},
                         requests=4, warmup_requests=0)
        (result,) = await tester.run([LoadPoint(concurrency=2)])
        summary = _assert_accounted(result, planned=4)
        assert summary["requests"]["ok"] == 4, summary["error_examples"]
        assert summary["throughput"]["images_per_s"] == pytest.approx(2 * summary["throughput"]["requests_per_s"])
        assert summary["server_timings_ms"]["encode"]["mean"] == pytest.approx(4.0)  # the body's encode_ms


async def test_transport_failures_are_recorded_and_unexpected_ones_logged_once(caplog) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    (result,) = await _tester(transport=httpx.MockTransport(refuse), requests=3, warmup_requests=0).run(
        [LoadPoint(concurrency=1)])
    assert [(r.outcome, r.error_type, r.error_message) for r in result.records] == [
        ("error", "ConnectError", "connection refused")] * 3

    def broken(request: httpx.Request) -> httpx.Response:
        raise RuntimeError("a bug in a transport")

    with caplog.at_level(logging.WARNING, logger="services.loadtest.client"):
        (result,) = await _tester(transport=httpx.MockTransport(broken), requests=3, warmup_requests=0).run(
            [LoadPoint(concurrency=1)])
    assert [record.error_type for record in result.records] == ["RuntimeError"] * 3
    assert len([entry for entry in caplog.records if "RuntimeError" in entry.getMessage()]) == 1


class _FailingSource:
    """Images until the third, then a vanished file."""

    def image(self, fresh_index: int) -> EncodedImage:
        if fresh_index >= 3:
            raise FileNotFoundError(f"image {fresh_index} vanished")
        return EncodedImage.from_bytes(bytes([fresh_index]) * 16, "image/png")

    def describe(self) -> dict:
        return {"source": "failing"}


async def test_a_workload_failure_stops_the_run_instead_of_passing_for_a_server_error() -> None:
    tester = _tester(requests=10, warmup_requests=0)
    tester.workload = Workload(WorkloadConfig(model="mock-model"), _FailingSource())
    with pytest.raises(FileNotFoundError, match="vanished"):
        await tester.run([LoadPoint(concurrency=1)])
