"""The encoder's logic: load the tower, turn an `EncodeRequest` into an `EncodeResponse`.

Per request: preprocess in a small thread pool (decode, resize, normalise), queue the
pixels on the dynamic batcher (one forward for many requests, on the worker thread),
then cast this request's rows to the wire dtype, again in the pool. The event loop
only schedules; every stage that costs milliseconds runs off it, so preprocessing of
the next requests overlaps the running forward. HTTP lives in `router`/`kserve`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from encoder_server.batcher import Batcher, BatcherConfig, DynamicBatcher
from encoder_server.errors import (
    EncoderError,
    InvalidRequest,
    NotReady,
    TooManyImages,
)
from encoder_server.metrics import EncoderMetrics, StageTimings
from encoder_server.model import (
    Step37VisionModel,
    VisionConfig,
    init_random,
    load_vision_model,
    rope_cu_seqlens,
)
from encoder_server.model.graphs import TowerGraphs
from encoder_server.preprocess import ImageLimits, check_pixels, preprocess_batch
from proto import (
    FEATURE_DTYPES,
    EncodeRequest,
    EncodeResponse,
    ImageForInsert,
    WireLimits,
    dtype_from_name,
    to_device,
)

__all__ = ["DEFAULT_INSERT_START_TOKEN", "EncoderService", "EncoderSettings", "load_model"]

logger = logging.getLogger(__name__)

# <im_start> in the released Step3.7 tokenizer (STEP37_FACTS.md).
DEFAULT_INSERT_START_TOKEN = 128000
MODEL_VERSION = "1"
# Features up to this many elements (one tiny-model image: 65 536) are cast and packed on
# the event loop: a few tens of microseconds, less than handing them to a pool thread.
INLINE_PACKAGE_ELEMENTS = 1 << 18
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")  # URL-safe: it is a path segment


@dataclass(frozen=True)
class EncoderSettings:
    """Everything the encoder service is configured with, read once at start-up (CLI/env)."""

    model: str | None = None  # checkpoint directory
    preset: str | None = None  # or a VisionConfig preset with seeded random weights
    model_name: str | None = None  # default: the directory's or the preset's name
    insert_start_token: int | None = None
    seed: int = 0
    device: str | None = None
    dtype: str | None = None
    max_batch_size: int = 8
    max_queue_delay_ms: float = 0.0
    max_queue_size: int = 256
    request_timeout_s: float = 60.0
    max_images_per_request: int = 16
    max_body_bytes: int = 64 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    preprocess_workers: int = 2
    ready_cache_s: float = 1.0  # a forward that succeeded this recently proves readiness
    cuda_graphs: str = "auto"  # auto: on a GPU, trained-resolution forwards replay CUDA graphs; off: eager

    def __post_init__(self) -> None:
        if self.cuda_graphs not in ("auto", "off"):
            raise ValueError(f"cuda_graphs must be auto or off, got {self.cuda_graphs!r}")

    def batcher_config(self) -> BatcherConfig:
        return BatcherConfig(self.max_batch_size, self.max_queue_delay_ms, self.max_queue_size,
                             self.request_timeout_s)

    def image_limits(self) -> ImageLimits:
        return ImageLimits(max_pixels=self.max_image_pixels)

    def wire_limits(self) -> WireLimits:
        return WireLimits(max_message_bytes=self.max_body_bytes, max_images=self.max_images_per_request)


@dataclass(frozen=True)
class LoadedModel:
    model: Step37VisionModel
    name: str
    insert_start_token: int


def load_model(settings: EncoderSettings) -> LoadedModel:
    """The tower from ``--model DIR`` (token id from its config.json) or ``--preset``."""
    if (settings.model is None) == (settings.preset is None):
        raise ValueError("give exactly one of --model DIR or --preset NAME")
    token = settings.insert_start_token
    if settings.model is not None:
        model = load_vision_model(settings.model, dtype=settings.dtype, device=settings.device)
        name = settings.model_name or Path(settings.model).resolve().name
        document = json.loads((Path(settings.model) / "config.json").read_text())
        recorded = document.get("im_start_token_id")
        if recorded is not None and token is not None and int(recorded) != token:
            raise ValueError(f"--insert-start-token {token} disagrees with im_start_token_id "
                             f"{recorded} in {settings.model}/config.json")
        if recorded is None and token is None:
            logger.warning("%s/config.json has no im_start_token_id; using %d",
                           settings.model, DEFAULT_INSERT_START_TOKEN)
        token = int(recorded) if recorded is not None else token
    else:
        assert settings.preset is not None
        model = init_random(VisionConfig.preset(settings.preset), seed=settings.seed,
                            dtype=settings.dtype, device=settings.device)
        name = settings.model_name or settings.preset
    if not _MODEL_NAME.match(name):
        raise ValueError(f"model name {name!r} must match {_MODEL_NAME.pattern} (pass --model-name)")
    return LoadedModel(model, name, DEFAULT_INSERT_START_TOKEN if token is None else token)


class EncoderService:
    """The vision tower behind a dynamic batcher; owns the preprocessing pool."""

    model_version = MODEL_VERSION

    def __init__(self, model: Step37VisionModel, *, name: str, insert_start_token: int,
                 settings: EncoderSettings | None = None, metrics: EncoderMetrics | None = None,
                 batcher: Batcher | None = None) -> None:
        self.model = model
        self.config: VisionConfig = model.config
        self.name = name
        self.insert_start_token = insert_start_token
        self.settings = settings or EncoderSettings()
        self.metrics = metrics or EncoderMetrics()
        weight = next(model.parameters())
        self.device, self.dtype = weight.device, weight.dtype
        self.tower: Callable[[torch.Tensor], torch.Tensor] = model
        if self.device.type == "cuda" and self.settings.cuda_graphs == "auto":
            try:
                self.tower = TowerGraphs(model, self.settings.max_batch_size)
            except RuntimeError as exc:  # pragma: no cover - needs a GPU whose capture fails
                logger.warning("capturing CUDA graphs for the tower failed (%s); forwards stay eager", exc)
        self.batcher: Batcher = batcher or DynamicBatcher(
            self._forward, self.settings.batcher_config(), name=name, on_batch=self.metrics.batch_ran)
        self.metrics.track_queue_depth(lambda: self.batcher.queue_depth)
        self.image_limits = self.settings.image_limits()
        self.wire_limits = self.settings.wire_limits()
        self._pool: ThreadPoolExecutor | None = None
        self._started = False
        self._last_ok = float("-inf")  # monotonic time of the last successful forward

    @classmethod
    def from_settings(cls, settings: EncoderSettings, metrics: EncoderMetrics | None = None) -> EncoderService:
        loaded = load_model(settings)
        return cls(loaded.model, name=loaded.name, insert_start_token=loaded.insert_start_token,
                   settings=settings, metrics=metrics)

    # ---- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Start the pool and the batcher, then warm up at the trained resolution."""
        self._pool = ThreadPoolExecutor(self.settings.preprocess_workers,
                                        thread_name_prefix=f"{self.name}-preprocess")
        await self.batcher.start()
        size = self.config.image_size
        await self.batcher.submit(torch.zeros(1, 3, size, size))  # first-call allocations
        self._last_ok = time.monotonic()
        self._started = True
        logger.info("encoder %s ready on %s (%s), max_batch_size=%d", self.name, self.device,
                    self.dtype, self.settings.max_batch_size)

    async def stop(self) -> None:
        self._started = False
        await self.batcher.stop()
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await asyncio.to_thread(pool.shutdown, wait=True)

    async def check_ready(self) -> None:
        """Raise `NotReady` unless a forward works now (a tiny one unless one just did)."""
        if not self._started:
            raise NotReady("the model is not started (loading or shutting down)", retry_after_s=1.0)
        if time.monotonic() - self._last_ok < self.settings.ready_cache_s:
            return
        side = 4 * self.config.patch_size  # a 4x4 patch grid: the smallest useful forward
        try:
            await self.batcher.submit(torch.zeros(1, 3, side, side), timeout_s=10.0)
        except EncoderError as exc:  # overloaded, timed out, or a failed forward (logged there)
            raise NotReady(f"health forward failed: {exc}", retry_after_s=1.0) from exc
        except Exception as exc:
            logger.exception("health forward failed")
            raise NotReady(f"health forward failed ({type(exc).__name__})", retry_after_s=1.0) from exc
        self._last_ok = time.monotonic()

    # ---- encoding -----------------------------------------------------------------------

    async def encode(self, request: EncodeRequest, *, timeout_s: float | None = None) -> EncodeResponse:
        """Features for every image of the request, in order, with per-stage timings."""
        started = time.perf_counter()
        try:
            return await self._encode(request, timeout_s, started)
        except Exception:
            self.metrics.request_failed(time.perf_counter() - started)
            raise

    async def _encode(self, request: EncodeRequest, timeout_s: float | None, started: float) -> EncodeResponse:
        given = request.pixels
        count = len(request.images) if given is None else int(given.shape[0]) if given.dim() else 0
        limit = self.settings.max_images_per_request
        if count > limit:
            raise TooManyImages(f"{count} images in one request; the limit is {limit}",
                                field="images", value=count)
        if request.output_dtype not in FEATURE_DTYPES:
            raise InvalidRequest(f"must be one of {', '.join(FEATURE_DTYPES)}",
                                 field="output_dtype", value=request.output_dtype)
        output_dtype = dtype_from_name(request.output_dtype, "output_dtype")
        if self._pool is None:
            raise NotReady("the service is not started", retry_after_s=1.0)
        loop = asyncio.get_running_loop()
        pixels = await loop.run_in_executor(self._pool, self._prepare, request)  # [N, 3, H, W]
        prepared = time.perf_counter()
        result = await self.batcher.submit(pixels, timeout_s=timeout_s)
        self._last_ok = time.monotonic()
        encoded = time.perf_counter()
        size = tuple(pixels.shape[2:])
        if result.features.numel() <= INLINE_PACKAGE_ELEMENTS:  # cheaper than the hop to a thread
            image = self._package(result.features, size, output_dtype)
        else:
            image = await loop.run_in_executor(self._pool, self._package, result.features, size, output_dtype)
        done = time.perf_counter()
        timings = StageTimings(
            queue_ms=result.queue_ms,
            preprocess_ms=(prepared - started) * 1000.0,
            forward_ms=result.forward_ms,
            serialize_ms=(done - encoded) * 1000.0,
            total_ms=(done - started) * 1000.0,
        )
        self.metrics.request_succeeded(timings, count)
        return EncodeResponse(image=image, model=self.name, request_id=request.request_id,
                              timings=timings.as_dict())

    def _prepare(self, request: EncodeRequest) -> torch.Tensor:
        """Pool thread: encoded images -> [N, 3, S, S]; given pixels are checked, made fp32."""
        if request.pixels is None:
            return preprocess_batch(request.images, self.config.image_size, field="images",
                                    limits=self.image_limits)
        return check_pixels(request.pixels, self.config.patch_size, self.image_limits)

    def _package(self, features: torch.Tensor, size: tuple[int, int], dtype: torch.dtype) -> ImageForInsert:
        """Pool thread: cast to the wire dtype and attach the RoPE offsets of the patch grid."""
        count = int(features.shape[0])
        cu_seqlens, max_seq_len = rope_cu_seqlens([size] * count, self.config.patch_size)
        return ImageForInsert(
            insert_start_token=self.insert_start_token,
            image_features=features.to(dtype).contiguous(),  # [N, L, C]
            rope_cu_seqlens=cu_seqlens,  # [N + 1] int32
            rope_max_seq_len=max_seq_len,
        )

    def _forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Worker thread: [B, 3, H, W] float32 -> [B, L, C] on the CPU in the model's dtype."""
        with torch.inference_mode():
            features = self.tower(to_device(pixels, self.device))  # [B, L, C]
            return features.cpu()  # the device->host copy also waits for the GPU
