"""The orchestration every endpoint shares: images → features → generation.

Per request: read each image (data URL, base64, upload, or an allow-listed URL) and
check its header → sha256 → feature cache → the encoder for the misses only, all of
them in one call (shared with concurrent requests for the same images) → the LM
worker. Each step runs inside a :class:`~services.gateway.timing.StageTimer` stage,
so the answer can say where its latency went. The chat and captions services build
on this and own only their request/response shapes.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from proto import GenerateRequest, GenerateResponse, SamplingParams, feature_nbytes
from services.gateway.cache import FeatureCache, FeatureKey
from services.gateway.encoder_client import EncoderClient
from services.gateway.errors import ClientError, LimitExceeded, ModelNotFound, UpstreamTimeout
from services.gateway.features import EncodedImage, split_image_for_insert
from services.gateway.fetch import ImageFetcher
from services.gateway.images import (
    ValidatedImage,
    decode_base64_image,
    inspect_image,
    parse_data_url,
)
from services.gateway.lm_client import LMClient, LMStream
from services.gateway.metrics import GatewayMetrics
from services.gateway.settings import GatewaySettings
from services.gateway.timing import StageTimer

__all__ = ["ImageSource", "Pipeline", "gather_or_cancel"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
# Below this many bytes, decoding and hashing on the event loop costs less than a thread hop.
_INLINE_DECODE_BYTES = 256 * 1024
# How the encoder names an image it refused: its index in the encode batch.
_ENCODER_IMAGE_FIELD = re.compile(r"images\[(\d+)\]")


def _name_refused_image(error: ClientError, params: Sequence[str]) -> None:
    """Point an encoder's refusal of ``images[k]`` at the request field that carried it:
    the encoder numbers the images of its batch (this request's cache misses), which
    need not be the request's own order."""
    match = _ENCODER_IMAGE_FIELD.fullmatch(error.upstream_field or "")
    if match is not None and int(match.group(1)) < len(params):
        error.param = params[int(match.group(1))]
        error.message = f"{error.param}: {error.message}"


async def gather_or_cancel(work: Sequence[Awaitable[T]]) -> list[T]:
    """All results in order; on the first failure the rest are cancelled, not left running
    (``asyncio.gather`` alone would keep the other generations going for nobody)."""
    tasks = [asyncio.ensure_future(item) for item in work]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


@dataclass(frozen=True)
class ImageSource:
    """One image of a request as the client gave it, and the request field that named it."""

    param: str
    url: str | None = None  # data: or http(s) URL
    base64: str | None = None  # bare base64, or a data URL
    data: bytes | None = None  # an uploaded file

    @property
    def size_hint(self) -> int:
        return len(self.url or self.base64 or self.data or b"")


class Pipeline:
    """Shared steps; one instance per app, safe for concurrent requests."""

    def __init__(self, settings: GatewaySettings, *, encoder: EncoderClient, lm: LMClient, cache: FeatureCache,
                 fetcher: ImageFetcher, metrics: GatewayMetrics) -> None:
        self.settings = settings
        self.encoder = encoder
        self.lm = lm
        self.cache = cache
        self.fetcher = fetcher
        self.metrics = metrics
        self._model_warned: set[str] = set()

    # ---- request-level checks ------------------------------------------------------
    def check_model(self, name: str | None) -> str:
        """The served model's name; a request may omit it but not name another."""
        if name is not None and name != self.settings.model_name:
            raise ModelNotFound(f"model {name!r} is not served here; available: {self.settings.model_name!r}",
                                param="model", value=name)
        return self.settings.model_name

    def check_image_count(self, count: int, param: str) -> None:
        if count > self.settings.max_images:
            raise LimitExceeded(f"{count} images in one request; the limit is {self.settings.max_images}",
                                param=param, value=count)

    def check_prompt(self, prompt: str, param: str) -> None:
        if len(prompt) > self.settings.max_prompt_chars:
            raise LimitExceeded(f"the prompt is {len(prompt)} characters; the limit is "
                                f"{self.settings.max_prompt_chars}", param=param, value=len(prompt))

    def sampling(self, *, max_tokens: int | None, temperature: float | None = None, top_p: float | None = None,
                 seed: int | None = None, stop: Sequence[str] = (), ignore_eos: bool = False,
                 param: str = "max_tokens") -> SamplingParams:
        """Sampling parameters; ``max_tokens`` may not exceed the configured cap."""
        cap = self.settings.max_tokens
        if max_tokens is not None and max_tokens > cap:
            raise LimitExceeded(f"{param} is {max_tokens}; the limit is {cap}", param=param, value=max_tokens)
        return SamplingParams(max_new_tokens=max_tokens or self.settings.default_max_tokens,
                              temperature=temperature or 0.0,
                              top_p=1.0 if top_p is None else top_p, seed=seed, stop=list(stop),
                              ignore_eos=ignore_eos)

    async def with_deadline(self, work: Awaitable[T]) -> T:
        """Run ``work`` within the request deadline (504 past it; the work is cancelled)."""
        try:
            return await asyncio.wait_for(work, self.settings.request_timeout_s)
        except asyncio.TimeoutError:
            raise UpstreamTimeout(f"the request took longer than {self.settings.request_timeout_s:g} s") from None

    # ---- images --------------------------------------------------------------------
    async def load_images(self, sources: Sequence[ImageSource], timer: StageTimer) -> list[ValidatedImage]:
        """Bytes for every source, header-checked, in order. URLs are fetched concurrently.
        (Callers check the image count first, naming their own request field.)"""
        remote = [source for source in sources if source.url is not None and not source.url[:5].lower() == "data:"]
        for source in remote:
            self.fetcher.check_url(source.url or "", param=source.param)  # refuse before any download
        fetched: dict[str, bytes] = {}
        if remote:
            with timer.stage("fetch"):
                bodies = await gather_or_cancel([self.fetcher.fetch(s.url or "", param=s.param) for s in remote])
            fetched = {source.param: body for source, body in zip(remote, bodies, strict=True)}
        with timer.stage("decode"):
            if sum(source.size_hint for source in sources) <= _INLINE_DECODE_BYTES:
                images = self._decode_all(sources, fetched)
            else:
                images = await asyncio.to_thread(self._decode_all, sources, fetched)
        self.metrics.images.inc(len(images))
        return images

    def _decode_all(self, sources: Sequence[ImageSource], fetched: Mapping[str, bytes]) -> list[ValidatedImage]:
        return [self._decode(source, fetched) for source in sources]

    def _decode(self, source: ImageSource, fetched: Mapping[str, bytes]) -> ValidatedImage:
        limit = self.settings.max_image_bytes
        if source.data is not None:
            data = source.data
        elif source.param in fetched:
            data = fetched[source.param]
        elif source.url is not None:
            data = parse_data_url(source.url, param=source.param, max_bytes=limit)
        elif source.base64 is not None and source.base64[:5].lower() == "data:":
            data = parse_data_url(source.base64, param=source.param, max_bytes=limit)
        else:
            data = decode_base64_image(source.base64 or "", param=source.param, max_bytes=limit)
        return inspect_image(data, param=source.param, max_pixels=self.settings.max_pixels, max_bytes=limit)

    # ---- features ------------------------------------------------------------------
    async def features(self, images: Sequence[ValidatedImage], timer: StageTimer, *,
                       request_id: str, cache_salt: str | None = None) -> list[EncodedImage]:
        """Features per image, in order: cached ones (of the same ``cache_salt``) at once,
        the rest in one encoder call."""
        keys = [FeatureKey(image.sha256, self.settings.encoder_model, self.settings.cache_dtype, cache_salt)
                for image in images]
        data_by_key = {key: image.data for key, image in zip(keys, images, strict=True)}
        param_by_key: dict[FeatureKey, str] = {}
        for key, image in zip(keys, images, strict=True):
            param_by_key.setdefault(key, image.param)

        async def encode_missing(missing: list[FeatureKey]) -> dict[FeatureKey, EncodedImage]:
            start = time.perf_counter()
            try:
                result = await self.encoder.encode([data_by_key[key] for key in missing], request_id=request_id)
            except ClientError as exc:
                _name_refused_image(exc, [param_by_key[key] for key in missing])
                raise
            timer.add_call("encoder", 1e3 * (time.perf_counter() - start), result.timings)
            self._check_encoder_model(result.model)
            if feature_nbytes(result.image.image_features) <= _INLINE_DECODE_BYTES:
                encoded = split_image_for_insert(result.image, len(missing))
            else:  # copying and hashing megabytes: off the event loop
                encoded = await asyncio.to_thread(split_image_for_insert, result.image, len(missing))
            return dict(zip(missing, encoded, strict=True))

        with timer.stage("cache"):
            lookup = self.cache.lookup(keys, encode_missing)
        if not lookup.pending:
            return await lookup.wait()
        with timer.stage("encode"):
            return await lookup.wait()

    def _check_encoder_model(self, model: str) -> None:
        # Cache keys use the configured name; an encoder serving other weights under it
        # would poison the cache, so say so loudly (once per name).
        if model and model != self.settings.encoder_model and model not in self._model_warned:
            self._model_warned.add(model)
            logger.warning("the encoder reports model %r but the gateway is configured with --encoder-model %r; "
                           "cached features are keyed by the configured name", model, self.settings.encoder_model)

    # ---- generation ----------------------------------------------------------------
    async def generate(self, request: GenerateRequest, timer: StageTimer) -> GenerateResponse:
        start = time.perf_counter()
        with timer.stage("generate"):
            response = await self.lm.generate(request)
        timer.add_call("lm", 1e3 * (time.perf_counter() - start), response.timings)
        return response

    async def open_stream(self, request: GenerateRequest) -> LMStream:
        return await self.lm.open_stream(request)

    def finish(self, timer: StageTimer, *, prompt_tokens: int, completion_tokens: int) -> None:
        self.metrics.observe_stages(timer.stages_ms())
        self.metrics.usage(prompt_tokens, completion_tokens)
