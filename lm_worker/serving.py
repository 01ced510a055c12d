"""``LMWorkerService``: the worker's logic between the HTTP router and the engine.

It owns the loaded model, the :class:`Scheduler` and its engine thread, the request
validator and the metrics. The router hands it bytes and gets back either a
``GenerateResponse`` or a started :class:`GenerationStream`; nothing here knows about
HTTP beyond the errors' status codes.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import torch

import proto
from lm_worker.errors import EngineUnavailable
from lm_worker.feature_store import FeatureStore, refuse_names
from lm_worker.metrics import LMWorkerMetrics
from lm_worker.model import LocalDecoderBackend
from lm_worker.prefix_cache import PrefixCache, image_digests, prefix_block_keys
from lm_worker.runner import ModelRunner
from lm_worker.scheduler import Scheduler
from lm_worker.sequence import GenerationStream, SequenceRequest
from lm_worker.settings import LMWorkerSettings, LoadedModel, load_model
from lm_worker.validation import RequestValidator
from proto import GenerateRequest, GenerateResponse, ImageForInsert, WireLimits

__all__ = ["LMWorkerService", "ReadyState", "RequestPreparer"]

ReadyState = tuple[bool, str | None]  # (ready, reason when not)
INLINE_PREPARE_BYTES = 64 * 1024  # below this, preparing on the event loop costs less than a thread hop


@dataclass
class RequestPreparer:
    """Bytes → a request the engine can run: decode, named features put back, validation,
    prefix-cache keys; kept features are kept. CPU work: callers run it off the loop."""

    validator: RequestValidator
    wire_limits: WireLimits
    features: FeatureStore | None = None
    prefix_block_size: int | None = None  # None: no prefix cache, no keys

    def __call__(self, body: bytes) -> tuple[GenerateRequest, SequenceRequest]:
        arrival = time.perf_counter()
        request = proto.decode(body, expect=GenerateRequest, limits=self.wire_limits)
        # Named items that came without features take the kept ones, or a 400 naming them.
        sent = list(request.images)
        if self.features is None:
            refuse_names(request)
        digests = self.features.resolve(request) if self.features is not None else [None] * len(sent)
        kept = [item is not came for item, came in zip(request.images, sent, strict=True)]
        sequence = self.validator(request, arrival, checked=kept)  # kept items were scanned when they came
        if self.prefix_block_size is not None:  # hashing the features is CPU work too: here, off the engine
            digests = [digest if digest is not None else image_digests(item)
                       for item, digest in zip(request.images, digests, strict=True)]
            by_start: dict[int, list[bytes]] = {}
            for item, item_digests in zip(request.images, digests, strict=True):  # the validator's merge order
                by_start.setdefault(item.insert_start_token, []).extend(item_digests)
            sequence.prefix_keys = prefix_block_keys(sequence.prompt_ids, sequence.images,
                                                     self.prefix_block_size, request.cache_salt, by_start)
        if self.features is not None:
            self.features.keep(request, digests)
        sequence.timings["preprocess_ms"] = (time.perf_counter() - arrival) * 1e3
        return request, sequence


class LMWorkerService:
    """One model served with continuous batching; ``start``/``stop`` bracket its engine."""

    def __init__(self, model: LoadedModel, settings: LMWorkerSettings,
                 metrics: LMWorkerMetrics | None = None) -> None:
        self.model = model
        self.settings = settings
        self.metrics = metrics or LMWorkerMetrics()
        config = model.config
        max_seq_len = min(settings.max_seq_len or config.max_position_embeddings,
                          config.max_position_embeddings)
        backend = LocalDecoderBackend(model.decoder, max_batch_size=settings.max_batch_size,
                                      max_seq_len=max_seq_len,
                                      cuda_graphs=None if settings.cuda_graphs == "auto" else False,
                                      compile_steps=settings.compile_steps == "on")
        self.prefix_cache = PrefixCache.within(backend.cache, block_size=settings.prefix_block_size,
                                               max_bytes=settings.prefix_cache_mb * 2**20)
        self.scheduler = Scheduler(
            ModelRunner(backend, model.fusion),
            eos_token_id=model.tokenizer.eos_token_id,
            decode_text=model.tokenizer.decode,
            max_batch_size=settings.max_batch_size,
            max_waiting=settings.max_waiting,
            max_prefill_tokens=settings.max_prefill_tokens,
            observer=self.metrics,
            prefix_cache=self.prefix_cache,
        )
        self.features = (FeatureStore(settings.feature_store_mb * 2**20,
                                      lambda result: self.metrics.feature_refs.labels(result).inc())
                         if settings.feature_store_mb > 0 else None)
        self.preparer = RequestPreparer(
            RequestValidator(model.tokenizer, encoder_output_dim=config.encoder_output_dim,
                             vocab_size=config.vocab_size, max_seq_len=max_seq_len),
            WireLimits(max_message_bytes=settings.max_body_bytes), self.features,
            self.prefix_cache.block_size if self.prefix_cache is not None else None)
        self._probe_ids, self._probe_images = self._probe_request()

    @classmethod
    def from_settings(cls, settings: LMWorkerSettings) -> LMWorkerService:
        return cls(load_model(settings), settings)

    @property
    def model_name(self) -> str:
        return self.settings.model_name

    def start(self) -> None:
        self.scheduler.start()

    def stop(self) -> None:
        self.scheduler.stop()

    # ---- requests --------------------------------------------------------------------
    def prepare(self, body: bytes) -> tuple[GenerateRequest, SequenceRequest]:
        """Decode and validate a msgpack ``GenerateRequest`` (CPU work: run it off the loop)."""
        return self.preparer(body)

    async def prepare_async(self, body: bytes) -> tuple[GenerateRequest, SequenceRequest]:
        """:meth:`prepare` on a worker thread (the finite-value scan and the prefix-cache
        digests read every feature value); a small body here, cheaper than the hop."""
        if len(body) <= INLINE_PREPARE_BYTES and b"feature_refs" not in body:  # a name may stand for megabytes
            return self.prepare(body)
        return await asyncio.to_thread(self.prepare, body)

    def submit(self, sequence: SequenceRequest) -> GenerationStream:
        return self.scheduler.submit(sequence)

    async def generate(self, sequence: SequenceRequest) -> GenerateResponse:
        """The whole response; cancelling the awaiting task cancels the sequence."""
        sequence.stream = False  # the tokens come back together, with the final event
        return await self.submit(sequence).collect()

    async def open_stream(self, sequence: SequenceRequest) -> GenerationStream:
        """A stream whose first event has arrived (see ``GenerationStream.wait_started``).

        Failures at admission (images that do not fit, an engine error in prefill) thus
        raise here, with their own status code, rather than inside a 200 stream.
        """
        stream = self.submit(sequence)
        try:
            await stream.wait_started()
        except BaseException:
            stream.cancel()
            raise
        return stream

    # ---- readiness -------------------------------------------------------------------
    async def ready(self) -> ReadyState:
        """A tiny forward through fusion and prefill, run by the engine between steps."""
        if not self.scheduler.is_running:
            return False, "engine not running"
        future = self.scheduler.probe(self._probe_ids, self._probe_images)
        try:
            await asyncio.wait_for(asyncio.wrap_future(future), self.settings.ready_timeout_s)
        except asyncio.TimeoutError:  # not the builtin on Python 3.10
            future.cancel()
            return False, f"probe did not finish within {self.settings.ready_timeout_s} s"
        except (EngineUnavailable, RuntimeError, ValueError) as exc:  # logged by the engine
            return False, f"{type(exc).__name__}: {exc}"
        return True, None

    def _probe_request(self) -> tuple[list[int], list[ImageForInsert]]:
        ids = self.model.tokenizer.ids
        weight = self.model.fusion.align_projector.weight
        features = torch.zeros(1, 1, self.model.config.encoder_output_dim, dtype=weight.dtype)
        return ([ids.bos, ids.im_start, ids.im_patch, ids.im_end],
                [ImageForInsert(ids.im_start, image_features=features)])
