"""Continuous batching: one engine thread, iteration-level scheduling.

The engine thread owns the model (through :class:`ModelRunner`, and so the KV cache);
torch work never runs on the event loop. Each iteration (:meth:`Scheduler.step`):

1. answers readiness probes and frees the slots of cancelled sequences;
2. admits waiting requests, first come first served, while slots are free (at most
   ``max_batch_size`` running) and the prefill token budget lasts, and fuses each
   newcomer's embedding (starting it from the prefix cache where it can). A newcomer
   whose next uncached block a prompt in flight is about to prefill waits for it
   instead: a burst of requests about one image prefills it once, and the rest start
   from the cache a step later;
3. prefills, in one call, up to ``max_prefill_tokens`` prompt positions of the admitted
   sequences, oldest first: a prompt longer than what is left of the budget is
   prefilled in chunks over several steps (*chunked prefill*, as vLLM's), so a long
   prompt neither starves nor stalls the running batch for more than a chunk; a
   sequence whose prompt is done samples its first token and joins the batch;
4. runs one decode step over every running sequence;
5. hands the new tokens to the callers' asyncio queues (:class:`EventOutbox`).

Requests, cancellations and probes arrive through a thread-safe :class:`RequestInbox`;
the running batch and the KV cache are touched by the engine thread only.

Finished sequences free their slot in the step they finish, cancelled ones at the
start of the next, so requests join and leave the running batch between decode steps
(as in vLLM and TGI) instead of waiting for a whole batch to drain.

Errors stay with their requests: one whose images do not fit its tokens fails alone
with its 4xx; a model call that raises fails the sequences in that call with
:class:`EngineError` (logged with the traceback) and the engine carries on.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future

import torch

from lm_worker.errors import ClientError, ContextLengthExceeded, EngineError, EngineUnavailable
from lm_worker.inbox import RequestInbox
from lm_worker.prefix_cache import PrefixCache
from lm_worker.runner import ModelRunner
from lm_worker.sampling import FINISH_ABORT, SamplingState, SequenceOutput, TokenChunk
from lm_worker.sequence import (
    EventOutbox,
    GenerationStream,
    NullObserver,
    ScheduledSequence,
    SchedulerObserver,
    SequenceRequest,
    StreamEvent,
)
from proto import ImageForInsert, ProtocolError

__all__ = ["Scheduler"]

logger = logging.getLogger(__name__)


class Scheduler:
    """Iteration-level scheduler; ``submit`` from an event loop, ``start`` the engine.

    Tests may drive :meth:`step` themselves, on the loop's thread, without ``start``.
    """

    def __init__(
        self,
        runner: ModelRunner,
        *,
        eos_token_id: int | None,
        decode_text: Callable[[Sequence[int]], str],
        max_batch_size: int,
        max_waiting: int = 256,
        max_prefill_tokens: int = 4096,
        observer: SchedulerObserver | None = None,
        prefix_cache: PrefixCache | None = None,
    ) -> None:
        """``prefix_cache``: blocks of earlier prompts to start newcomers from (their
        ``SequenceRequest.prefix_keys`` name them); None prefills every prompt whole."""
        if max_batch_size < 1 or max_waiting < 0 or max_prefill_tokens < 1:
            raise ValueError(
                f"need max_batch_size >= 1, max_waiting >= 0, max_prefill_tokens >= 1; got "
                f"{max_batch_size}, {max_waiting}, {max_prefill_tokens}"
            )
        self.runner = runner
        self.backend = runner.backend
        self.eos_token_id = eos_token_id
        self.decode_text = decode_text
        self.max_batch_size = min(max_batch_size, self.backend.num_free_slots)
        self.max_prefill_tokens = max_prefill_tokens
        self.observer: SchedulerObserver = observer or NullObserver()
        self.prefix_cache = prefix_cache
        self.inbox = RequestInbox(max_waiting)
        self._running: list[ScheduledSequence] = []  # decoding; engine thread only
        self._prefilling: list[ScheduledSequence] = []  # admitted, prompt not all prefilled yet
        self._deferred: list[ScheduledSequence] = []  # next in line, waiting for a prefix in flight
        self._outbox = EventOutbox()  # engine thread only
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    # ---- any thread ------------------------------------------------------------------
    @property
    def is_running(self) -> bool:
        """The engine thread is alive and accepting work."""
        return self._thread is not None and self._thread.is_alive() and not self.inbox.closed

    @property
    def num_running(self) -> int:
        """Sequences holding a slot: decoding, or with their prompt part prefilled."""
        return len(self._running) + len(self._prefilling)

    @property
    def num_waiting(self) -> int:
        return len(self.inbox) + len(self._deferred)

    def submit(self, request: SequenceRequest) -> GenerationStream:
        """Queue a validated request; call it on the event loop that reads the stream.

        Raises :class:`ContextLengthExceeded` when it cannot fit a slot,
        :class:`Overloaded` when ``max_waiting`` requests already wait, and
        :class:`EngineUnavailable` after :meth:`stop`.
        """
        needed = len(request.prompt_ids) + request.sampling.max_new_tokens
        if needed > self.backend.max_seq_len:
            raise ContextLengthExceeded(
                "sampling.max_new_tokens",
                f"{len(request.prompt_ids)} prompt tokens (image tokens included) + "
                f"{request.sampling.max_new_tokens} new tokens = {needed} exceed the context "
                f"length {self.backend.max_seq_len}",
                request.sampling.max_new_tokens,
            )
        output = SequenceOutput(request.sampling, self.eos_token_id, self.decode_text)
        seq = ScheduledSequence(request, output, SamplingState.create(request.sampling),
                                asyncio.get_running_loop(), asyncio.Queue())
        self.inbox.put(seq)
        self.observer.on_queue(self.num_running, self.num_waiting, self.backend.num_free_slots)
        return GenerationStream(request.request_id, seq.queue, lambda: self.inbox.cancel(seq))

    def probe(self, prompt_ids: list[int], images: list[ImageForInsert]) -> Future:
        """Run :meth:`ModelRunner.probe` between two steps; the future resolves or raises."""
        return self.inbox.add_probe(prompt_ids, images)

    def start(self) -> None:
        """Start the engine thread (idempotent)."""
        with self._start_lock:
            if self.inbox.closed:
                raise EngineUnavailable("", "a stopped engine cannot be restarted")
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="lm-engine", daemon=True)
                self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop accepting work, let the current step finish, fail what is left (503)."""
        self.inbox.close()
        with self._start_lock:
            thread = self._thread
        if thread is None:
            self._fail_all(EngineUnavailable("", "the engine stopped"))
        elif thread is not threading.current_thread():
            thread.join(timeout_s)
            if thread.is_alive():
                raise RuntimeError(f"engine thread did not stop within {timeout_s} s")

    # ---- the engine thread -----------------------------------------------------------
    def _run(self) -> None:
        while self.inbox.wait_for_work(busy=bool(self._running or self._prefilling or self._deferred)):
            try:
                self.step()
            except Exception as exc:
                # A bug outside the model calls leaves no telling which sequences are
                # sound: fail everything in flight (5xx), free the slots, keep serving.
                logger.exception("engine step failed")
                self._fail_all(EngineError("", f"engine step failed: {type(exc).__name__}"))
        self._fail_all(EngineUnavailable("", "the engine stopped"))

    def step(self) -> int:
        """One iteration; returns how many sequences got a token."""
        if self._thread is not None and threading.current_thread() is not self._thread:
            raise RuntimeError("step() runs on the engine thread once start() was called")
        self._answer_probes()
        self._reap_cancelled()
        advanced = 0
        room = min(self.max_batch_size - self.num_running, self.backend.num_free_slots)
        budget = self.max_prefill_tokens - sum(len(s.pending) for s in self._prefilling if s.pending is not None)
        if room > 0 and budget > 0:
            self._admit(self._take(room, budget))
        if self._prefilling:
            advanced += self._prefill()
            self._publish()
        if self._running:
            advanced += self._decode(list(self._running))
        self._publish()
        return advanced

    def _publish(self) -> None:
        """Report the queue, then send what the step produced: the gauges never lag an
        answer (a client that has its answer does not see itself still running)."""
        self.observer.on_queue(self.num_running, self.num_waiting, self.backend.num_free_slots)
        self._flush()

    def _take(self, room: int, budget: int) -> list[ScheduledSequence]:
        """Deferred sequences first (they were next in line), then the inbox's."""
        taken, self._deferred = self._deferred[:room], self._deferred[room:]
        budget -= sum(len(seq.request.prompt_ids) for seq in taken)
        if len(taken) < room and budget > 0:
            taken += self.inbox.take(room - len(taken), budget)
        return taken

    def _waits_for_prefix(self, seq: ScheduledSequence, in_flight: set[bytes]) -> bool:
        """Whether the first block of ``seq``'s prompt the cache lacks is one a prompt in
        flight will store when its prefill ends (then ``seq`` starts from it, a step on)."""
        if self.prefix_cache is None:
            return False
        keys = seq.request.prefix_keys[: self.prefix_cache.max_blocks]  # what a prefill can leave behind
        held = self.prefix_cache.held(keys)
        return held < len(keys) and keys[held] in in_flight

    def _admit(self, newcomers: list[ScheduledSequence]) -> None:
        """A slot, the fused prompt embedding and the cached prefix of each newcomer."""
        in_flight = {key for seq in self._prefilling for key in seq.request.prefix_keys}
        for seq in newcomers:
            if self._waits_for_prefix(seq, in_flight):
                self._deferred.append(seq)
                continue
            start = time.perf_counter()
            seq.admitted_s = start
            try:
                embedding = self.runner.embed(seq.request.prompt_ids, seq.request.images)  # [S, H]
                seq.slot = self.backend.allocate()
                seq.cached_tokens = self._start_from_cache(seq)
            except (ClientError, ProtocolError) as exc:  # this request's images do not fit
                self._fail(seq, exc)
                continue
            except Exception as exc:
                logger.exception("admitting request %s failed", seq.request.request_id)
                self._fail(seq, EngineError("", f"embedding failed: {type(exc).__name__}"))
                continue
            seq.pending = embedding[seq.cached_tokens :]  # what the cache did not hold
            seq.prefill_s = time.perf_counter() - start
            self._prefilling.append(seq)
            in_flight.update(seq.request.prefix_keys)

    def _prefill(self) -> int:
        """One prefill call over the next chunks of admitted prompts, oldest first."""
        start = time.perf_counter()
        budget = self.max_prefill_tokens
        chunks: list[tuple[ScheduledSequence, torch.Tensor, bool]] = []  # (sequence, chunk, ends its prompt)
        for seq in self._prefilling:
            if budget <= 0:
                break
            assert seq.pending is not None
            chunk = seq.pending[:budget]  # [n, H]
            chunks.append((seq, chunk, chunk.shape[0] == seq.pending.shape[0]))
            budget -= chunk.shape[0]
        try:
            tokens = self.runner.prefill([seq.slot for seq, _, _ in chunks], [chunk for _, chunk, _ in chunks],
                                         [seq.sampling if last else None for seq, _, last in chunks])
        except Exception as exc:
            logger.exception("prefill of %d sequences failed", len(chunks))
            for seq, _, _ in chunks:
                self._fail(seq, EngineError("", f"prefill failed: {type(exc).__name__}"))
            return 0
        end = time.perf_counter()
        finished = []
        for seq, chunk, last in chunks:
            seq.prefill_s += end - start
            if last:
                seq.pending, seq.first_token_s = None, end
                self._prefilling.remove(seq)
                self._running.append(seq)  # at once: a sequence is always in one list, for _fail_all
                finished.append(seq)
            else:
                seq.pending = seq.pending[chunk.shape[0] :]  # type: ignore[index]
        self._keep_prefixes(finished)
        self.observer.on_prefill(len(chunks), sum(chunk.shape[0] for _, chunk, _ in chunks), end - start)
        self.observer.on_tokens(len(finished))
        for (seq, _, _), token in zip(chunks, tokens, strict=True):
            if token is not None:
                self._advance(seq, token)
        return len(finished)

    def _start_from_cache(self, seq: ScheduledSequence) -> int:
        """Copy the longest cached prefix of ``seq``'s prompt into its slot; its length."""
        keys = seq.request.prefix_keys
        if self.prefix_cache is None or not keys:
            return 0
        cached = self.prefix_cache.load(seq.slot, self.prefix_cache.match(keys))
        self.observer.on_prefix_cache(len(keys) * self.prefix_cache.block_size, cached)
        return cached

    def _keep_prefixes(self, prefilled: list[ScheduledSequence]) -> None:
        if self.prefix_cache is None:
            return
        for seq in prefilled:
            if seq.request.prefix_keys:
                try:
                    self.prefix_cache.store(seq.slot, seq.request.prefix_keys)
                except Exception:  # the sequence itself is sound: it only goes uncached
                    logger.exception("keeping the prompt prefix of request %s failed", seq.request.request_id)

    def _decode(self, batch: list[ScheduledSequence]) -> int:
        start = time.perf_counter()
        try:
            tokens = self.runner.decode([s.slot for s in batch],
                                        [s.output.token_ids[-1] for s in batch],
                                        [s.sampling for s in batch])
        except Exception as exc:
            logger.exception("decode step over %d sequences failed", len(batch))
            for seq in batch:
                self._fail(seq, EngineError("", f"decode step failed: {type(exc).__name__}"))
            return 0
        self.observer.on_decode(len(batch), time.perf_counter() - start)
        self.observer.on_tokens(len(batch))
        for seq, token in zip(batch, tokens, strict=True):
            self._advance(seq, token)
        return len(batch)

    def _advance(self, seq: ScheduledSequence, token: int) -> None:
        chunk = seq.output.append(token)
        if chunk.finish_reason is not None:
            self._finish(seq, chunk)
        elif seq.request.stream:
            self._outbox.post(seq, StreamEvent(chunk.token_ids, chunk.text))
        else:
            seq.held_ids += chunk.token_ids
            seq.held_text.append(chunk.text)

    def _answer_probes(self) -> None:
        for future, prompt_ids, images in self.inbox.take_probes():
            if not future.set_running_or_notify_cancel():
                continue  # the prober gave up waiting
            try:
                self.runner.probe(prompt_ids, images)
            except Exception as exc:  # the prober answers 503 with it
                logger.exception("readiness probe failed")
                future.set_exception(exc)
            else:
                future.set_result(None)

    # ---- leaving the batch -----------------------------------------------------------
    def _reap_cancelled(self) -> None:
        pending, waiters = self.inbox.take_cancelled()
        if not pending:
            return
        for seq in [*waiters, *(s for s in [*self._deferred, *self._prefilling, *self._running] if s.cancelled)]:
            self._finish(seq, seq.output.abort())
        self._flush()

    def _release(self, seq: ScheduledSequence) -> None:
        seq.pending = None
        if seq in self._running:
            self._running.remove(seq)
        elif seq in self._prefilling:
            self._prefilling.remove(seq)
        elif seq in self._deferred:
            self._deferred.remove(seq)
        if seq.slot is not None:
            self.backend.free(seq.slot)
            seq.slot = None

    def _finish(self, seq: ScheduledSequence, chunk: TokenChunk) -> None:
        self._release(seq)
        timings = seq.timings(time.perf_counter())
        prompt, completion = len(seq.request.prompt_ids), len(seq.output.token_ids)
        reason = chunk.finish_reason or FINISH_ABORT
        self.observer.on_finish(reason, timings, prompt, completion)
        self._outbox.post(seq, StreamEvent([*seq.held_ids, *chunk.token_ids], "".join([*seq.held_text, chunk.text]),
                                           reason, prompt, completion, timings, seq.cached_tokens))

    def _fail(self, seq: ScheduledSequence, exc: Exception) -> None:
        self._release(seq)
        seq.output.finish_reason = seq.output.finish_reason or FINISH_ABORT
        self._outbox.post(seq, exc)

    def _fail_all(self, exc: Exception) -> None:
        waiting, probes = self.inbox.drain()
        for seq in [*self._deferred, *self._prefilling, *self._running, *waiting]:
            self._fail(seq, exc)
        for future, _, _ in probes:
            if future.set_running_or_notify_cancel():
                future.set_exception(exc)
        self._flush()

    def _flush(self) -> None:
        for seq in self._outbox.flush():
            if seq in self._running or seq in self._prefilling:
                self.inbox.cancel(seq)  # its reader's event loop is gone
