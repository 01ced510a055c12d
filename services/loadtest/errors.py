"""Errors of the load tester, and the one function that turns any request failure into
a record's ``(outcome, error_type)``.

Hierarchy::

    LoadTestError
    ├── ConfigError          the user asked for something impossible (a flag, a directory);
    │                        raised before any request is sent, exit status 2
    └── ResponseError        the server answered, but not with a usable completion
        ├── HTTPStatusError  a non-2xx status (the body's first bytes are kept)
        ├── InvalidResponse  2xx, but the body breaks the protocol (bad JSON or SSE,
        │                    no choices, fewer captions than images)
        └── StreamError      an error object sent inside an SSE stream (vLLM does this
                             when generation fails after the 200 was sent)

Transport failures stay httpx's own exceptions (``httpx.ConnectError``,
``httpx.ReadTimeout``…): their class names are already the error types a reader of the
report wants, so they are not wrapped. Nothing here is ever swallowed: a request that
fails for any reason becomes a record with its error type and message.
"""

from __future__ import annotations

import asyncio

import httpx

__all__ = [
    "ConfigError",
    "HTTPStatusError",
    "InvalidResponse",
    "LoadTestError",
    "ResponseError",
    "StreamError",
    "classify_failure",
]

OUTCOME_OK = "ok"
OUTCOME_ERROR = "error"
OUTCOME_TIMEOUT = "timeout"
OUTCOMES = (OUTCOME_OK, OUTCOME_ERROR, OUTCOME_TIMEOUT)

# Error types for the two timeouts the runner itself enforces (httpx's are named by class).
REQUEST_TIMEOUT = "RequestTimeout"  # the request used its whole --timeout-s budget
RUN_DEADLINE = "RunDeadline"  # cut off by the load point's hard deadline


class LoadTestError(Exception):
    """Base of every error the load tester raises itself."""


class ConfigError(LoadTestError):
    """An impossible setting; ``field`` names the flag, ``value`` is what was given."""

    def __init__(self, field: str, value: object, reason: str) -> None:
        super().__init__(f"{field}={value!r}: {reason}")
        self.field = field
        self.value = value
        self.reason = reason


class ResponseError(LoadTestError):
    """The server answered, but the answer is not a usable result."""

    error_type = "ResponseError"
    status_code: int | None = None


class HTTPStatusError(ResponseError):
    error_type = "HTTPStatus"

    def __init__(self, status_code: int, body_excerpt: str) -> None:
        super().__init__(f"HTTP {status_code}: {body_excerpt}")
        self.status_code = status_code
        self.body_excerpt = body_excerpt


class InvalidResponse(ResponseError):
    """``field`` is where the protocol was broken, ``value`` an excerpt of what came."""

    error_type = "InvalidResponse"

    def __init__(self, field: str, reason: str, value: object = None, status_code: int | None = None) -> None:
        excerpt = repr(value)[:200]
        super().__init__(f"{field}: {reason} (got {excerpt})")
        self.field = field
        self.value = value
        self.status_code = status_code


class StreamError(ResponseError):
    error_type = "StreamError"

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


def classify_failure(exc: BaseException) -> tuple[str, str]:
    """``(outcome, error_type)`` for an exception raised while sending one request.

    Timeouts are an outcome of their own (not errors) because they say something
    different about a server: it was alive but too slow for the budget, or the client
    cut it off. Everything else is an error named by its most useful class name.
    """
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return OUTCOME_TIMEOUT, REQUEST_TIMEOUT
    if isinstance(exc, httpx.TimeoutException):
        return OUTCOME_TIMEOUT, type(exc).__name__
    if isinstance(exc, ResponseError):
        return OUTCOME_ERROR, exc.error_type
    return OUTCOME_ERROR, type(exc).__name__
