"""Errors of the LM worker.

::

    LMWorkerError
    ├── ClientError (ValueError)              4xx: the request is wrong; the worker keeps serving
    │   ├── ImageInsertError                  features and token layout do not fit together
    │   │   ├── FeatureCountMismatch          #feature blocks != #start tokens
    │   │   ├── SpanOutOfRange                a block would run past the sequence end
    │   │   ├── PlaceholderMismatch           a block would overwrite non-placeholder tokens
    │   │   └── FeatureDimMismatch            feature dim != the projector's input dim
    │   └── ContextLengthExceeded             prompt + image tokens + max_new_tokens too long
    └── ServerError (RuntimeError)            5xx
        └── Overloaded                        503: waiting queue full

Wire-level problems (bad msgpack, wrong types) are ``proto.ProtocolError``s, raised
before a request reaches this package.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ClientError",
    "ContextLengthExceeded",
    "FeatureCountMismatch",
    "FeatureDimMismatch",
    "ImageInsertError",
    "LMWorkerError",
    "Overloaded",
    "PlaceholderMismatch",
    "ServerError",
    "SpanOutOfRange",
]


class LMWorkerError(Exception):
    http_status = 500
    kind = "internal_error"

    def __init__(self, field: str, message: str, value: Any = None) -> None:
        self.field = field
        self.value = value
        super().__init__(f"{field}: {message}" if field else message)

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"type": self.kind, "field": self.field, "message": str(self)}
        if self.value is not None:
            body["value"] = repr(self.value)[:80]
        return body


class ClientError(LMWorkerError, ValueError):
    http_status = 400
    kind = "invalid_request"


class ImageInsertError(ClientError):
    kind = "image_insert_error"


class FeatureCountMismatch(ImageInsertError):
    def __init__(self, field: str, blocks: int, start_tokens: int, token_id: int) -> None:
        self.blocks = blocks
        self.start_tokens = start_tokens
        super().__init__(
            field,
            f"{blocks} image feature block(s) but {start_tokens} start token(s) (id {token_id}) in input_ids",
        )


class SpanOutOfRange(ImageInsertError):
    pass


class PlaceholderMismatch(ImageInsertError):
    pass


class FeatureDimMismatch(ImageInsertError):
    pass


class ContextLengthExceeded(ClientError):
    http_status = 400
    kind = "context_length_exceeded"


class ServerError(LMWorkerError, RuntimeError):
    http_status = 500


class Overloaded(ServerError):
    http_status = 503
    kind = "overloaded"
