"""Errors of the LM worker.

::

    LMWorkerError
    ├── ClientError (ValueError)              4xx: the request is wrong; the worker keeps serving
    │   ├── ImageInsertError                  features and token layout do not fit together
    │   │   ├── FeatureCountMismatch          #feature blocks != #start tokens
    │   │   ├── SpanOutOfRange                a block would run past the sequence end
    │   │   ├── PlaceholderMismatch           a block would overwrite non-placeholder tokens
    │   │   └── FeatureDimMismatch            feature dim != the projector's input dim
    │   ├── TokenLayoutError                  prompt / input_ids do not match the images sent
    │   ├── ContextLengthExceeded             prompt + image tokens + max_new_tokens too long
    │   └── UnsupportedMediaType              415: the body is not msgpack
    └── ServerError (RuntimeError)            5xx
        ├── EngineError                       500: a model step failed; its sequences are failed
        ├── EngineUnavailable                 503: the engine is not running (stopping, stopped)
        └── Overloaded                        503: waiting queue full

Wire-level problems (bad msgpack, wrong types, bad sampling values, unknown version)
are ``proto.ProtocolError``s, raised before a request reaches this package. Every
error names the ``field`` that was wrong and carries the ``value`` found there.
"""

from __future__ import annotations

from typing import Any

from proto.errors import DescribedError

__all__ = [
    "ClientError",
    "ContextLengthExceeded",
    "EngineError",
    "EngineUnavailable",
    "FeatureCountMismatch",
    "FeatureDimMismatch",
    "ImageInsertError",
    "LMWorkerError",
    "Overloaded",
    "PlaceholderMismatch",
    "ServerError",
    "SpanOutOfRange",
    "TokenLayoutError",
    "UnsupportedMediaType",
]


class LMWorkerError(DescribedError):
    http_status = 500
    kind = "internal_error"

    def __init__(self, field: str, message: str, value: Any = None) -> None:
        self.field = field
        self.value = value
        super().__init__(f"{field}: {message}" if field else message)


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


class TokenLayoutError(ClientError):
    """A prompt or raw ``input_ids`` that does not match the images sent with it.

    ``field`` names the place (``input_ids[17]``, ``prompt``, ``image_token_counts[1]``)
    and ``value`` what was found there.
    """

    kind = "token_layout_error"


class ContextLengthExceeded(ClientError):
    kind = "context_length_exceeded"


class UnsupportedMediaType(ClientError):
    http_status = 415
    kind = "unsupported_media_type"


class ServerError(LMWorkerError, RuntimeError):
    http_status = 500


class EngineError(ServerError):
    """A model step raised; the sequences in that step fail, the engine keeps serving."""

    kind = "engine_error"


class EngineUnavailable(ServerError):
    http_status = 503
    kind = "engine_unavailable"


class Overloaded(ServerError):
    http_status = 503
    kind = "overloaded"
