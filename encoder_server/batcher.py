"""Dynamic batching with Triton's semantics, on a dedicated worker thread per device.

Requests wait in a bounded FIFO queue. The worker takes the oldest request and adds
the next ones of the same pixel shape while the batch stays within
``max_batch_size`` images; it runs the forward as soon as the batch is full (or the
next request would overflow it), or once ``max_queue_delay_ms`` have passed since
the oldest request was queued. One forward serves the whole batch and each request
gets its own rows back. This is the behaviour of Triton's dynamic batcher (with
``max_queue_size`` and a per-request timeout that rejects), so a deployment can move
between this server and Triton without retuning.

The forward runs on a plain thread, never on the event loop: a 100 ms forward would
otherwise stall every HTTP connection (health checks included) for 100 ms. Only one
forward is in flight per device, so the GPU/CPU is never oversubscribed, and while it
runs the event loop keeps accepting and preprocessing the next requests.

`Batcher` is the small interface the service depends on; a Triton-backed batcher
(send ``PIXELS`` to a Triton server, let its scheduler batch) is another class with
the same four members.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from encoder_server.errors import (
    InvalidRequest,
    NotReady,
    QueueFull,
    RequestTimeout,
    ServerError,
)

__all__ = ["BatchResult", "Batcher", "BatcherConfig", "DynamicBatcher", "ForwardFn"]

logger = logging.getLogger(__name__)

# pixels [B, 3, H, W] -> features [B, L, C], on the CPU. Called on the worker thread only.
ForwardFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class BatcherConfig:
    """Batching knobs, named as in Triton's ``dynamic_batching`` block."""

    max_batch_size: int = 8
    max_queue_delay_ms: float = 0.0
    max_queue_size: int = 256  # requests waiting (not counting the batch in flight)
    default_timeout_s: float | None = 60.0  # queue wait + forward; None waits forever

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.max_queue_delay_ms < 0:
            raise ValueError(f"max_queue_delay_ms must be >= 0, got {self.max_queue_delay_ms}")
        if self.max_queue_size < 1:
            raise ValueError(f"max_queue_size must be >= 1, got {self.max_queue_size}")
        if self.default_timeout_s is not None and self.default_timeout_s <= 0:
            raise ValueError(f"default_timeout_s must be > 0, got {self.default_timeout_s}")


@dataclass(frozen=True)
class BatchResult:
    """One request's share of a batched forward."""

    features: torch.Tensor  # [n, L, C] on the CPU: this request's rows, in order
    queue_ms: float  # queued -> its batch's forward started
    forward_ms: float  # the whole batch's forward (shared with the other requests)
    batch_size: int  # images in that forward


class Batcher(Protocol):
    """What the service needs from a batcher: start, stop, submit, and a queue depth."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def submit(self, pixels: torch.Tensor, *, timeout_s: float | None = None) -> BatchResult:
        """Queue ``pixels`` [n, 3, H, W]; resolve with this request's features."""
        ...

    @property
    def queue_depth(self) -> int: ...


@dataclass(eq=False)  # identity equality: deque.remove must find this very request
class _Pending:
    pixels: torch.Tensor  # [n, 3, H, W]
    future: asyncio.Future[BatchResult]
    loop: asyncio.AbstractEventLoop
    enqueued_at: float
    deadline: float | None
    abandoned: bool = field(default=False)  # set by the event loop: timed out or cancelled

    @property
    def count(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def shape_key(self) -> tuple[object, ...]:
        return (*self.pixels.shape[1:], self.pixels.dtype)


class DynamicBatcher:
    """Triton-style dynamic batcher around a synchronous ``forward`` on one worker thread.

    ``on_batch(images, forward_s)`` is called on the worker thread after every
    successful forward (metrics). A request with more images than ``max_batch_size``
    runs alone, in chunks of ``max_batch_size``, so no forward ever exceeds it.
    """

    def __init__(self, forward: ForwardFn, config: BatcherConfig, *, name: str = "encoder",
                 on_batch: Callable[[int, float], None] | None = None) -> None:
        self.forward = forward
        self.config = config
        self.name = name
        self.on_batch = on_batch
        self._queue: deque[_Pending] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False

    # ---- the event-loop side ----------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    async def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError(f"batcher {self.name!r} was already started")
        self._thread = threading.Thread(target=self._work, name=f"{self.name}-batcher", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        """Stop taking requests, run what is queued (no delay), then end the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)

    async def submit(self, pixels: torch.Tensor, *, timeout_s: float | None = None) -> BatchResult:
        if pixels.dim() != 4 or pixels.shape[0] == 0:
            raise InvalidRequest(f"expected pixels [n >= 1, 3, H, W], got {list(pixels.shape)}",
                                 field="pixels")
        timeout = self.config.default_timeout_s if timeout_s is None else timeout_s
        if timeout is not None and timeout <= 0:
            raise InvalidRequest(f"timeout must be > 0 s, got {timeout}", field="timeout", value=timeout)
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        item = _Pending(pixels, loop.create_future(), loop, now, now + timeout if timeout is not None else None)
        with self._cond:  # checked under the lock: a stopping worker drains what it holds
            if not self.running:
                raise NotReady(f"the {self.name} batcher is not running", retry_after_s=1.0)
            if len(self._queue) >= self.config.max_queue_size:
                raise QueueFull(
                    f"the request queue is full ({self.config.max_queue_size} requests waiting); "
                    "retry later or raise --max-queue-size",
                    field="queue", value=len(self._queue), retry_after_s=1.0,
                )
            self._queue.append(item)
            self._cond.notify()
        try:
            return await asyncio.wait_for(item.future, timeout)
        except asyncio.TimeoutError:
            self._abandon(item)
            raise RequestTimeout(f"no result within the request timeout of {timeout:g} s",
                                 field="timeout", value=timeout) from None
        except asyncio.CancelledError:  # the client went away: don't spend a forward on it
            self._abandon(item)
            raise

    def _abandon(self, item: _Pending) -> None:
        item.abandoned = True
        with self._cond:
            if item in self._queue:  # else the worker already took it; its result is dropped
                self._queue.remove(item)

    # ---- the worker thread ------------------------------------------------------------

    def _work(self) -> None:
        try:
            while True:
                batch = self._next_batch()
                if batch is None:
                    return
                self._run(batch)
        except BaseException:
            # A bug in the batcher itself (forward errors are handled in _run): fail what
            # is queued instead of letting it hang, and stop, so /ready turns 503.
            logger.critical("the %s batcher thread died", self.name, exc_info=True)
            with self._cond:
                self._stopping = True
                orphans = list(self._queue)
                self._queue.clear()
            for item in orphans:
                self._settle(item, error=NotReady(f"the {self.name} batcher stopped unexpectedly"))
            raise

    def _next_batch(self) -> list[_Pending] | None:
        """Block until a batch is due under the delay rule; None once stopped and drained."""
        delay_s = self.config.max_queue_delay_ms / 1000.0
        with self._cond:
            while True:
                self._drop_dead()
                if not self._queue:
                    if self._stopping:
                        return None
                    self._cond.wait()
                    continue
                batch, full = self._gather()
                due_at = self._queue[0].enqueued_at + delay_s
                remaining = due_at - time.monotonic()
                if full or remaining <= 0 or self._stopping:
                    for item in batch:
                        self._queue.remove(item)
                    return batch
                self._cond.wait(remaining)

    def _drop_dead(self) -> None:
        """Remove abandoned and expired requests (called with the lock held)."""
        now = time.monotonic()
        expired = [i for i in self._queue
                   if i.abandoned or (i.deadline is not None and now >= i.deadline)]
        for item in expired:
            self._queue.remove(item)
            if not item.abandoned and item.deadline is not None:
                timeout = item.deadline - item.enqueued_at
                self._settle(item, error=RequestTimeout(
                    f"no result within the request timeout of {timeout:g} s (expired in the queue)",
                    field="timeout", value=round(timeout, 3)))

    def _gather(self) -> tuple[list[_Pending], bool]:
        """The oldest request plus same-shape followers in FIFO order; and whether full."""
        limit = self.config.max_batch_size
        oldest = self._queue[0]
        batch, images = [oldest], oldest.count
        if images >= limit:
            return batch, True
        for item in list(self._queue)[1:]:
            if item.shape_key != oldest.shape_key:
                continue  # another resolution: it leads a later batch
            if images + item.count > limit:
                return batch, True  # FIFO: nobody jumps this request, so the batch is done
            batch.append(item)
            images += item.count
            if images == limit:
                return batch, True
        return batch, False

    def _run(self, batch: list[_Pending]) -> None:
        started = time.monotonic()
        counts = [item.count for item in batch]
        try:
            pixels = torch.cat([item.pixels for item in batch]) if len(batch) > 1 else batch[0].pixels
            chunks = pixels.split(self.config.max_batch_size)  # >1 chunk only for one big request
            features = torch.cat([self.forward(chunk) for chunk in chunks])  # [B, L, C]
            if features.shape[0] != pixels.shape[0]:
                raise RuntimeError(f"forward returned {features.shape[0]} rows for "
                                   f"{pixels.shape[0]} images")
        except Exception as exc:  # every request in this batch gets it; the thread lives on
            logger.exception("%s forward failed for a batch of %d images", self.name, sum(counts))
            # The traceback is logged here, once; clients get a 500 that names the
            # exception type only (internals stay in the log), with the cause chained.
            failure = ServerError(f"the model forward failed ({type(exc).__name__}); "
                                  "the server log has the traceback", field="forward")
            failure.__cause__ = exc
            for item in batch:
                self._settle(item, error=failure)
            return
        finished = time.monotonic()
        forward_ms = (finished - started) * 1000.0
        if self.on_batch is not None:
            self.on_batch(sum(counts), finished - started)
        for item, rows in zip(batch, features.split(counts), strict=True):
            self._settle(item, result=BatchResult(rows, (started - item.enqueued_at) * 1000.0,
                                                  forward_ms, sum(counts)))

    @staticmethod
    def _settle(item: _Pending, *, result: BatchResult | None = None,
                error: BaseException | None = None) -> None:
        """Hand a result to the request's event loop (futures are not thread-safe)."""
        if item.abandoned or item.loop.is_closed():
            return

        def deliver() -> None:
            if item.future.done():  # timed out or cancelled meanwhile
                return
            if error is not None:
                item.future.set_exception(error)
            else:
                item.future.set_result(result)  # type: ignore[arg-type]

        item.loop.call_soon_threadsafe(deliver)
