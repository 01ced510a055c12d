"""One place that maps exceptions to HTTP responses, shared by the internal services.

Errors that describe themselves (``proto.DescribedError``: the wire errors and the
encoder's and LM worker's own) become their ``http_status`` with
``{"error": {type, field, message, value}}``. Request-schema errors from FastAPI
become 422 naming the field. Anything else is logged with its traceback and answered
with a generic 500, so internals never leak to clients and nothing is swallowed.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from proto.errors import DescribedError

__all__ = ["error_body", "install_error_handlers", "status_of"]

logger = logging.getLogger(__name__)


def status_of(exc: BaseException) -> int:
    return exc.http_status if isinstance(exc, DescribedError) else 500


def error_body(exc: BaseException) -> dict[str, Any]:
    """The JSON error object: the exception's own description, or a generic one."""
    if isinstance(exc, DescribedError):
        return exc.to_dict()
    return {"type": "internal_error", "message": "internal server error"}


def _validation_body(exc: RequestValidationError) -> dict[str, Any]:
    first = exc.errors()[0] if exc.errors() else {}
    location = [str(part) for part in first.get("loc", ()) if part not in ("body", "query", "path")]
    field = ".".join(location)
    return {"type": "invalid_request", "field": field, "message": f"{field}: {first.get('msg', 'invalid')}"}


def install_error_handlers(app: FastAPI, on_error: Any = None) -> None:
    """Register the handlers; ``on_error(kind)`` (optional) counts errors for metrics.

    ``DescribedError`` needs its own registration: Starlette runs the handler for
    ``Exception`` inside ServerErrorMiddleware, which re-raises after answering — right
    for a bug (the server logs its traceback), wrong for a client's bad request.
    """

    def count(kind: str) -> None:
        if on_error is not None:
            on_error(kind)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        count("invalid_request")
        return JSONResponse({"error": _validation_body(exc)}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        count(f"http_{exc.status_code}")
        return JSONResponse({"error": {"type": "http_error", "message": str(exc.detail)}},
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _any(request: Request, exc: Exception) -> JSONResponse:
        status = status_of(exc)
        if not isinstance(exc, DescribedError):
            logger.exception("unhandled error on %s %s", request.method, request.url.path)
        body = error_body(exc)
        count(body.get("type", "internal_error"))
        retry_after = getattr(exc, "retry_after_s", None)
        headers = {"retry-after": str(max(1, round(retry_after)))} if retry_after and status in (429, 503) else None
        return JSONResponse({"error": body}, status_code=status, headers=headers)

    app.add_exception_handler(DescribedError, _any)
