"""Request bodies built ahead of time, in a worker thread, and handed out in order.

Encoding images (PNG, base64, JSON) costs milliseconds of CPU per request; done on the
event loop at send time it would delay every other request's reading of its response
and show up as server latency. The feed keeps up to ``capacity`` requests ready, and the
runner waits for it to fill before each load point, so a count-mode run that fits in
the capacity does no encoding at all while it measures. ``waits`` counts the sends that
found the feed empty: when it is not zero, the client, not the server, set the pace.
"""

from __future__ import annotations

import asyncio

from services.loadtest.workload import RequestSpec, Workload

__all__ = ["SpecFeed"]


class SpecFeed:
    """Request bodies built ahead in a worker thread, handed out in order.

    The producer builds only what it has been allowed (``allow``): in count mode the
    runner allows each load point's requests just before the point, so no encoding for
    later points competes with the current point's measurement. A producer failure (an
    image file vanished) is re-raised to the consumer: it is a client problem, so it
    stops the run instead of being recorded as a server error.
    """

    def __init__(self, workload: Workload, capacity: int) -> None:
        self.workload = workload
        self.waits = 0
        self._queue: asyncio.Queue[RequestSpec] = asyncio.Queue(capacity)
        self._allowed: int | None = 0  # None: no limit (duration mode)
        self._produced = 0
        self._handed_out = 0
        self._changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._produce())

    async def allow(self, count: int | None) -> None:
        """Let the producer build ``count`` more requests (None: as many as are asked for)."""
        async with self._changed:
            self._allowed = None if count is None or self._allowed is None else self._allowed + count
            self._changed.notify_all()

    def _may_produce(self) -> bool:
        return self._allowed is None or self._produced < self._allowed

    async def _produce(self) -> None:
        try:
            while True:
                async with self._changed:
                    await self._changed.wait_for(self._may_produce)
                spec = await asyncio.to_thread(self.workload.next_request)
                await self._queue.put(spec)
                async with self._changed:
                    self._produced += 1
                    self._changed.notify_all()
        finally:
            # Wake fill() also when production stopped (failed, or cancelled).
            async with self._changed:
                self._changed.notify_all()

    def _task_started(self) -> asyncio.Task[None]:
        if self._task is None:
            raise RuntimeError("SpecFeed.start() was not called")
        return self._task

    async def fill(self, count: int) -> None:
        """Wait until ``count`` requests (at most the capacity) are ready."""
        task = self._task_started()
        target = min(count, self._queue.maxsize)
        async with self._changed:
            await self._changed.wait_for(lambda: self._queue.qsize() >= target or task.done())
        if task.done():
            task.result()  # raises the producer's exception
            raise RuntimeError("the request producer stopped")

    async def get(self) -> RequestSpec:
        task = self._task_started()
        if self._allowed is not None and self._handed_out >= self._allowed:
            raise RuntimeError(f"asked for request {self._handed_out + 1}, only {self._allowed} allowed")
        self._handed_out += 1
        if not self._queue.empty():
            return self._queue.get_nowait()
        self.waits += 1
        getter = asyncio.ensure_future(self._queue.get())
        await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
        if getter.done():
            return getter.result()
        getter.cancel()
        task.result()  # the producer failed: raise why
        raise RuntimeError("the request producer stopped")

    async def close(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
