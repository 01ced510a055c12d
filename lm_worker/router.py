"""HTTP routes of the LM worker: thin, HTTP-only; the logic is in ``serving``.

``POST /v1/generate`` takes a msgpack ``GenerateRequest`` and answers a msgpack
``GenerateResponse``, or server-sent events when ``stream`` is set. A client that
disconnects cancels its sequence: the engine frees the slot at its next step.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

import proto
from lm_worker.errors import UnsupportedMediaType
from lm_worker.protocol import (
    SSE_HEADERS,
    SSE_MEDIA_TYPE,
    HealthResponse,
    ReadyResponse,
    sse_error,
    sse_events,
)
from lm_worker.sequence import GenerationStream
from lm_worker.serving import LMWorkerService
from services.common.errors import error_body, status_of
from services.common.http import (
    CLIENT_CLOSED_REQUEST,
    cancel_on_disconnect,
    msgpack_response,
    read_body,
)
from services.common.metrics import metrics_response

__all__ = ["create_router"]

logger = logging.getLogger(__name__)

MSGPACK_MEDIA_TYPES = frozenset({proto.CONTENT_TYPE, "application/msgpack", "application/vnd.msgpack"})



def create_router(service: LMWorkerService) -> APIRouter:
    router = APIRouter()

    @router.post("/v1/generate")
    async def generate(request: Request) -> Response:
        _require_msgpack(request)
        body = await read_body(request, service.settings.max_body_bytes)
        message, sequence = await service.prepare_async(body)
        if message.stream:
            stream = await cancel_on_disconnect(request, service.open_stream(sequence))
            if stream is None:
                return _client_gone(service)
            return StreamingResponse(_sse_body(stream, service), media_type=SSE_MEDIA_TYPE,
                                     headers=SSE_HEADERS, background=BackgroundTask(_cancel, stream))
        response = await cancel_on_disconnect(request, service.generate(sequence))
        return _client_gone(service) if response is None else msgpack_response(response)

    @router.get("/health", response_model=HealthResponse)
    async def health() -> HealthResponse:
        return HealthResponse()

    @router.get("/ready", response_model=ReadyResponse)
    async def ready(request: Request) -> JSONResponse:
        ok, reason = await service.ready()
        scheduler = service.scheduler
        body = ReadyResponse(status="ready" if ok else "not_ready", model=service.model_name,
                             running=scheduler.num_running, waiting=scheduler.num_waiting,
                             free_slots=scheduler.backend.num_free_slots, reason=reason,
                             rpc_port=getattr(request.app.state, "rpc_port", None),
                             feature_store_bytes=service.features.max_bytes if service.features is not None else 0)
        return JSONResponse(body.model_dump(exclude_none=True), status_code=200 if ok else 503)

    @router.get("/metrics")
    async def metrics() -> Response:
        return metrics_response(service.metrics.registry)

    return router


def _require_msgpack(request: Request) -> None:
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type not in MSGPACK_MEDIA_TYPES:
        raise UnsupportedMediaType("content-type", f"send the GenerateRequest as {proto.CONTENT_TYPE}",
                                   media_type or None)


async def _cancel(stream: GenerationStream) -> None:
    stream.cancel()  # after the response, however it ended; a no-op when finished


def _client_gone(service: LMWorkerService) -> Response:
    service.metrics.on_error("client_disconnected")
    return Response(status_code=CLIENT_CLOSED_REQUEST)


async def _sse_body(stream: GenerationStream, service: LMWorkerService) -> AsyncIterator[bytes]:
    try:
        async for event in stream:
            for frame in sse_events(stream.request_id, event):
                yield frame
    except Exception as exc:  # the response has started: report in-band, as an error event
        if status_of(exc) >= 500:
            logger.exception("stream %s failed", stream.request_id)
        body = error_body(exc)
        service.metrics.on_error(body.get("type", "internal_error"))
        yield sse_error(body)
    finally:
        stream.cancel()  # a no-op when finished; frees the slot when the reader left early
