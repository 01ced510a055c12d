"""``/v1/chat/completions``: OpenAI messages → one prompt with ``<image>`` placeholders.

The prompt template is the plain one the LM worker and the demo trainer use: each
message's text parts and images in order, joined by spaces (an image becomes
``<image>``, which the worker expands to ``<im_start>`` + L × ``<im_patch>`` +
``<im_end>``), messages joined by newlines, no role markup. A model with a chat
template would get it from its tokenizer on the worker side; the gateway keeps
only the order of text and images, which is all the wire needs.

Streaming follows OpenAI's format: a first chunk with the assistant role, content
deltas, a chunk with ``finish_reason`` (and this gateway's ``timings``), a usage
chunk when ``stream_options.include_usage`` is set, then ``data: [DONE]``. Errors
before the first byte are ordinary HTTP errors; after it, an ``{"error": …}`` event
followed by ``[DONE]``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from proto import GenerateRequest
from services.gateway.errors import GatewayError, InvalidRequest, ServiceUnavailable
from services.gateway.features import features_name, join_encoded
from services.gateway.lm_client import LMStream, StreamFinish
from services.gateway.protocol import (
    IMAGE_PLACEHOLDER,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    Choice,
    ChunkChoice,
    DeltaMessage,
    ResponseMessage,
    Usage,
)
from services.gateway.serving import ImageSource, Pipeline
from services.gateway.sse import DONE, format_event
from services.gateway.timing import StageTimer

__all__ = ["ChatService", "ChatStream", "render_prompt"]

logger = logging.getLogger(__name__)



def render_prompt(messages: list[ChatMessage]) -> tuple[str, list[ImageSource]]:
    """The prompt text and its images, in placeholder order."""
    lines: list[str] = []
    sources: list[ImageSource] = []
    for i, message in enumerate(messages):
        pieces: list[str] = []
        for j, part in enumerate(message.content_parts()):
            param = f"messages[{i}].content" if isinstance(message.content, str) else f"messages[{i}].content[{j}]"
            if part.type == "image_url" and part.image_url is not None:
                if message.role != "user":
                    raise InvalidRequest(f"{param}: images are accepted in user messages only", param=param)
                pieces.append(IMAGE_PLACEHOLDER)
                sources.append(ImageSource(param=f"{param}.image_url.url", url=part.image_url.url))
                continue
            text = part.text or ""
            if IMAGE_PLACEHOLDER in text:
                # The worker would expand it into an image slot with no image behind it.
                raise InvalidRequest(f"{param}: text may not contain the reserved placeholder "
                                     f"{IMAGE_PLACEHOLDER}; send images as image_url parts", param=param)
            if text.strip():
                pieces.append(text.strip())
        if pieces:
            lines.append(" ".join(pieces))
    if not lines:
        raise InvalidRequest("messages: no text or image to respond to", param="messages")
    return "\n".join(lines), sources


@dataclass
class ChatStream:
    """A started stream: SSE bytes to send, headers known before the first byte, and the
    close hook that stops the upstream generation (idempotent)."""

    events: AsyncIterator[bytes]
    close: Callable[[], Awaitable[None]]
    headers: dict[str, str] = field(default_factory=dict)


class ChatService:
    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline

    async def _prepare(self, request: ChatCompletionRequest, request_id: str, timer: StageTimer) -> GenerateRequest:
        """Everything before generation: checks first (cheap), then images and features."""
        pipeline = self.pipeline
        if request.unknown_fields():
            logger.debug("request %s: ignoring unknown fields %s", request_id, request.unknown_fields())
        prompt, sources = render_prompt(request.messages)
        pipeline.check_prompt(prompt, "messages")
        pipeline.check_image_count(len(sources), "messages")
        sampling = pipeline.sampling(
            max_tokens=request.requested_max_tokens, temperature=request.temperature, top_p=request.top_p,
            seed=request.seed, stop=request.stop_list, ignore_eos=request.ignore_eos,
            param="max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens")
        images, names = [], None
        if sources:
            validated = await pipeline.load_images(sources, timer)
            encoded = await pipeline.features(validated, timer, request_id=request_id, cache_salt=request.cache_salt)
            images, names = [join_encoded(encoded)], [features_name(encoded, request.cache_salt)]
        return GenerateRequest(prompt=prompt, images=images, sampling=sampling, request_id=request_id,
                               timings=timer.as_dict(), cache_salt=request.cache_salt, feature_refs=names)

    async def complete(self, request: ChatCompletionRequest, *, request_id: str,
                       timer: StageTimer) -> ChatCompletionResponse:
        model = self.pipeline.check_model(request.model)

        async def run() -> ChatCompletionResponse:
            generate_request = await self._prepare(request, request_id, timer)
            result = await self.pipeline.generate(generate_request, timer)
            if result.finish_reason == "abort":
                raise ServiceUnavailable("the LM worker aborted the generation; retry")
            self.pipeline.finish(timer, prompt_tokens=result.prompt_tokens,
                                 completion_tokens=result.completion_tokens)
            return ChatCompletionResponse(
                id=f"chatcmpl-{request_id}", created=int(time.time()), model=model,
                choices=[Choice(message=ResponseMessage(content=result.text), finish_reason=result.finish_reason)],
                usage=Usage.of(result.prompt_tokens, result.completion_tokens, result.cached_tokens), timings=timer.as_dict())

        return await self.pipeline.with_deadline(run())

    async def stream(self, request: ChatCompletionRequest, *, request_id: str, timer: StageTimer) -> ChatStream:
        model = self.pipeline.check_model(request.model)

        async def start() -> tuple[LMStream, float]:
            generate_request = await self._prepare(request, request_id, timer)
            started = time.perf_counter()
            return await self.pipeline.open_stream(generate_request), started

        # The deadline covers everything up to the worker accepting; the stream itself
        # is bounded by the worker timeout between tokens instead.
        upstream, started = await self.pipeline.with_deadline(start())
        headers = {"server-timing": timer.server_timing()}
        events = self._events(upstream, started, request, request_id, model, timer)
        return ChatStream(events=events, close=upstream.aclose, headers=headers)

    async def _events(self, upstream: LMStream, started: float, request: ChatCompletionRequest, request_id: str,
                      model: str, timer: StageTimer) -> AsyncIterator[bytes]:
        created = int(time.time())
        include_usage = request.include_usage

        def chunk(choices: list[ChunkChoice], *, usage: Usage | None = None,
                  timings: dict[str, float] | None = None) -> bytes:
            body = ChatCompletionChunk(id=f"chatcmpl-{request_id}", created=created, model=model, choices=choices,
                                       usage=usage, timings=timings)
            return format_event(body.to_event(include_usage=include_usage))

        yield chunk([ChunkChoice(delta=DeltaMessage(role="assistant", content=""))])
        try:
            finish: StreamFinish | None = None
            async for event in upstream.events():
                if isinstance(event, StreamFinish):
                    finish = event
                elif event.text:
                    yield chunk([ChunkChoice(delta=DeltaMessage(content=event.text))])
            assert finish is not None  # events() ends with a StreamFinish or raises
            timer.record("generate", started, time.perf_counter())
            timer.add_call("lm", 1e3 * (time.perf_counter() - started), finish.timings)
            if finish.finish_reason == "abort":
                raise ServiceUnavailable("the LM worker aborted the generation")
            self.pipeline.finish(timer, prompt_tokens=finish.prompt_tokens,
                                 completion_tokens=finish.completion_tokens)
            yield chunk([ChunkChoice(delta=DeltaMessage(), finish_reason=finish.finish_reason)],
                        timings=timer.as_dict())
            if include_usage:
                yield chunk([], usage=Usage.of(finish.prompt_tokens, finish.completion_tokens, finish.cached_tokens))
        except GatewayError as exc:
            logger.warning("stream %s failed after it started: %s", request_id, exc.message)
            self.pipeline.metrics.error(exc)
            yield format_event({"error": exc.to_dict()})
        except Exception:  # headers are sent: the client can only learn of it in-band
            logger.exception("stream %s failed after it started", request_id)
            self.pipeline.metrics.error(None)
            yield format_event({"error": GatewayError("internal server error").to_dict()})
        yield DONE
