"""What a request becomes inside the engine, and what comes back out of it.

* :class:`SequenceRequest` — a validated request, ready to schedule (serving builds it);
* :class:`ScheduledSequence` — the engine's record of it (slot, output, timestamps);
* :class:`StreamEvent` — one step's tokens for the caller, the last one with the
  finish reason, usage and timings;
* :class:`GenerationStream` — the caller's handle: an async iterator of events,
  ``collect()`` for the whole response, ``cancel()`` for a client that went away;
* :class:`EventOutbox` — how the engine thread hands events to the callers' loops;
* :class:`SchedulerObserver` — the hooks metrics hang on, so the scheduler does not
  know about Prometheus.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from lm_worker.sampling import FINISH_ABORT, SamplingState, SequenceOutput
from proto import GenerateResponse, ImageForInsert, SamplingParams

__all__ = [
    "EventOutbox",
    "GenerationStream",
    "NullObserver",
    "ScheduledSequence",
    "SchedulerObserver",
    "SequenceRequest",
    "StreamEvent",
]

logger = logging.getLogger(__name__)


@dataclass
class SequenceRequest:
    """A request the scheduler can run without further checks.

    ``prompt_ids`` has the template applied and every image's placeholders laid out;
    ``images`` hold validated features, one ``ImageForInsert`` per start-token kind.
    ``arrival_s`` is ``time.perf_counter()`` when the request arrived, so queue time
    and time to first token include parsing; ``timings`` holds stages measured before
    scheduling (``preprocess_ms``). Without ``stream`` the engine holds the tokens and
    sends them with the final event: one hand-off to the caller's event loop per request
    instead of one per step.
    """

    request_id: str
    prompt_ids: list[int]
    images: list[ImageForInsert] = field(default_factory=list)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    arrival_s: float = field(default_factory=time.perf_counter)
    timings: dict[str, float] = field(default_factory=dict)
    stream: bool = True
    prefix_keys: list[bytes] = field(default_factory=list)  # lm_worker.prefix_cache.prefix_block_keys


@dataclass(frozen=True)
class StreamEvent:
    """New tokens of one step; the final event also has ``finish_reason`` and usage."""

    token_ids: list[int]
    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    cached_tokens: int = 0  # prompt tokens the prefix cache supplied

    @property
    def is_final(self) -> bool:
        return self.finish_reason is not None


StreamItem = StreamEvent | Exception


@dataclass(eq=False)
class ScheduledSequence:
    """Engine-side state of one request. Mutated by the engine thread only, except
    ``cancelled`` (set under the inbox's lock from the event loop)."""

    request: SequenceRequest
    output: SequenceOutput
    sampling: SamplingState
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    slot: int | None = None
    cancelled: bool = False
    admitted_s: float | None = None
    first_token_s: float | None = None
    prefill_s: float = 0.0
    cached_tokens: int = 0  # prompt positions copied from the prefix cache, not prefilled
    pending: torch.Tensor | None = None  # [P, H]: fused prompt positions still to prefill
    held_ids: list[int] = field(default_factory=list)  # tokens not yet sent (a request that does not stream)
    held_text: list[str] = field(default_factory=list)

    def timings(self, now: float) -> dict[str, float]:
        """Per-stage milliseconds: queue, prefill, decode, time to first token, total.

        ``tokens_per_s`` is the decode rate after the first token (which prefill
        produced), the figure comparable across prompt lengths.
        """
        out = dict(self.request.timings)
        arrival = self.request.arrival_s
        admitted = self.admitted_s if self.admitted_s is not None else now
        out["queue_ms"] = (admitted - arrival) * 1e3
        out["prefill_ms"] = self.prefill_s * 1e3
        if self.first_token_s is not None:
            decode_s = now - self.first_token_s
            out["ttft_ms"] = (self.first_token_s - arrival) * 1e3
            out["decode_ms"] = decode_s * 1e3
            later_tokens = len(self.output.token_ids) - 1
            out["tokens_per_s"] = later_tokens / decode_s if later_tokens > 0 and decode_s > 0 else 0.0
        out["total_ms"] = (now - arrival) * 1e3
        return out


class GenerationStream:
    """The caller's side of one scheduled sequence.

    Iterating yields :class:`StreamEvent`s until the final one; an error the engine
    assigned to the request (a 4xx for its inputs, a 5xx for a failed step) is raised
    from the iteration. Leaving the iteration early should be followed by
    :meth:`cancel` (``collect`` and the HTTP layer do it), which frees the slot.
    """

    def __init__(self, request_id: str, queue: asyncio.Queue, cancel: Callable[[], None]) -> None:
        self.request_id = request_id
        self._queue = queue
        self._cancel = cancel
        self._done = False
        self._peeked: StreamEvent | None = None

    def __aiter__(self) -> GenerationStream:
        return self

    async def __anext__(self) -> StreamEvent:
        if self._peeked is not None:
            event, self._peeked = self._peeked, None
            return event
        if self._done:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self._done = True
            raise item
        if item.is_final:
            self._done = True
        return item

    async def wait_started(self) -> None:
        """Wait for the first event without consuming it; raises the request's error.

        Lets an HTTP layer commit to a 200 streaming response only once admission
        (validation in the fusion, prefill) went through.
        """
        if self._peeked is None and not self._done:
            self._peeked = await self.__anext__()

    @property
    def done(self) -> bool:
        return self._done

    def cancel(self) -> None:
        """Abort the sequence (idempotent; a no-op once it finished)."""
        if not self._done:
            self._cancel()

    async def collect(self) -> GenerateResponse:
        """Wait for the whole sequence; cancels it if the waiting task is cancelled."""
        token_ids: list[int] = []
        text: list[str] = []
        try:
            async for event in self:
                token_ids += event.token_ids
                text.append(event.text)
                if event.is_final:
                    return GenerateResponse(
                        token_ids=token_ids, text="".join(text),
                        finish_reason=event.finish_reason or FINISH_ABORT,
                        prompt_tokens=event.prompt_tokens, request_id=self.request_id,
                        timings=event.timings, cached_tokens=event.cached_tokens,
                    )
        finally:
            self.cancel()
        raise RuntimeError(f"stream {self.request_id} ended without a final event")


class EventOutbox:
    """Events produced during one engine phase, handed to each event loop in one call.

    ``call_soon_threadsafe`` wakes the loop through its self-pipe; one call per loop
    per phase instead of one per sequence keeps a 64-sequence decode step from
    costing 64 wake-ups.
    """

    def __init__(self) -> None:
        self._pending: dict[asyncio.AbstractEventLoop, list[tuple[ScheduledSequence, StreamItem]]] = {}

    def post(self, seq: ScheduledSequence, item: StreamItem) -> None:
        self._pending.setdefault(seq.loop, []).append((seq, item))

    def flush(self) -> list[ScheduledSequence]:
        """Deliver everything; returns the sequences whose event loop is closed."""
        pending, self._pending = self._pending, {}
        orphans: list[ScheduledSequence] = []
        for loop, items in pending.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the loop was closed: nobody is left to read these
                logger.warning("dropping %d events for a closed event loop", len(items))
                orphans += [seq for seq, _ in items]
        return orphans


def _deliver(items: list[tuple[ScheduledSequence, StreamItem]]) -> None:
    for seq, item in items:
        seq.queue.put_nowait(item)


class SchedulerObserver(Protocol):
    """Hooks the engine thread calls; implementations must be thread-safe and cheap."""

    def on_queue(self, running: int, waiting: int, free_slots: int) -> None: ...

    def on_prefill(self, sequences: int, tokens: int, seconds: float) -> None: ...

    def on_prefix_cache(self, query_tokens: int, hit_tokens: int) -> None: ...

    def on_decode(self, batch_size: int, seconds: float) -> None: ...

    def on_tokens(self, count: int) -> None: ...

    def on_finish(self, finish_reason: str, timings: dict[str, float], prompt_tokens: int,
                  completion_tokens: int) -> None: ...


class NullObserver:
    """Observes nothing (tests, benchmarks)."""

    def on_queue(self, running: int, waiting: int, free_slots: int) -> None:
        return None

    def on_prefill(self, sequences: int, tokens: int, seconds: float) -> None:
        return None

    def on_prefix_cache(self, query_tokens: int, hit_tokens: int) -> None:
        return None

    def on_decode(self, batch_size: int, seconds: float) -> None:
        return None

    def on_tokens(self, count: int) -> None:
        return None

    def on_finish(self, finish_reason: str, timings: dict[str, float], prompt_tokens: int,
                  completion_tokens: int) -> None:
        return None
