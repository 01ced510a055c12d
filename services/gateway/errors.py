"""The gateway's errors, and the one function that maps any exception to OpenAI's shape.

Every error answers ``{"error": {"message", "type", "param", "code"}}`` with the status
below; ``param`` is the request field at fault (``messages[0].content[1].image_url``)::

    GatewayError (Exception)                    status  type / code
    ├── ClientError                             4xx: the request must change
    │   ├── InvalidRequest                      400  invalid_request_error / invalid_request
    │   │   ├── InvalidImage                    400  … / invalid_image: not JPEG/PNG/WebP/GIF, bad base64
    │   │   └── ImageUrlNotAllowed              400  … / image_url_not_allowed: host not allow-listed
    │   ├── AuthenticationFailed                401  authentication_error / invalid_api_key
    │   ├── ModelNotFound                       404  invalid_request_error / model_not_found
    │   ├── PayloadTooLarge                     413  … / payload_too_large: a byte bound (body, image)
    │   └── LimitExceeded                       422  … / limit_exceeded: a count bound (images, pixels,
    │                                                prompt characters, max_tokens)
    └── ServerError                             5xx: the request was fine; retrying later may work
        ├── UpstreamError                       502  server_error / upstream_error: a downstream failed,
        │                                            was unreachable or answered garbage
        ├── ServiceUnavailable                  503  server_error / service_unavailable: no ready
        │                                            endpoint, a downstream or the gateway overloaded
        └── UpstreamTimeout                     504  server_error / upstream_timeout

Errors from a downstream also say whether another endpoint may be tried
(``retryable``: nothing was done, or the work is idempotent) and whether the failure
counts against the endpoint's health (``endpoint_fault``). Wire errors from
``proto`` (raised by the bounded body reader) map to 413 / 400; anything unexpected
is logged with its traceback and answered with a generic 500. Request bodies that
fail their schema become ``InvalidRequest`` where they are parsed (:func:`invalid_request`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

import proto

__all__ = [
    "AuthenticationFailed",
    "ClientError",
    "GatewayError",
    "ImageUrlNotAllowed",
    "InvalidImage",
    "InvalidRequest",
    "LimitExceeded",
    "ModelNotFound",
    "PayloadTooLarge",
    "ServerError",
    "ServiceUnavailable",
    "UpstreamError",
    "UpstreamTimeout",
    "error_response",
    "install_error_handlers",
    "invalid_request",
    "to_gateway_error",
    "validation_param",
]

logger = logging.getLogger(__name__)


class GatewayError(Exception):
    """Base: ``message`` for the client, ``param`` the field at fault, ``value`` what came.

    ``upstream_field`` is the field a downstream named when it refused our request, in
    that request's terms (``images[2]`` of an encode batch), for the caller to translate.
    """

    status = 500
    type = "server_error"
    code = "internal_error"

    def __init__(self, message: str, *, param: str | None = None, value: Any = None,
                 retryable: bool = False, endpoint_fault: bool = False, connection_lost: bool = False,
                 headers: dict[str, str] | None = None, upstream_field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.value = value
        self.upstream_field = upstream_field
        self.retryable = retryable
        self.endpoint_fault = endpoint_fault
        # The connection died under the call (closed by the server as it was reused, or
        # the server went away): a fresh connection to the same endpoint may well work.
        self.connection_lost = connection_lost
        self.headers = headers or {}

    def to_dict(self) -> dict[str, Any]:
        return {"message": self.message, "type": self.type, "param": self.param, "code": self.code}


class ClientError(GatewayError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class InvalidRequest(ClientError):
    pass


class InvalidImage(InvalidRequest):
    code = "invalid_image"


class ImageUrlNotAllowed(InvalidRequest):
    code = "image_url_not_allowed"


class AuthenticationFailed(ClientError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"www-authenticate": "Bearer"})


class ModelNotFound(ClientError):
    status = 404
    code = "model_not_found"


class PayloadTooLarge(ClientError):
    status = 413
    code = "payload_too_large"


class LimitExceeded(ClientError):
    status = 422
    code = "limit_exceeded"


class ServerError(GatewayError):
    pass


class UpstreamError(ServerError):
    status = 502
    code = "upstream_error"


class ServiceUnavailable(ServerError):
    status = 503
    code = "service_unavailable"

    def __init__(self, message: str, **kwargs: Any) -> None:
        kwargs.setdefault("headers", {"retry-after": "1"})
        super().__init__(message, **kwargs)


class UpstreamTimeout(ServerError):
    status = 504
    code = "upstream_timeout"


def _format_loc(loc: tuple[Any, ...]) -> str:
    """``("messages", 0, "content", "list[ContentPart]", 1, "image_url")`` →
    ``messages[0].content[1].image_url`` (pydantic puts union member labels in the path)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and part not in ("body", "str", "int", "float", "bool") and "[" not in part:
            out += f".{part}" if out else part
    return out


def validation_param(errors: list[dict[str, Any]]) -> tuple[str, str]:
    """The field and message of the most specific pydantic error.

    A union field reports one error per member; the deepest location is the member
    the client meant (a list of parts, not "a string"), so it names the real problem.
    """
    if not errors:
        return "", "invalid request"
    error = max(errors, key=lambda e: len(e.get("loc", ())))
    param = _format_loc(tuple(error.get("loc", ())))
    message = str(error.get("msg", "invalid value"))
    return param, f"{param}: {message}" if param else message


def to_gateway_error(exc: BaseException) -> GatewayError | None:
    """The gateway error an exception stands for, or ``None`` for an unexpected one."""
    if isinstance(exc, GatewayError):
        return exc
    if isinstance(exc, proto.LimitExceeded):
        return PayloadTooLarge(str(exc), param=exc.field, value=exc.value)
    if isinstance(exc, proto.ProtocolError):
        return InvalidRequest(str(exc), param=exc.field, value=exc.value)
    if isinstance(exc, RequestValidationError):
        return invalid_request(exc)
    if isinstance(exc, StarletteHTTPException):
        error = ClientError(str(exc.detail)) if exc.status_code < 500 else ServerError(str(exc.detail))
        error.status = exc.status_code
        error.headers = dict(exc.headers or {})
        return error
    # A pydantic ValidationError is deliberately absent: request bodies are converted
    # at the boundary (invalid_request); one raised anywhere else is our bug, a 500.
    return None


def invalid_request(exc: ValidationError | RequestValidationError) -> InvalidRequest:
    """A request body that failed its schema → 400 naming the field."""
    param, message = validation_param(list(exc.errors()))
    return InvalidRequest(message, param=param or None)


def error_response(exc: BaseException) -> JSONResponse:
    """Map any exception to an OpenAI-shaped JSON response (the gateway's one mapping)."""
    error = to_gateway_error(exc)
    if error is None:
        logger.error("unhandled error", exc_info=exc)
        error = GatewayError("internal server error")
    return JSONResponse({"error": error.to_dict()}, status_code=error.status, headers=error.headers)


def install_error_handlers(app: FastAPI, on_error: Callable[[GatewayError | None], None] | None = None) -> None:
    """Route every exception through :func:`error_response`; ``on_error`` feeds metrics."""

    async def handle(request: Request, exc: Exception) -> JSONResponse:
        if on_error is not None:
            on_error(to_gateway_error(exc))
        return error_response(exc)

    for exc_type in (GatewayError, proto.ProtocolError, RequestValidationError, StarletteHTTPException, Exception):
        app.add_exception_handler(exc_type, handle)
