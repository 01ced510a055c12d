"""Downstream outcomes → gateway errors, the same way for the encoder and the LM worker.

The rules: a 4xx means the client's input was refused (pass the downstream's message
on, with the matching status) unless it is a status only a misconfigured gateway
could cause (404, 405: a wrong URL or model name → 502). "Busy" (429/503) is 503 and
may be tried elsewhere without counting against the endpoint. An endpoint that cannot
be reached makes the service unavailable (503). Connection failures, dropped
connections, timeouts and other 5xx count against the endpoint; they may be
retried elsewhere when nothing was sent yet (connect errors) or the call is
idempotent (encodes). A downstream's 5xx text stays in the log, not in the answer.
"""

from __future__ import annotations

import json
import logging

import httpx

from services.common import rpc
from services.gateway.errors import (
    GatewayError,
    InvalidRequest,
    PayloadTooLarge,
    ServiceUnavailable,
    UpstreamError,
    UpstreamTimeout,
)

__all__ = ["error_from_exception", "error_from_rpc", "error_from_status", "read_bounded"]

logger = logging.getLogger(__name__)

_MAX_ERROR_BODY = 64 * 1024
_MAX_MESSAGE_CHARS = 500


async def read_bounded(response: httpx.Response, max_bytes: int, *, service: str) -> bytes:
    """A streamed response's body, refusing one larger than ``max_bytes``."""
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise UpstreamError(f"the {service} answered {declared} bytes; the limit is {max_bytes}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > max_bytes:
            raise UpstreamError(f"the {service} answered more than {max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _message(body: bytes) -> str:
    """The human part of a downstream error body (ours, Triton's or a plain text one)."""
    text = body[:_MAX_ERROR_BODY].decode("utf-8", "replace").strip()
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError:
        return text[:_MAX_MESSAGE_CHARS]
    if isinstance(parsed, dict):
        error = parsed.get("error", parsed.get("detail", parsed))
        if isinstance(error, dict):
            error = error.get("message", error)
        return str(error)[:_MAX_MESSAGE_CHARS]
    return text[:_MAX_MESSAGE_CHARS]


def _field(body: bytes) -> str | None:
    """The field our services name in an error body (``{"error": {"field": ...}}``), if any."""
    try:
        parsed = json.loads(body[:_MAX_ERROR_BODY])
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    error = parsed.get("error") if isinstance(parsed, dict) else None
    field = error.get("field") if isinstance(error, dict) else None
    return field if isinstance(field, str) else None


def error_from_status(service: str, status: int, body: bytes, *, idempotent: bool) -> GatewayError:
    message = _message(body)
    if status in (400, 422):
        return InvalidRequest(f"the {service} refused the request: {message}", upstream_field=_field(body))
    if status == 413:
        return PayloadTooLarge(f"the {service} refused the request: {message}", upstream_field=_field(body))
    if status in (429, 503):
        return ServiceUnavailable(f"the {service} is overloaded; retry later ({message})", retryable=True)
    logger.warning("%s answered HTTP %d: %s", service, status, message)
    if status == 504:
        return UpstreamTimeout(f"the {service} timed out (HTTP 504)", retryable=idempotent, endpoint_fault=True)
    return UpstreamError(f"the {service} failed (HTTP {status})", retryable=idempotent or status < 500,
                         endpoint_fault=True)


def error_from_exception(service: str, exc: httpx.HTTPError, *, idempotent: bool) -> GatewayError:
    name = type(exc).__name__
    if isinstance(exc, httpx.PoolTimeout):
        # Our own connection pool is exhausted: the endpoint is not at fault.
        return ServiceUnavailable(f"too many requests in flight to the {service}", retryable=True)
    if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):
        # Nothing reached the endpoint, so any call may go elsewhere; with nowhere
        # else to go the service is unavailable (503), not misbehaving (502).
        return ServiceUnavailable(f"could not connect to the {service} ({name})", retryable=True,
                                  endpoint_fault=True)
    if isinstance(exc, httpx.TimeoutException):
        return UpstreamTimeout(f"the {service} did not answer in time ({name})", endpoint_fault=True)
    if isinstance(exc, (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)):
        # The connection died mid-request (a replica was killed): safe to resend only
        # if the call is idempotent.
        return UpstreamError(f"the connection to the {service} was lost ({name})", retryable=idempotent,
                             endpoint_fault=True, connection_lost=True)
    return UpstreamError(f"calling the {service} failed ({name}: {exc})")


def error_from_rpc(service: str, exc: rpc.RpcError, *, idempotent: bool) -> GatewayError:
    """The same outcomes over the call channel (``services.common.rpc``)."""
    if isinstance(exc, rpc.RpcFailed):
        return error_from_status(service, exc.status, exc.body, idempotent=idempotent)
    if isinstance(exc, rpc.RpcUnavailable):
        return ServiceUnavailable(f"could not connect to the {service} ({exc})", retryable=True, endpoint_fault=True)
    if isinstance(exc, rpc.RpcTimeout):
        return UpstreamTimeout(f"the {service} did not answer in time ({exc})", endpoint_fault=True)
    if isinstance(exc, rpc.RpcConnectionLost):
        return UpstreamError(f"the connection to the {service} was lost ({exc})", retryable=idempotent,
                             endpoint_fault=True, connection_lost=True)
    return UpstreamError(f"the {service} broke the call protocol ({exc})", retryable=idempotent, endpoint_fault=True)
