"""Wire errors: everything that can be wrong with bytes that came over a socket.

Every error names the field (a dotted path such as ``images[1].image_features.shape``)
and the offending value, so a client can fix its request without reading server logs::

    ProtocolError (ValueError)          400, base of all wire errors
    ├── MalformedMessage                not msgpack, not a map, trailing bytes, too deep
    ├── UnsupportedVersion              the ``v`` field is not one this build speaks
    ├── UnknownMessageType              the ``type`` field names no known message
    ├── MissingField                    a required field is absent
    ├── WrongType                       a field has the wrong msgpack type
    ├── InvalidValue                    right type, impossible value (negative, inconsistent)
    ├── BadTensor                       dtype not allowed, bad rank/shape, data length mismatch
    └── LimitExceeded                   413, a size bound (bytes, elements, list length) is hit

All are client errors: the server answers them with a 4xx and keeps serving.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "BadTensor",
    "DescribedError",
    "InvalidValue",
    "LimitExceeded",
    "MalformedMessage",
    "MissingField",
    "ProtocolError",
    "UnknownMessageType",
    "UnsupportedVersion",
    "WrongType",
]

class DescribedError(Exception):
    """An error that names the ``field`` at fault and the ``value`` found there; its
    ``to_dict`` is the JSON error body of every service (``services.common.errors``).
    The base of the wire errors here and of the encoder's and LM worker's errors."""

    http_status = 500
    kind = "error"
    field: str | None = None
    value: Any = None
    # Echoed values are clipped: a client's 10 MB field must not come back in the error.
    max_value_chars = 80

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"type": self.kind, "field": self.field, "message": str(self)}
        if self.value is not None:
            text = repr(self.value)
            if len(text) > self.max_value_chars:
                text = text[: self.max_value_chars - 3] + "..."
            body["value"] = text
        return body


class ProtocolError(DescribedError, ValueError):
    """Base of all wire errors. ``field`` is a dotted path, ``value`` what was found."""

    http_status = 400
    kind = "protocol_error"

    def __init__(self, field: str, message: str, value: Any = None) -> None:
        self.field = field
        self.value = value
        self.message = message
        super().__init__(f"{field}: {message}" if field else message)


class MalformedMessage(ProtocolError):
    kind = "malformed_message"


class UnsupportedVersion(ProtocolError):
    kind = "unsupported_version"


class UnknownMessageType(ProtocolError):
    kind = "unknown_message_type"


class MissingField(ProtocolError):
    kind = "missing_field"

    def __init__(self, field: str) -> None:
        super().__init__(field, "required field is missing")


class WrongType(ProtocolError):
    kind = "wrong_type"

    def __init__(self, field: str, expected: str, value: Any) -> None:
        self.expected = expected
        super().__init__(field, f"expected {expected}, got {type(value).__name__}", value)


class InvalidValue(ProtocolError):
    kind = "invalid_value"


class BadTensor(ProtocolError):
    kind = "bad_tensor"


class LimitExceeded(ProtocolError):
    http_status = 413
    kind = "limit_exceeded"

    def __init__(self, field: str, what: str, value: int, limit: int) -> None:
        self.limit = limit
        super().__init__(field, f"{what} {value} exceeds the limit of {limit}", value)
