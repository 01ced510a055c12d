"""The dynamic batcher: Triton's batching rules, splitting, limits, timeouts, failures.

The forward is a stand-in that records batch sizes and can be held on a gate, so
requests pile up deterministically while a batch is "running" — no sleeps decide
what a test observes. Each request's pixels hold one value, and the stand-in returns
per-image channel means, so every row of a result says which request it came from.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import pytest
import torch

from encoder_server.batcher import BatcherConfig, DynamicBatcher
from encoder_server.errors import NotReady, QueueFull, RequestTimeout, ServerError

pytestmark = pytest.mark.anyio


class GatedForward:
    """forward(pixels [B, 3, H, W]) -> [B, 1, 3]; waits on `gate`, records batch sizes."""

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.fail_on_value: float | None = None

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        self.batches.append(int(pixels.shape[0]))
        self.entered.set()
        assert self.gate.wait(10), "test never opened the gate"
        if self.fail_on_value is not None and bool((pixels == self.fail_on_value).any()):
            raise RuntimeError("injected forward failure")
        return pixels.mean(dim=(2, 3)).unsqueeze(1)  # [B, 1, 3]


def pixels(value: float, count: int = 1, side: int = 2) -> torch.Tensor:
    return torch.full((count, 3, side, side), float(value))


async def wait_until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Yield to the loop until `condition` holds (a bounded wait on state, not a sleep)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.001)


async def hold_worker(batcher: DynamicBatcher, forward: GatedForward) -> asyncio.Task:
    """Close the gate and occupy the worker with one request, so later ones queue up."""
    forward.gate.clear()
    forward.entered.clear()
    blocker = asyncio.create_task(batcher.submit(pixels(-1.0)))
    await wait_until(forward.entered.is_set)
    return blocker


def make(forward: GatedForward, **config: float) -> DynamicBatcher:
    return DynamicBatcher(forward, BatcherConfig(**config), name="test")  # type: ignore[arg-type]


async def test_requests_batch_together_and_get_their_own_rows_back() -> None:
    forward = GatedForward()
    batcher = make(forward, max_batch_size=8, max_queue_delay_ms=50)
    await batcher.start()
    blocker = await hold_worker(batcher, forward)
    tasks = [asyncio.create_task(batcher.submit(pixels(value, count)))
             for value, count in ((1, 1), (2, 2), (3, 3))]
    await wait_until(lambda: batcher.queue_depth == 3)
    forward.gate.set()
    results = await asyncio.gather(*tasks)
    await blocker
    assert forward.batches == [1, 6]
    for (value, count), result in zip(((1, 1), (2, 2), (3, 3)), results, strict=True):
        assert result.features.shape == (count, 1, 3)
        assert torch.equal(result.features, torch.full((count, 1, 3), float(value)))
        assert result.batch_size == 6
    await batcher.stop()


async def test_a_full_batch_runs_without_waiting_for_the_delay() -> None:
    forward = GatedForward()
    batcher = make(forward, max_batch_size=4, max_queue_delay_ms=30_000)
    await batcher.start()
    started = time.monotonic()
    results = await asyncio.gather(*(batcher.submit(pixels(i)) for i in range(4)))
    assert time.monotonic() - started < 15.0  # far below the 30 s delay
    assert forward.batches == [4]
    assert [float(r.features[0, 0, 0]) for r in results] == [0.0, 1.0, 2.0, 3.0]
    await batcher.stop()


async def test_a_partial_batch_waits_for_the_delay_from_the_oldest_request() -> None:
    forward = GatedForward()
    batcher = make(forward, max_batch_size=8, max_queue_delay_ms=150)
    await batcher.start()
    started = time.monotonic()
    first, second = await asyncio.gather(batcher.submit(pixels(1)), batcher.submit(pixels(2)))
    assert time.monotonic() - started >= 0.14
    assert forward.batches == [2]
    assert first.queue_ms >= 140.0
    await batcher.stop()


async def test_zero_delay_runs_whatever_is_queued_when_the_worker_frees_up() -> None:
    forward = GatedForward()
    batcher = make(forward, max_batch_size=8, max_queue_delay_ms=0)
    await batcher.start()
    blocker = await hold_worker(batcher, forward)
    tasks = [asyncio.create_task(batcher.submit(pixels(i))) for i in range(3)]
    await wait_until(lambda: batcher.queue_depth == 3)
    forward.gate.set()
    await asyncio.gather(blocker, *tasks)
    assert forward.batches == [1, 3]
    await batcher.stop()


async def test_a_request_that_would_overflow_the_batch_waits_for_the_next_one() -> None:
    forward = GatedForward()
    batcher = make(forward, max_batch_size=4, max_queue_delay_ms=0)
    await batcher.start()
    blocker = await hold_worker(batcher, forward)
    tasks = [asyncio.create_task(batcher.submit(pixels(value, count)))
             for value, count in ((1, 3), (2, 2), (3, 1))]
    await wait_until(lambda: batcher.queue_depth == 3)
    forward.gate.set()
    await asyncio.gather(blocker, *tasks)
    assert forward.batches == [1, 3, 3]  # FIFO: the 1-image request does not jump the 2-image one
    await batcher.stop()


async def test_a_request_larger_than_max_batch_size_runs_in_chunks() -> None:
    forward = GatedForward()
    batcher = make(forward, max_batch_size=4, max_queue_delay_ms=0)
    await batcher.start()
    request = torch.arange(10, dtype=torch.float32).view(10, 1, 1, 1).expand(10, 3, 2, 2)
    result = await batcher.submit(request)
    assert forward.batches == [4, 4, 2]
    assert result.features[:, 0, 0].tolist() == [float(i) for i in range(10)]
    await batcher.stop()


async def test_different_resolutions_never_share_a_forward() -> None:
    forward = GatedForward()
    batcher = make(forward, max_batch_size=8, max_queue_delay_ms=0)
    await batcher.start()
    blocker = await hold_worker(batcher, forward)
    small_a = asyncio.create_task(batcher.submit(pixels(1, side=2)))
    large = asyncio.create_task(batcher.submit(pixels(2, side=4)))
    small_b = asyncio.create_task(batcher.submit(pixels(3, side=2)))
    await wait_until(lambda: batcher.queue_depth == 3)
    forward.gate.set()
    await asyncio.gather(blocker, small_a, large, small_b)
    assert forward.batches == [1, 2, 1]
    assert float(large.result().features[0, 0, 0]) == 2.0
    assert float(small_b.result().features[0, 0, 0]) == 3.0
    await batcher.stop()


async def test_a_full_queue_refuses_with_503_and_recovers() -> None:
    forward = GatedForward()
    batcher = make(forward, max_batch_size=1, max_queue_delay_ms=0, max_queue_size=2)
    await batcher.start()
    blocker = await hold_worker(batcher, forward)
    queued = [asyncio.create_task(batcher.submit(pixels(i))) for i in range(2)]
    await wait_until(lambda: batcher.queue_depth == 2)
    with pytest.raises(QueueFull) as refused:
        await batcher.submit(pixels(9))
    assert refused.value.http_status == 503
    assert "queue is full" in str(refused.value)
    forward.gate.set()
    await asyncio.gather(blocker, *queued)
    assert (await batcher.submit(pixels(5))).features.shape == (1, 1, 3)
    await batcher.stop()


async def test_a_request_that_times_out_in_the_queue_is_never_run() -> None:
    forward = GatedForward()
    batcher = make(forward, max_batch_size=8, max_queue_delay_ms=0, default_timeout_s=None)
    await batcher.start()
    blocker = await hold_worker(batcher, forward)
    with pytest.raises(RequestTimeout) as timed_out:
        await batcher.submit(pixels(7), timeout_s=0.05)
    assert timed_out.value.http_status == 504
    assert batcher.queue_depth == 0
    forward.gate.set()
    await blocker
    assert (await batcher.submit(pixels(8))).features[0, 0, 0] == 8.0
    assert forward.batches == [1, 1]  # the blocker, then the last request: never the expired one
    await batcher.stop()


async def test_a_cancelled_request_leaves_the_queue() -> None:
    forward = GatedForward()
    batcher = make(forward, max_batch_size=8, max_queue_delay_ms=0)
    await batcher.start()
    blocker = await hold_worker(batcher, forward)
    gone = asyncio.create_task(batcher.submit(pixels(4)))
    await wait_until(lambda: batcher.queue_depth == 1)
    gone.cancel()
    await wait_until(lambda: batcher.queue_depth == 0)
    forward.gate.set()
    await blocker
    assert forward.batches == [1]
    await batcher.stop()


async def test_a_forward_error_fails_its_batch_only_and_the_worker_carries_on() -> None:
    forward = GatedForward()
    forward.fail_on_value = 13.0
    batcher = make(forward, max_batch_size=8, max_queue_delay_ms=0)
    await batcher.start()
    blocker = await hold_worker(batcher, forward)
    bad = asyncio.create_task(batcher.submit(pixels(13, side=2)))
    good = asyncio.create_task(batcher.submit(pixels(1, side=4)))  # another shape: its own batch
    await wait_until(lambda: batcher.queue_depth == 2)
    forward.gate.set()
    await blocker
    with pytest.raises(ServerError) as failed:
        await bad
    assert failed.value.http_status == 500
    assert isinstance(failed.value.__cause__, RuntimeError)
    assert "RuntimeError" in str(failed.value) and "injected" not in str(failed.value)
    assert float((await good).features[0, 0, 0]) == 1.0
    assert float((await batcher.submit(pixels(2))).features[0, 0, 0]) == 2.0
    await batcher.stop()


async def test_stop_drains_the_queue_then_refuses_new_requests() -> None:
    forward = GatedForward()
    batcher = make(forward, max_batch_size=8, max_queue_delay_ms=30_000)
    await batcher.start()
    pending = asyncio.create_task(batcher.submit(pixels(3)))
    await wait_until(lambda: forward.batches == [] and batcher.queue_depth == 1)
    await batcher.stop()  # does not wait out the 30 s delay
    assert float((await pending).features[0, 0, 0]) == 3.0
    with pytest.raises(NotReady):
        await batcher.submit(pixels(4))


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="max_batch_size"):
        BatcherConfig(max_batch_size=0)
    with pytest.raises(ValueError, match="max_queue_size"):
        BatcherConfig(max_queue_size=0)
    with pytest.raises(ValueError, match="max_queue_delay_ms"):
        BatcherConfig(max_queue_delay_ms=-1)
