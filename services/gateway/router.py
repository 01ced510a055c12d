"""HTTP routes: read and bound the body, parse it into protocol objects, call the
services, shape the response. No orchestration lives here.

Non-streaming work runs in a task raced against the client's disconnect (the ASGI
``http.disconnect`` message): a client that gives up cancels its encode and generate
instead of leaving them running. Streams stop through ``SSEResponse``'s close hook.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, TypeVar

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from proto import new_request_id
from services.common.http import CLIENT_CLOSED_REQUEST, cancel_on_disconnect, read_body
from services.common.metrics import metrics_response
from services.gateway.errors import InvalidRequest, invalid_request
from services.gateway.protocol import (
    CaptionOptions,
    CaptionRequest,
    ChatCompletionRequest,
    ModelCard,
    ModelList,
)
from services.gateway.serving import ImageSource
from services.gateway.sse import SSEResponse
from services.gateway.timing import StageTimer

if TYPE_CHECKING:
    from services.gateway.app import GatewayState

__all__ = ["router"]

M = TypeVar("M", bound=BaseModel)

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
_MAX_FORM_FIELDS = 16
_MAX_FORM_FIELD_BYTES = 64 * 1024


def _state(request: Request) -> GatewayState:
    return request.app.state.gateway


async def require_api_key(request: Request) -> None:
    _state(request).auth.check(request.headers.get("authorization"))


def _request_id(request: Request) -> str:
    """The caller's ``x-request-id`` when it is a sane token (for log correlation), else a new one."""
    given = request.headers.get("x-request-id", "")
    return given if _REQUEST_ID.match(given) else new_request_id()


def _parse(schema: type[M], body: bytes) -> M:
    """A JSON body as its protocol object; schema errors become 400s naming the field.

    Strict, as OpenAI's API is: ``"max_tokens": "4"`` or ``"stream": "yes"`` is a wrong
    type, not a value to coerce. (Multipart form fields are all text, so they are not.)
    """
    try:
        return schema.model_validate_json(body, strict=True)
    except ValidationError as exc:
        raise invalid_request(exc) from exc


def _json(body: BaseModel, request_id: str, timer: StageTimer) -> JSONResponse:
    return JSONResponse(body.model_dump(mode="json"),
                        headers={"server-timing": timer.server_timing(), "x-request-id": request_id})


router = APIRouter()
v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])


@router.get("/health")
async def health() -> dict[str, str]:
    """Liveness: the process serves HTTP (readiness is ``/ready``)."""
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    """200 when every downstream tier has a ready endpoint (probed now), else 503."""
    state = _state(request)
    ok = await state.probe()
    body = {"status": "ready" if ok else "not ready", "encoder": state.encoder_pool.to_dict(),
            "lm": state.lm_pool.to_dict()}
    return JSONResponse(body, status_code=200 if ok else 503)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return metrics_response(_state(request).metrics.registry)


@v1.get("/models")
async def list_models(request: Request) -> ModelList:
    state = _state(request)
    return ModelList(data=[ModelCard(id=state.settings.model_name, created=state.started)])


@v1.get("/models/{model_id}")
async def get_model(model_id: str, request: Request) -> ModelCard:
    state = _state(request)
    state.pipeline.check_model(model_id)
    return ModelCard(id=model_id, created=state.started)


@v1.post("/chat/completions", response_model=None)
async def chat_completions(request: Request) -> Response:
    state = _state(request)
    body = await read_body(request, state.settings.max_body_bytes)
    chat_request = _parse(ChatCompletionRequest, body)
    request_id, timer = _request_id(request), StageTimer()
    if chat_request.stream:
        stream = await cancel_on_disconnect(request, state.chat.stream(chat_request, request_id=request_id,
                                                                       timer=timer))
        if stream is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        return SSEResponse(stream.events, on_close=stream.close, headers={**stream.headers, "x-request-id": request_id})
    result = await cancel_on_disconnect(request, state.chat.complete(chat_request, request_id=request_id, timer=timer))
    return Response(status_code=CLIENT_CLOSED_REQUEST) if result is None else _json(result, request_id, timer)


@v1.post("/captions", response_model=None)
async def captions(request: Request) -> Response:
    state = _state(request)
    body = await read_body(request, state.settings.max_body_bytes)
    if request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        sources, options = await _parse_caption_form(request, body, max_files=state.settings.max_images + 1)
    else:
        caption_request = _parse(CaptionRequest, body)
        param = "image" if caption_request.image is not None else "images"
        sources = [ImageSource(param=param if param == "image" else f"images[{i}]", base64=text)
                   for i, text in enumerate(caption_request.image_list)]
        options = caption_request
    request_id, timer = _request_id(request), StageTimer()
    work = state.captions.caption(sources, prompt=options.prompt, max_tokens=options.max_tokens,
                                  temperature=options.temperature, request_id=request_id, timer=timer,
                                  cache_salt=options.cache_salt)
    result = await cancel_on_disconnect(request, work)
    return Response(status_code=CLIENT_CLOSED_REQUEST) if result is None else _json(result, request_id, timer)


async def _parse_caption_form(request: Request, body: bytes, *, max_files: int) -> tuple[list[ImageSource],
                                                                                          CaptionOptions]:
    """Multipart: every file part is an image (in order); text fields are options."""

    async def replay() -> AsyncIterator[bytes]:  # the body was already read, within its bound
        yield body

    parser = MultiPartParser(request.headers, replay(), max_files=max_files, max_fields=_MAX_FORM_FIELDS,
                             max_part_size=_MAX_FORM_FIELD_BYTES)
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise InvalidRequest(f"malformed multipart body: {exc.message}") from exc
    try:
        sources: list[ImageSource] = []
        fields: dict[str, str] = {}
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                sources.append(ImageSource(param=f"{name}[{len(sources)}]", data=await value.read()))
            else:
                fields[name] = value
    finally:
        await form.close()
    try:
        return sources, CaptionOptions.model_validate(fields)
    except ValidationError as exc:
        raise invalid_request(exc) from exc


router.include_router(v1)
