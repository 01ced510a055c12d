"""The sequence of requests a load test sends: images, reuse, prompt, request bodies.

Reuse is decided image slot by image slot: with probability ``reuse`` a slot repeats
an image sent earlier (chosen uniformly among the last ``reuse_window`` fresh images),
otherwise it gets a new one. The window matters because a server's feature cache is
bounded: reusing an image from ten thousand requests ago tests eviction, not hits. The
first slot of a run is always fresh, since nothing came before it.

One workload feeds a whole sweep (warm-up and every load point), so a fresh image is
fresh for the whole run: restarting the sequence per load point would make every image
of the second point a cache hit and the reuse setting meaningless.

Request bodies are encoded here, ahead of time (``services.loadtest.runner`` prefetches
them in a thread), so base64 and JSON encoding do not sit inside measured latencies.
"""

from __future__ import annotations

import base64
import json
import random
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import httpx

from services.loadtest.errors import ConfigError
from services.loadtest.images import EncodedImage, ImageSource

__all__ = ["ENDPOINTS", "RequestSpec", "ReusePlanner", "Workload", "WorkloadConfig"]

ENDPOINTS = ("chat", "captions")
CAPTIONS_BODIES = ("multipart", "json")


@dataclass(frozen=True)
class WorkloadConfig:
    """What every request looks like. ``extra_body`` is merged into chat requests, for
    server-specific fields such as vLLM's ``ignore_eos`` (needed to compare servers at
    equal output lengths)."""

    endpoint: str = "chat"
    images_per_request: int = 1
    reuse: float = 0.0
    reuse_window: int = 256
    prompt: str = "Describe the image."
    max_tokens: int = 48
    temperature: float = 0.0
    stream: bool = False
    model: str | None = None
    extra_body: dict[str, Any] = field(default_factory=dict)
    captions_body: str = "multipart"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.endpoint not in ENDPOINTS:
            raise ConfigError("endpoint", self.endpoint, f"must be one of {ENDPOINTS}")
        if self.images_per_request < (1 if self.endpoint == "captions" else 0):
            raise ConfigError("images_per_request", self.images_per_request, "too few for this endpoint")
        if not 0.0 <= self.reuse < 1.0:
            raise ConfigError("reuse", self.reuse, "must be in [0, 1)")
        if self.reuse_window < 1:
            raise ConfigError("reuse_window", self.reuse_window, "must be at least 1")
        if self.max_tokens < 1:
            raise ConfigError("max_tokens", self.max_tokens, "must be at least 1")
        if self.captions_body not in CAPTIONS_BODIES:
            raise ConfigError("captions_body", self.captions_body, f"must be one of {CAPTIONS_BODIES}")

    def describe(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


class ReusePlanner:
    """Decides for each image slot: a new image, or which earlier one to repeat.

    Separate from image generation so the statistics of reuse can be tested over
    thousands of slots without encoding a single picture.
    """

    def __init__(self, reuse: float, reuse_window: int, rng: random.Random) -> None:
        self.reuse = reuse
        self.reuse_window = reuse_window
        self.rng = rng
        self.fresh_count = 0

    def next_slot(self) -> tuple[int, bool]:
        """``(fresh_index, planned_reuse)`` for the next image slot."""
        if self.fresh_count > 0 and self.rng.random() < self.reuse:
            oldest = max(0, self.fresh_count - self.reuse_window)
            return self.rng.randrange(oldest, self.fresh_count), True
        self.fresh_count += 1
        return self.fresh_count - 1, False


@dataclass(frozen=True)
class RequestSpec:
    """One request, ready to send: the body is already encoded."""

    index: int
    body: bytes
    content_type: str
    stream: bool
    image_ids: tuple[str, ...]
    reused_images: int

    @property
    def images(self) -> int:
        return len(self.image_ids)


class Workload:
    """Produces ``RequestSpec`` number 0, 1, 2… Not thread-safe: one producer at a time.

    ``reused_images`` counts images whose bytes were already sent earlier in the run,
    by content hash, so it also catches repeats the planner did not choose (a small
    image directory cycling round).
    """

    def __init__(self, config: WorkloadConfig, source: ImageSource) -> None:
        self.config = config
        self.source = source
        self.planner = ReusePlanner(config.reuse, config.reuse_window, random.Random(config.seed))
        self._recent: OrderedDict[int, EncodedImage] = OrderedDict()  # fresh index → image
        self._seen_ids: set[str] = set()
        self._next_index = 0

    def _image_for_slot(self) -> EncodedImage:
        fresh_index, planned_reuse = self.planner.next_slot()
        if planned_reuse:
            return self._recent[fresh_index]
        image = self.source.image(fresh_index)
        self._recent[fresh_index] = image
        # Keep only what the planner may still pick: the last reuse_window fresh images.
        while len(self._recent) > self.config.reuse_window:
            self._recent.popitem(last=False)
        return image

    def next_request(self) -> RequestSpec:
        images: list[EncodedImage] = []
        reused = 0
        for _ in range(self.config.images_per_request):
            # Slot by slot: an image repeated within one request counts as a reuse too.
            image = self._image_for_slot()
            reused += image.image_id in self._seen_ids
            self._seen_ids.add(image.image_id)
            images.append(image)
        if self.config.endpoint == "chat":
            body, content_type = self._chat_body(images), "application/json"
        elif self.config.captions_body == "json":
            images_b64 = [base64.b64encode(image.data).decode("ascii") for image in images]
            body, content_type = json.dumps({"images": images_b64}).encode(), "application/json"
        else:
            body, content_type = _multipart_body(images)
        spec = RequestSpec(self._next_index, body, content_type, self.config.stream and self.config.endpoint == "chat",
                           tuple(image.image_id for image in images), reused)
        self._next_index += 1
        return spec

    def _chat_body(self, images: list[EncodedImage]) -> bytes:
        config = self.config
        content: list[dict[str, Any]] = [
            {"type": "image_url",
             "image_url": {"url": f"data:{image.mime_type};base64,{base64.b64encode(image.data).decode('ascii')}"}}
            for image in images
        ]
        content.append({"type": "text", "text": config.prompt})
        payload: dict[str, Any] = {
            "messages": [{"role": "user", "content": content}],
            "max_tokens": config.max_tokens,
            "temperature": config.temperature,
            "stream": config.stream,
        }
        if config.model is not None:
            payload["model"] = config.model
        if config.stream:
            # Without this, streamed responses carry no usage and tokens must be estimated.
            payload["stream_options"] = {"include_usage": True}
        payload.update(config.extra_body)
        return json.dumps(payload).encode()

    def describe(self) -> dict[str, Any]:
        return {**self.config.describe(), "images": self.source.describe()}


def _multipart_body(images: list[EncodedImage]) -> tuple[bytes, str]:
    """A ``multipart/form-data`` body with one ``file`` part per image, encoded by httpx
    (the same encoder the request would use) but once, ahead of the measurement."""
    files = [("file", (f"image-{position}.{image.mime_type.split('/')[-1]}", image.data, image.mime_type))
             for position, image in enumerate(images)]
    request = httpx.Request("POST", "http://loadtest.invalid/", files=files)
    return request.read(), request.headers["content-type"]
