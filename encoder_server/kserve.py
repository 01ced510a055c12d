"""KServe v2 / Triton HTTP routes, so ``tritonclient.http`` and ``perf_analyzer`` work unchanged.

Health, server and model metadata, model config, statistics, repository index and
``infer`` (binary tensor data extension, JSON-only requests, gzip/deflate bodies).
Errors on these routes are Triton's shape, ``{"error": "<message>"}``, which is what
tritonclient raises as ``InferenceServerException``; the status codes are Triton's
(400 bad request, 404 unknown model/version, 503 unavailable) plus 413 for size limits.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute

from encoder_server import kserve_metadata as metadata
from encoder_server.errors import EncoderError, InvalidRequest, ModelNotFound
from encoder_server.kserve_protocol import infer_response, parse_infer_request
from encoder_server.router import get_service
from encoder_server.serving import EncoderService
from services.common.errors import error_body, status_of
from services.common.http import CLIENT_CLOSED_REQUEST, cancel_on_disconnect, read_body

__all__ = ["router"]

logger = logging.getLogger(__name__)

_INDEX_BODY_BYTES = 64 * 1024


class KServeRoute(APIRoute):
    """Routes whose errors come back as ``{"error": msg}`` instead of the native shape.

    Known errors keep their status and message; anything else is logged with its
    traceback and answered with a generic 500, as the native routes do.
    """

    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as exc:
                body = error_body(exc)
                if body["type"] == "internal_error":
                    logger.exception("unhandled error on %s %s", request.method, request.url.path)
                request.app.state.service.metrics.error(body["type"])
                return JSONResponse({"error": body["message"]}, status_code=status_of(exc))

        return handle


router = APIRouter(route_class=KServeRoute)
Service = Annotated[EncoderService, Depends(get_service)]
# Versioned paths read {version} in resolve_model (from path_params, as unversioned
# paths share the handler), so FastAPI cannot see it: declare it in their OpenAPI.
_VERSION = {"parameters": [{"name": "version", "in": "path", "required": True,
                            "schema": {"type": "string"}}]}


def model_facts(service: EncoderService) -> metadata.ModelFacts:
    settings = service.settings
    return metadata.ModelFacts(
        name=service.name, version=service.model_version,
        max_batch_size=settings.max_batch_size, max_queue_delay_ms=settings.max_queue_delay_ms,
        max_queue_size=settings.max_queue_size, request_timeout_s=settings.request_timeout_s,
        feature_dim=service.config.output_dim, image_size=service.config.image_size,
        patch_size=service.config.patch_size, insert_start_token=service.insert_start_token,
        device=str(service.device),
    )


async def resolve_model(request: Request, name: str, service: Service) -> metadata.ModelFacts:
    """The served model when ``name`` (and ``version``, on versioned paths) designate it."""
    version = request.path_params.get("version")
    if name != service.name:
        raise ModelNotFound(f"Request for unknown model: '{name}' is not found", field="model",
                            value=name)
    if version not in (None, "", service.model_version):
        raise ModelNotFound(f"Request for unknown model: '{name}' version {version} is not found",
                            field="version", value=version)
    return model_facts(service)


Model = Annotated[metadata.ModelFacts, Depends(resolve_model)]


@router.get("/v2/health/live")
async def live() -> dict[str, bool]:
    return {"live": True}


@router.get("/v2/health/ready")
async def ready(service: Service) -> dict[str, bool]:
    await service.check_ready()
    return {"ready": True}


@router.get("/v2")
async def server() -> dict[str, Any]:
    return metadata.server_metadata()


@router.get("/v2/models/stats")
async def all_stats(service: Service) -> dict[str, Any]:
    return {"model_stats": [service.metrics.statistics.snapshot(service.name, service.model_version)]}


@router.get("/v2/models/{name}")
@router.get("/v2/models/{name}/versions/{version}", openapi_extra=_VERSION)
async def model(facts: Model) -> dict[str, Any]:
    return metadata.model_metadata(facts)


@router.get("/v2/models/{name}/ready")
@router.get("/v2/models/{name}/versions/{version}/ready", openapi_extra=_VERSION)
async def model_ready(facts: Model, service: Service) -> dict[str, Any]:
    await service.check_ready()
    return {"name": facts.name, "ready": True}


@router.get("/v2/models/{name}/config")
@router.get("/v2/models/{name}/versions/{version}/config", openapi_extra=_VERSION)
async def config(facts: Model) -> dict[str, Any]:
    return metadata.model_config(facts)


@router.get("/v2/models/{name}/stats")
@router.get("/v2/models/{name}/versions/{version}/stats", openapi_extra=_VERSION)
async def stats(facts: Model, service: Service) -> dict[str, Any]:
    return {"model_stats": [service.metrics.statistics.snapshot(facts.name, facts.version)]}


@router.post("/v2/repository/index")
async def repository_index(request: Request, service: Service) -> list[dict[str, Any]]:
    """Body may be empty (tritonclient sends none) or ``{"ready": true}`` to filter."""
    body = await read_body(request, _INDEX_BODY_BYTES)
    try:
        ready_only = bool(json.loads(body).get("ready", False)) if body.strip() else False
    except (ValueError, AttributeError) as exc:
        raise InvalidRequest("the index request body must be empty or a JSON object",
                             field="body") from exc
    try:
        await service.check_ready()
        is_ready, reason = True, ""
    except EncoderError as exc:
        is_ready, reason = False, str(exc)
    if ready_only and not is_ready:
        return []
    return metadata.repository_index(model_facts(service), is_ready, reason)


@router.post("/v2/models/{name}/infer")
@router.post("/v2/models/{name}/versions/{version}/infer", openapi_extra=_VERSION)
async def infer(request: Request, facts: Model, service: Service) -> Response:
    body = await read_body(request, service.settings.max_body_bytes)
    parsed = parse_infer_request(body, request.headers.get("inference-header-content-length"),
                                 model=facts.name, max_batch_size=facts.max_batch_size)
    response = await cancel_on_disconnect(request, service.encode(parsed.to_encode_request(),
                                                                  timeout_s=parsed.timeout_s))
    if response is None:  # the caller left: its queued or running work was abandoned
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    chunks, header_length = infer_response(parsed, response, model=facts.name, version=facts.version)
    return _tensor_response(chunks, header_length)


@router.api_route("/v2/{path:path}", methods=["GET", "POST", "PUT", "DELETE"], include_in_schema=False)
async def not_found(path: str) -> Response:
    """Unknown /v2 paths answer in Triton's error shape too."""
    return JSONResponse({"error": f"Not Found: /v2/{path}"}, status_code=404)


def _tensor_response(chunks: list[bytes | memoryview], header_length: int | None) -> Response:
    if header_length is None:
        return Response(chunks[0], media_type="application/json")
    length = sum(len(chunk) if isinstance(chunk, bytes) else chunk.nbytes for chunk in chunks)

    async def stream() -> Any:
        for chunk in chunks:  # tensor bytes go out as views: no join into one buffer
            yield chunk

    return StreamingResponse(stream(), media_type="application/octet-stream", headers={
        "Inference-Header-Content-Length": str(header_length), "Content-Length": str(length)})
