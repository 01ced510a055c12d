"""HTTP schemas of the public API: OpenAI chat completions, models, and captions.

Field names and shapes follow OpenAI's API so its clients work unchanged; the
gateway's additions are a ``timings`` field (milliseconds per stage) on responses
and the ``/v1/captions`` endpoint. Unknown request fields are accepted and ignored,
as OpenAI-compatible servers do, because clients send optional fields freely; the
gateway logs their names. Settings-dependent limits (images, pixels, max_tokens)
are checked by the serving layer, which knows the settings.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from proto import MAX_CACHE_SALT_LEN

__all__ = [
    "IMAGE_PLACEHOLDER",
    "CaptionOptions",
    "CaptionRequest",
    "CaptionResponse",
    "ChatCompletionChunk",
    "ChatCompletionRequest",
    "ChatCompletionResponse",
    "ChatMessage",
    "Choice",
    "ChunkChoice",
    "ContentPart",
    "DeltaMessage",
    "ImageUrl",
    "ModelCard",
    "ModelList",
    "ResponseMessage",
    "StreamOptions",
    "Usage",
]

MAX_STOP_SEQUENCES = 4  # OpenAI's bound
IMAGE_PLACEHOLDER = "<image>"  # where an image goes in the prompt the LM worker expands


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")

    def unknown_fields(self) -> list[str]:
        return sorted(self.model_extra or {})


class ImageUrl(_Request):
    url: str = Field(min_length=1)
    detail: Literal["auto", "low", "high"] = "auto"


class ContentPart(_Request):
    """One part of a message: ``{"type": "text", "text"}`` or ``{"type": "image_url", "image_url": {url}}``."""

    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageUrl | None = None

    @model_validator(mode="after")
    def _field_for_type(self) -> ContentPart:
        if self.type == "text" and self.text is None:
            raise ValueError("a text part needs a 'text' field")
        if self.type == "image_url" and self.image_url is None:
            raise ValueError("an image_url part needs an 'image_url' field")
        return self


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def content_parts(self) -> list[ContentPart]:
        """The content as parts whatever its form (a string is one text part)."""
        if self.content is None:
            return []
        if isinstance(self.content, str):
            return [ContentPart(type="text", text=self.content)]
        return list(self.content)


class StreamOptions(_Request):
    include_usage: bool = False


class ChatCompletionRequest(_Request):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    # None: greedy. A captioner's most likely caption, and reproducible (OpenAI's
    # default of 1.0 would make every caption a sample).
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    stop: str | list[str] | None = None
    # vLLM's extension: generate max_tokens tokens even past EOS (fixed-length load tests).
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    user: str | None = None
    # vLLM's extension: the caches (image features, prompt prefixes) are shared only
    # between requests of the same salt; a tenant sets its own to keep its hits private.
    cache_salt: str | None = Field(default=None, min_length=1, max_length=MAX_CACHE_SALT_LEN)

    @field_validator("n")
    @classmethod
    def _one_choice(cls, value: int) -> int:
        if value != 1:
            raise ValueError("only n=1 is supported")
        return value

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences")
        if any(not stop for stop in stops):
            raise ValueError("stop sequences must be non-empty")
        return value

    @property
    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def requested_max_tokens(self) -> int | None:
        """``max_completion_tokens`` (the current name) wins over the deprecated ``max_tokens``."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens the LM worker's prefix cache supplied, not prefilled


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> Usage:
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens,
                   prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens))


FinishReason = Literal["stop", "length"]


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: ResponseMessage
    finish_reason: FinishReason
    logprobs: None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    system_fingerprint: str | None = None
    timings: dict[str, float] = Field(default_factory=dict)


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    finish_reason: FinishReason | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    timings: dict[str, float] | None = None

    def to_event(self, *, include_usage: bool) -> dict[str, Any]:
        """OpenAI's chunk: with ``include_usage`` every chunk carries ``usage`` (null until
        the last); without it the key is absent. ``timings`` only on the chunk that has it."""
        body = self.model_dump(mode="json")
        if not include_usage:
            body.pop("usage")
        if self.timings is None:
            body.pop("timings")
        return body


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "step37-serve"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class CaptionOptions(_Request):
    """Captioning controls, from JSON fields or multipart form fields."""

    prompt: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    cache_salt: str | None = Field(default=None, min_length=1, max_length=MAX_CACHE_SALT_LEN)  # as chat's


class CaptionRequest(CaptionOptions):
    """JSON captions request: ``image`` (one base64 file or data URL) or ``images`` (several)."""

    image: str | None = Field(default=None, min_length=1)
    images: list[str] | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _one_source(self) -> CaptionRequest:
        if (self.image is None) == (self.images is None):
            raise ValueError("give exactly one of 'image' or 'images'")
        return self

    @property
    def image_list(self) -> list[str]:
        return [self.image] if self.image is not None else list(self.images or [])


class CaptionResponse(BaseModel):
    id: str
    object: Literal["caption"] = "caption"
    model: str
    captions: list[str]
    finish_reasons: list[FinishReason]
    usage: Usage
    timings: dict[str, float] = Field(default_factory=dict)
