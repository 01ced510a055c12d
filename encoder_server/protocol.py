"""The native API's request forms: ``POST /v1/encode`` bodies -> `EncodeRequest`.

Three forms reach the same message: a raw body with an image Content-Type (one image),
``multipart/form-data`` (one or more files, in order), or an ``application/x-msgpack``
`EncodeRequest`. Which one is decided by the Content-Type alone, never by sniffing, so
a client learns a wrong header from a 415 instead of from a confusing decode error.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping

from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

import proto
from encoder_server.errors import InvalidRequest, UnsupportedMediaType
from proto import EncodeRequest, WireLimits

__all__ = [
    "ACCEPTED_MEDIA_TYPES",
    "IMAGE_MEDIA_TYPES",
    "media_type",
    "output_dtype",
    "parse_encode_body",
]

IMAGE_MEDIA_TYPES = ("image/jpeg", "image/png", "image/webp", "image/gif")
MULTIPART = "multipart/form-data"
ACCEPTED_MEDIA_TYPES = (*IMAGE_MEDIA_TYPES, MULTIPART, proto.CONTENT_TYPE)

# Short and long spellings of the feature dtypes; the wire uses the long ones.
_DTYPE_NAMES: Mapping[str, str] = {
    "bf16": "bfloat16", "bfloat16": "bfloat16",
    "fp16": "float16", "float16": "float16", "half": "float16",
    "fp32": "float32", "float32": "float32", "float": "float32",
}
_MAX_REQUEST_ID_LEN = 128


def media_type(content_type: str | None) -> str:
    """``"Image/JPEG; charset=x"`` -> ``"image/jpeg"``."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def output_dtype(name: str, field: str = "dtype") -> str:
    """A feature dtype name (bf16/fp16/fp32 or the long forms) -> its wire name."""
    try:
        return _DTYPE_NAMES[name.strip().lower()]
    except KeyError:
        raise InvalidRequest("must be one of bf16, fp16, fp32 (or bfloat16, float16, float32)",
                             field=field, value=name) from None


def _request_id(value: str | None, field: str) -> str:
    if not value:
        return proto.new_request_id()
    if len(value) > _MAX_REQUEST_ID_LEN or not value.isprintable():
        raise InvalidRequest(f"must be printable and at most {_MAX_REQUEST_ID_LEN} characters",
                             field=field, value=value)
    return value


async def parse_encode_body(headers: Headers, body: bytes, *, dtype: str | None,
                            limits: WireLimits) -> EncodeRequest:
    """Build the `EncodeRequest` a body describes; ``dtype`` (``?dtype=``) wins when given."""
    kind = media_type(headers.get("content-type"))
    if kind not in ACCEPTED_MEDIA_TYPES:
        raise UnsupportedMediaType(
            f"Content-Type {kind or '(none)'!r} is not accepted; send one of "
            + ", ".join(ACCEPTED_MEDIA_TYPES), field="content-type", value=kind or None)
    if not body:
        raise InvalidRequest("the request body is empty", field="body")
    request_id = _request_id(headers.get("x-request-id"), "x-request-id")
    if kind == proto.CONTENT_TYPE:
        request = proto.decode(body, expect=EncodeRequest, limits=limits)
    elif kind == MULTIPART:
        request = await _parse_multipart(headers, body, request_id)
    else:
        request = EncodeRequest(images=[body], request_id=request_id)
    if dtype is not None:
        request.output_dtype = output_dtype(dtype)
    return request


async def _parse_multipart(headers: Headers, body: bytes, request_id: str) -> EncodeRequest:
    """Every file part is an image, in order; ``output_dtype``/``request_id`` may be fields."""

    async def once() -> AsyncIterator[bytes]:
        yield body

    try:
        # The body is already read and bounded; the parser only splits it.
        form = await MultiPartParser(headers, once()).parse()
    except MultiPartException as exc:
        raise InvalidRequest(f"malformed multipart body: {exc.message}", field="body") from exc
    request = EncodeRequest(request_id=request_id)
    try:
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                request.images.append(await value.read())
            elif key == "output_dtype":
                request.output_dtype = output_dtype(value, "output_dtype")
            elif key == "request_id":
                request.request_id = _request_id(value, "request_id")
            else:
                raise InvalidRequest("unknown form field (expected files, output_dtype, request_id)",
                                     field=key)
    finally:
        await form.close()
    if not request.images:
        raise InvalidRequest("the multipart body holds no files", field="images")
    return request
