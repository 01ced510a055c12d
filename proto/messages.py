"""Request and response messages between the gateway, encoder and LM worker.

Each message is a dataclass that owns its wire form (``to_wire`` / ``from_wire``);
``proto.codec`` adds the envelope (``v`` version and ``type`` name). Every request
and response carries a ``request_id`` and per-stage ``timings`` in milliseconds so a
client can break latency down (queue, preprocess, encode, transfer, prefill, decode).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

import torch

from proto.errors import InvalidValue, LimitExceeded
from proto.fields import FieldReader
from proto.image_for_insert import ImageForInsert
from proto.tensor import DecodeBudget, tensor_to_wire

__all__ = [
    "FEATURE_DTYPES",
    "FINISH_REASONS",
    "EncodeRequest",
    "EncodeResponse",
    "GenerateRequest",
    "GenerateResponse",
    "MAX_CACHE_SALT_LEN",
    "SamplingParams",
    "new_request_id",
]

FEATURE_DTYPES = ("bfloat16", "float16", "float32")
FINISH_REASONS = ("stop", "length", "abort")
MAX_REQUEST_ID_LEN = 128
MAX_CACHE_SALT_LEN = 256
MAX_FEATURE_REF_LEN = 128


def new_request_id() -> str:
    return uuid.uuid4().hex


def _request_id(reader: FieldReader) -> str:
    """The peer's id (echoed in headers and logs, so printable ASCII only) or a new one."""
    value = reader.str("request_id", "") or new_request_id()
    if len(value) > MAX_REQUEST_ID_LEN:
        raise LimitExceeded(reader.name("request_id"), "length", len(value), MAX_REQUEST_ID_LEN)
    if not (value.isascii() and value.isprintable()) or " " in value:
        raise InvalidValue(reader.name("request_id"), "must be printable ASCII without spaces", value)
    return value


def _check_feature_refs(refs: list[str], images: int) -> None:
    if len(refs) != images:
        raise InvalidValue("feature_refs", f"one name per item of images ({images}), got {len(refs)}", len(refs))
    for index, ref in enumerate(refs):
        if len(ref) > MAX_FEATURE_REF_LEN:
            raise LimitExceeded(f"feature_refs[{index}]", "length", len(ref), MAX_FEATURE_REF_LEN)
        if not ref or not (ref.isascii() and ref.isprintable()) or " " in ref:
            raise InvalidValue(f"feature_refs[{index}]", "must be non-empty printable ASCII without spaces", ref)


@dataclass
class EncodeRequest:
    """Images for the vision tower: encoded files (JPEG/PNG/WebP/GIF) or pixels.

    ``pixels`` is an already-preprocessed float ``[N, 3, H, W]`` batch, for callers
    that do their own resizing/normalisation.
    """

    images: list[bytes] = field(default_factory=list)
    pixels: torch.Tensor | None = None
    output_dtype: str = "bfloat16"
    request_id: str = field(default_factory=new_request_id)

    def to_wire(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "images": list(self.images),
            "pixels": tensor_to_wire(self.pixels) if self.pixels is not None else None,
            "output_dtype": self.output_dtype,
        }

    @classmethod
    def from_wire(cls, obj: Any, budget: DecodeBudget) -> EncodeRequest:
        reader = FieldReader(obj, "", budget)
        msg = cls(
            request_id=_request_id(reader),
            images=[bytes(b) for b in reader.bytes_list("images", [], max_len=budget.limits.max_images)],
            pixels=reader.tensor("pixels"),
            output_dtype=reader.str("output_dtype", "bfloat16", choices=FEATURE_DTYPES),
        )
        if not msg.images and msg.pixels is None:
            raise InvalidValue("images", "give at least one image (or pixels)")
        if msg.images and msg.pixels is not None:
            raise InvalidValue("pixels", "give images or pixels, not both")
        return msg


@dataclass
class EncodeResponse:
    """The vision tower's output for one ``EncodeRequest``, in request order."""

    image: ImageForInsert
    model: str = ""
    request_id: str = ""
    timings: dict[str, float] = field(default_factory=dict)

    def to_wire(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "model": self.model,
            "image": self.image.to_wire(),
            "timings": dict(self.timings),
        }

    @classmethod
    def from_wire(cls, obj: Any, budget: DecodeBudget) -> EncodeResponse:
        reader = FieldReader(obj, "", budget)
        return cls(
            request_id=reader.str("request_id", ""),
            model=reader.str("model", ""),
            image=ImageForInsert.from_wire(reader.raw("image"), budget, "image"),
            timings=reader.timings(),
        )


@dataclass
class SamplingParams:
    """Decoding controls. ``temperature == 0`` means greedy; ``top_k == 0`` disables it."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False

    MAX_STOPS = 16

    def validate(self, path: str = "sampling") -> None:
        if self.max_new_tokens < 1:
            raise InvalidValue(f"{path}.max_new_tokens", "must be >= 1", self.max_new_tokens)
        if not 0.0 <= self.temperature <= 100.0:
            raise InvalidValue(f"{path}.temperature", "must be in [0, 100]", self.temperature)
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidValue(f"{path}.top_p", "must be in (0, 1]", self.top_p)
        if self.top_k < 0:
            raise InvalidValue(f"{path}.top_k", "must be >= 0", self.top_k)
        if len(self.stop) > self.MAX_STOPS or len(self.stop_token_ids) > self.MAX_STOPS:
            raise LimitExceeded(f"{path}.stop", "stop sequences", max(len(self.stop), len(self.stop_token_ids)), self.MAX_STOPS)

    def to_wire(self) -> dict[str, Any]:
        return {
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "seed": self.seed,
            "stop_token_ids": list(self.stop_token_ids),
            "stop": list(self.stop),
            "ignore_eos": self.ignore_eos,
        }

    @classmethod
    def from_wire(cls, obj: Any, budget: DecodeBudget, path: str = "sampling") -> SamplingParams:
        reader = FieldReader(obj, path, budget)
        params = cls(
            max_new_tokens=reader.int("max_new_tokens", 64),
            temperature=reader.float("temperature", 0.0),
            top_p=reader.float("top_p", 1.0),
            top_k=reader.int("top_k", 0),
            seed=reader.int("seed", None, minimum=0, maximum=2**63 - 1),
            stop_token_ids=reader.int_list("stop_token_ids", [], minimum=0, max_len=cls.MAX_STOPS),
            stop=reader.str_list("stop", [], max_len=cls.MAX_STOPS),
            ignore_eos=reader.bool("ignore_eos", False),
        )
        params.validate(path)
        return params


@dataclass
class GenerateRequest:
    """A prompt (``<image>`` placeholders expanded by the worker) or raw ``input_ids``
    (placeholders already laid out), with one ``ImageForInsert`` per start-token kind.

    ``cache_salt`` (optional, non-empty): requests share cached prompt prefixes only
    with requests of the same salt, so one tenant cannot time another's prompts.

    ``feature_refs`` (optional, one per item of ``images``): names for the items'
    features. A worker that keeps features (it says so in ``/ready``) keeps an item
    that comes with features under its name; an item that comes with a name and no
    features stands for the features kept under it. A worker that no longer has them
    answers 400 naming ``feature_refs[i]``: send them again.
    """

    prompt: str | None = None
    input_ids: list[int] | None = None
    images: list[ImageForInsert] = field(default_factory=list)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stream: bool = False
    request_id: str = field(default_factory=new_request_id)
    timings: dict[str, float] = field(default_factory=dict)
    cache_salt: str | None = None
    feature_refs: list[str] | None = None

    def to_wire(self) -> dict[str, Any]:
        wire = {
            "request_id": self.request_id,
            "prompt": self.prompt,
            "input_ids": self.input_ids,
            "images": [item.to_wire() for item in self.images],
            "sampling": self.sampling.to_wire(),
            "stream": self.stream,
            "timings": dict(self.timings),
        }
        # Absent unless set: a worker that predates them reads the rest.
        if self.cache_salt is not None:
            wire["cache_salt"] = self.cache_salt
        if self.feature_refs is not None:
            wire["feature_refs"] = list(self.feature_refs)
        return wire

    @classmethod
    def from_wire(cls, obj: Any, budget: DecodeBudget) -> GenerateRequest:
        reader = FieldReader(obj, "", budget)
        raw_images = reader.list("images", [], max_len=budget.limits.max_images)
        msg = cls(
            request_id=_request_id(reader),
            prompt=reader.str("prompt", None),
            input_ids=reader.int_list("input_ids", None, minimum=0),
            images=[ImageForInsert.from_wire(item, budget, f"images[{i}]") for i, item in enumerate(raw_images)],
            sampling=SamplingParams.from_wire(reader.raw("sampling", {}), budget),
            stream=reader.bool("stream", False),
            timings=reader.timings(),
            cache_salt=reader.str("cache_salt", None),
            feature_refs=reader.str_list("feature_refs", None, max_len=budget.limits.max_images),
        )
        if msg.cache_salt is not None:
            if not msg.cache_salt:
                raise InvalidValue("cache_salt", "must be a non-empty string when given", msg.cache_salt)
            if len(msg.cache_salt) > MAX_CACHE_SALT_LEN:
                raise LimitExceeded("cache_salt", "length", len(msg.cache_salt), MAX_CACHE_SALT_LEN)
        if msg.feature_refs is not None:
            _check_feature_refs(msg.feature_refs, len(msg.images))
        if (msg.prompt is None) == (msg.input_ids is None):
            raise InvalidValue("prompt", "give exactly one of prompt or input_ids")
        if msg.prompt is not None and len(msg.prompt) > budget.limits.max_str_len:
            raise LimitExceeded("prompt", "length", len(msg.prompt), budget.limits.max_str_len)
        return msg


@dataclass
class GenerateResponse:
    """Generated tokens for one request, with usage counts and per-stage timings."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = "stop"
    prompt_tokens: int = 0
    request_id: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    cached_tokens: int = 0  # of prompt_tokens, those the worker's prefix cache supplied

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)

    def to_wire(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "token_ids": list(self.token_ids),
            "text": self.text,
            "finish_reason": self.finish_reason,
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "timings": dict(self.timings),
        }

    @classmethod
    def from_wire(cls, obj: Any, budget: DecodeBudget) -> GenerateResponse:
        reader = FieldReader(obj, "", budget)
        return cls(
            request_id=reader.str("request_id", ""),
            token_ids=reader.int_list("token_ids", [], minimum=0),
            text=reader.str("text", ""),
            finish_reason=reader.str("finish_reason", "stop", choices=FINISH_REASONS),
            prompt_tokens=reader.int("prompt_tokens", 0, minimum=0),
            cached_tokens=reader.int("cached_tokens", 0, minimum=0),
            timings=reader.timings(),
        )
