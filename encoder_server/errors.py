"""Errors raised by the encoder service, each knowing its HTTP status.

Hierarchy::

    EncoderError                 (500) base; never raised directly
    ├── ClientError              (4xx) the request was wrong; retrying it unchanged fails again
    │   ├── InvalidRequest       (400) malformed request: empty body, bad parameter, bad tensor
    │   ├── BadImage             (400) undecodable, truncated, empty, wrong shape or range
    │   │   └── ImageTooLarge    (413) declared size over the pixel or side limit
    │   ├── TooManyImages        (413) more images in one request than allowed
    │   ├── ModelNotFound        (404) unknown model name or version (KServe routes)
    │   └── UnsupportedMediaType (415) a Content-Type the endpoint does not take
    └── ServerError              (5xx) the request may succeed later or elsewhere
        ├── Overloaded           (503) the service sheds load; carries an optional Retry-After
        │   ├── QueueFull        (503) the batcher's queue is at capacity
        │   └── NotReady         (503) not started, shutting down, or the health forward failed
        └── RequestTimeout       (504) the request's deadline passed before its result was ready

Every error names the `field` that was wrong (e.g. ``images[2]``), the `reason`, and
where useful the offending `value`, and describes itself with `to_dict()`, so the one
function that maps errors to HTTP (`services.common.errors`) builds a precise body
without parsing messages. The status lives on the class (`http_status`) because it is
a property of the kind of failure, not of one occurrence.
"""

from __future__ import annotations

from typing import Any, ClassVar

from proto.errors import DescribedError

__all__ = [
    "BadImage",
    "ClientError",
    "EncoderError",
    "ImageTooLarge",
    "InvalidRequest",
    "ModelNotFound",
    "NotReady",
    "Overloaded",
    "QueueFull",
    "RequestTimeout",
    "ServerError",
    "TooManyImages",
    "UnsupportedMediaType",
]

class EncoderError(DescribedError):
    """Base of the encoder's errors; unknown exceptions are not wrapped in it."""

    http_status: ClassVar[int] = 500
    kind: ClassVar[str] = "encoder_error"
    max_value_chars = 200

    def __init__(self, reason: str, *, field: str | None = None, value: object = None) -> None:
        self.reason = reason
        self.field = field
        self.value = value
        super().__init__(f"{field}: {reason}" if field else reason)


class ClientError(EncoderError):
    """The request itself is at fault (4xx)."""

    http_status: ClassVar[int] = 400
    kind: ClassVar[str] = "client_error"


class InvalidRequest(ClientError):
    """A request that is malformed as a whole or in one parameter (`field` says which)."""

    http_status: ClassVar[int] = 400
    kind: ClassVar[str] = "invalid_request"


class BadImage(ClientError):
    """An image that cannot be decoded or used: `BadImage("images[2]", "truncated JPEG")`."""

    http_status: ClassVar[int] = 400
    kind: ClassVar[str] = "bad_image"

    def __init__(self, field: str, reason: str, *, value: object = None) -> None:
        super().__init__(reason, field=field, value=value)


class ImageTooLarge(BadImage):
    """An image whose declared dimensions exceed the configured limits.

    Raised from the header, before any pixel is decoded, so a small file declaring a
    huge canvas (a decompression bomb) costs nothing. `value` is "WIDTHxHEIGHT".
    """

    http_status: ClassVar[int] = 413
    kind: ClassVar[str] = "image_too_large"


class TooManyImages(ClientError):
    """More images in one request than `--max-images-per-request`; `value` is the count."""

    http_status: ClassVar[int] = 413
    kind: ClassVar[str] = "too_many_images"


class ModelNotFound(ClientError):
    """A model name or version this server does not serve (KServe routes name both)."""

    http_status: ClassVar[int] = 404
    kind: ClassVar[str] = "model_not_found"


class UnsupportedMediaType(ClientError):
    """A Content-Type the endpoint does not accept; the message lists those it does."""

    http_status: ClassVar[int] = 415
    kind: ClassVar[str] = "unsupported_media_type"


class ServerError(EncoderError):
    """The service could not do the work now (5xx); the request itself may be fine."""

    http_status: ClassVar[int] = 500
    kind: ClassVar[str] = "server_error"


class Overloaded(ServerError):
    """The service is shedding load; clients should back off and retry."""

    http_status: ClassVar[int] = 503
    kind: ClassVar[str] = "overloaded"

    def __init__(
        self,
        reason: str,
        *,
        field: str | None = None,
        value: object = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(reason, field=field, value=value)
        self.retry_after_s = retry_after_s

    def to_dict(self) -> dict[str, Any]:
        body = super().to_dict()
        if self.retry_after_s is not None:
            body["retry_after_s"] = self.retry_after_s
        return body


class QueueFull(Overloaded):
    """The batcher's queue is at capacity (`value` is its depth)."""

    kind: ClassVar[str] = "queue_full"


class NotReady(Overloaded):
    """The model cannot serve right now: still starting, shutting down, or failing its
    health forward. 503 so load balancers route around this replica."""

    kind: ClassVar[str] = "not_ready"


class RequestTimeout(ServerError):
    """The request's deadline (queue wait + forward) passed; the work may still finish
    and is then discarded. 504, as for any deadline exceeded upstream of the client."""

    http_status: ClassVar[int] = 504
    kind: ClassVar[str] = "request_timeout"
