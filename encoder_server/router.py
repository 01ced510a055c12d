"""Native HTTP routes: ``POST /v1/encode``, ``/health``, ``/ready``, ``/metrics``.

HTTP only: read the bounded body, let `protocol` turn it into an `EncodeRequest`, let
the service encode, stream the msgpack `EncodeResponse` back. Errors are raised, and
`services.common.errors` maps them to JSON bodies in one place.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response

import proto
from encoder_server.protocol import parse_encode_body
from encoder_server.serving import EncoderService
from services.common.http import (
    CLIENT_CLOSED_REQUEST,
    cancel_on_disconnect,
    msgpack_response,
    read_body,
)
from services.common.metrics import metrics_response

__all__ = ["get_service", "router"]

router = APIRouter()


async def get_service(request: Request) -> EncoderService:
    # async: FastAPI runs a plain-def dependency on a worker thread, a thread hop per request
    return request.app.state.service


Service = Annotated[EncoderService, Depends(get_service)]


@router.post(
    "/v1/encode",
    response_class=Response,
    responses={200: {"content": {proto.CONTENT_TYPE: {}},
                     "description": "an EncodeResponse message (ImageForInsert + timings)"}},
)
async def encode(
    request: Request,
    service: Service,
    dtype: Annotated[str | None, Query(description="feature dtype: bf16 (default), fp16, fp32")] = None,
) -> Response:
    """Images (raw image body, multipart files, or a msgpack EncodeRequest) -> features."""
    body = await read_body(request, service.settings.max_body_bytes)
    encode_request = await parse_encode_body(request.headers, body, dtype=dtype,
                                             limits=service.wire_limits)
    response = await cancel_on_disconnect(request, service.encode(encode_request))
    if response is None:  # the caller left: its queued or running work was abandoned
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    return msgpack_response(response, headers={"x-request-id": response.request_id})


@router.get("/health")
async def health() -> dict[str, str]:
    """Liveness: the process answers HTTP. Says nothing about the model."""
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request, service: Service) -> dict[str, str | int]:
    """Readiness: a tiny forward passes through the batcher (503 otherwise). ``rpc_port``:
    where ``encode`` calls are served too, when they are."""
    await service.check_ready()
    body: dict[str, str | int] = {"status": "ready", "model": service.name}
    rpc_port = getattr(request.app.state, "rpc_port", None)
    if rpc_port is not None:
        body["rpc_port"] = rpc_port
    return body


@router.get("/metrics")
async def metrics(service: Service) -> Response:
    return metrics_response(service.metrics.registry)
