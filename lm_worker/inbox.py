"""The thread-safe side of the scheduler: where event loops leave work for the engine.

Event-loop threads add requests, cancellations and readiness probes; the engine thread
takes them between steps. Everything behind one condition variable, so the engine
sleeps when idle and wakes the moment work arrives. The engine's own state (the
running batch, the KV cache) is not in here: only the engine thread touches it.
"""

from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import Future

from lm_worker.errors import EngineUnavailable, Overloaded
from lm_worker.sequence import ScheduledSequence
from proto import ImageForInsert

__all__ = ["Probe", "RequestInbox"]

Probe = tuple[Future, list[int], list[ImageForInsert]]


class RequestInbox:
    """A bounded FIFO of waiting sequences, pending probes and a cancellation flag."""

    def __init__(self, max_waiting: int) -> None:
        self.max_waiting = max_waiting
        self._cond = threading.Condition()
        self._waiting: deque[ScheduledSequence] = deque()
        self._probes: list[Probe] = []
        self._cancel_pending = False
        self._cancelled_waiters: list[ScheduledSequence] = []
        self._closed = False

    def __len__(self) -> int:
        return len(self._waiting)

    @property
    def closed(self) -> bool:
        return self._closed

    # ---- event-loop side -------------------------------------------------------------
    def put(self, seq: ScheduledSequence) -> None:
        """Queue a sequence; :class:`Overloaded` when full, :class:`EngineUnavailable` when closed."""
        with self._cond:
            if self._closed:
                raise EngineUnavailable("", "the engine is stopped")
            if len(self._waiting) >= self.max_waiting:
                raise Overloaded("", f"{len(self._waiting)} requests already waiting; retry later",
                                 self.max_waiting)
            self._waiting.append(seq)
            self._cond.notify()

    def cancel(self, seq: ScheduledSequence) -> None:
        """Flag a sequence cancelled and wake the engine to free its slot.

        A sequence still waiting leaves the queue at once, so abandoned requests do
        not hold places that count against ``max_waiting``.
        """
        with self._cond:
            if seq.cancelled or seq.output.finished:
                return
            seq.cancelled = True
            if seq in self._waiting:
                self._waiting.remove(seq)
                self._cancelled_waiters.append(seq)
            self._cancel_pending = True
            self._cond.notify()

    def add_probe(self, prompt_ids: list[int], images: list[ImageForInsert]) -> Future:
        future: Future = Future()
        with self._cond:
            if self._closed:
                future.set_exception(EngineUnavailable("", "the engine is stopped"))
            else:
                self._probes.append((future, prompt_ids, images))
                self._cond.notify()
        return future

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    # ---- engine side -----------------------------------------------------------------
    def wait_for_work(self, busy: bool) -> bool:
        """Block until there is work (or ``busy``: the engine has running sequences).

        Returns False once closed.
        """
        with self._cond:
            while not (self._closed or busy or self._waiting or self._probes or self._cancel_pending):
                self._cond.wait()
            return not self._closed

    def take_probes(self) -> list[Probe]:
        with self._cond:
            probes, self._probes = self._probes, []
        return probes

    def take_cancelled(self) -> tuple[bool, list[ScheduledSequence]]:
        """Whether anything was cancelled since the last call, and the waiters removed."""
        with self._cond:
            pending, self._cancel_pending = self._cancel_pending, False
            waiters, self._cancelled_waiters = self._cancelled_waiters, []
        return pending, waiters

    def take(self, room: int, token_budget: int) -> list[ScheduledSequence]:
        """Pop up to ``room`` sequences, first come first served, while ``token_budget``
        prompt tokens last (the last one taken may overrun it: its prompt is prefilled in
        chunks, so a long prompt neither starves nor stalls the running batch)."""
        admitted: list[ScheduledSequence] = []
        with self._cond:
            while self._waiting and len(admitted) < room and token_budget > 0:
                admitted.append(self._waiting.popleft())
                token_budget -= len(admitted[-1].request.prompt_ids)
        return admitted

    def drain(self) -> tuple[list[ScheduledSequence], list[Probe]]:
        """Everything still queued (at shutdown, or after a failed step)."""
        with self._cond:
            waiting = [*self._cancelled_waiters, *self._waiting]
            self._waiting, self._cancelled_waiters = deque(), []
            probes, self._probes = self._probes, []
        return waiting, probes
