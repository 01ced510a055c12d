"""HTTP schemas of the LM worker other than the msgpack wire messages (those are ``proto``).

* ``/health`` and ``/ready`` answer JSON :class:`HealthResponse` / :class:`ReadyResponse`;
* a streamed ``/v1/generate`` answers ``text/event-stream``: one ``data:`` event per
  step with new tokens (:class:`TokenChunkEvent`), then one :class:`FinalEvent` with
  the finish reason, usage and timings. The texts of all events concatenate to the
  text a non-streamed request returns. A failure after the stream started is sent as
  ``event: error`` with the same ``{"error": {...}}`` body a 4xx/5xx would carry.

A streamed generate over the call channel sends the same events' JSON, one per chunk
(:func:`event_payloads`), and a failure midway as the channel's error frame.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel

from lm_worker.sequence import StreamEvent

__all__ = [
    "SSE_MEDIA_TYPE",
    "FinalEvent",
    "HealthResponse",
    "ReadyResponse",
    "TokenChunkEvent",
    "event_payloads",
    "sse_error",
    "sse_events",
]

SSE_MEDIA_TYPE = "text/event-stream"
# Proxies (nginx) buffer responses unless told not to; a buffered stream is no stream.
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


class HealthResponse(BaseModel):
    status: str = "ok"


class ReadyResponse(BaseModel):
    status: str
    model: str
    running: int
    waiting: int
    free_slots: int
    reason: str | None = None
    rpc_port: int | None = None  # where generates are served as calls too
    # What it offers callers: named image features kept (GenerateRequest.feature_refs) up to
    # this many bytes (0: none), and cache_salt honoured (a worker without the field predates it).
    feature_store_bytes: int = 0
    cache_salt: bool = True


class TokenChunkEvent(BaseModel):
    token_ids: list[int]
    text: str


class FinalEvent(BaseModel):
    request_id: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    timings: dict[str, float]
    cached_tokens: int = 0


def _sse(data: str, event: str | None = None) -> bytes:
    prefix = f"event: {event}\n" if event else ""
    return f"{prefix}data: {data}\n\n".encode()


def event_payloads(request_id: str, event: StreamEvent) -> list[str]:
    """The JSON events of one engine event: its token chunk, and the final event if last.

    Tokens that arrive with the last step go out as a chunk first, so every token
    chunk has one shape and the final event only the summary.
    """
    payloads: list[str] = []
    if not event.is_final or event.token_ids or event.text:
        payloads.append(TokenChunkEvent(token_ids=event.token_ids, text=event.text).model_dump_json())
    if event.is_final:
        payloads.append(FinalEvent(
            request_id=request_id, finish_reason=event.finish_reason or "abort",
            prompt_tokens=event.prompt_tokens, completion_tokens=event.completion_tokens,
            timings=event.timings, cached_tokens=event.cached_tokens,
        ).model_dump_json())
    return payloads


def sse_events(request_id: str, event: StreamEvent) -> list[bytes]:
    """:func:`event_payloads` as server-sent events."""
    return [_sse(payload) for payload in event_payloads(request_id, event)]


def sse_error(body: dict[str, Any]) -> bytes:
    """An ``event: error`` frame with the body the error handlers would send."""
    return _sse(json.dumps({"error": body}), event="error")
