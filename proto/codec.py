"""``encode(msg) -> bytes`` and ``decode(bytes) -> msg``: the message envelope.

A message is one msgpack map: ``{"v": 1, "type": "<MessageName>", ...fields}``. The
version lets peers of different builds refuse each other clearly instead of
misreading fields. Decoding bounds every size before allocating: the byte length,
each container's length (msgpack's own ``max_*_len``), the total number of decoded
objects (so a message of many empty lists cannot expand ~50× into Python objects),
and tensor elements (``proto.tensor``). Nothing here can execute code: no pickle, no
``torch.load``, no msgpack extension types.
"""

from __future__ import annotations

from typing import Any, TypeVar

import msgpack

from proto.errors import (
    LimitExceeded,
    MalformedMessage,
    UnknownMessageType,
    UnsupportedVersion,
    WrongType,
)
from proto.image_for_insert import ImageForInsert
from proto.limits import DEFAULT_LIMITS, WireLimits
from proto.messages import EncodeRequest, EncodeResponse, GenerateRequest, GenerateResponse
from proto.tensor import DecodeBudget

__all__ = [
    "CONTENT_TYPE",
    "MESSAGE_TYPES",
    "SUPPORTED_VERSIONS",
    "WIRE_VERSION",
    "decode",
    "encode",
    "encode_chunks",
]

WIRE_VERSION = 1
SUPPORTED_VERSIONS = frozenset({1})
CONTENT_TYPE = "application/x-msgpack"

MESSAGE_TYPES: dict[str, type] = {
    cls.__name__: cls
    for cls in (ImageForInsert, EncodeRequest, EncodeResponse, GenerateRequest, GenerateResponse)
}
_ENVELOPE_KEYS = ("v", "type")
_MAX_OBJECTS = 1_000_000  # containers + their items in one message

M = TypeVar("M")


def encode_chunks(msg: Any) -> list[bytes | memoryview]:
    """Serialise a message as a list of byte chunks whose concatenation is msgpack.

    Large tensor payloads appear as memoryviews of the tensors themselves, so a
    streaming writer (an HTTP response body, a call frame) sends them without any copy;
    everything between them is packed into one ``bytes`` chunk.
    """
    name = type(msg).__name__
    if MESSAGE_TYPES.get(name) is not type(msg):
        raise TypeError(f"{name} is not a wire message; known: {sorted(MESSAGE_TYPES)}")
    body = msg.to_wire()
    body["v"] = WIRE_VERSION
    body["type"] = name
    chunks: list[bytes | memoryview] = []
    packer = msgpack.Packer(use_bin_type=True, autoreset=False)  # small items gather in its buffer
    _pack_into(body, packer, chunks)
    tail = packer.bytes()
    if tail:
        chunks.append(tail)
    return chunks


def encode(msg: Any) -> bytes:
    """Serialise a message (one of ``MESSAGE_TYPES``) to msgpack bytes: one copy of the data."""
    return b"".join(encode_chunks(msg))


_INLINE_BIN_BYTES = 4096


def _bin_header(nbytes: int) -> bytes:
    # msgpack spec: bin 16 (0xc5) / bin 32 (0xc6), big-endian length.
    if nbytes < 1 << 16:
        return b"\xc5" + nbytes.to_bytes(2, "big")
    if nbytes < 1 << 32:
        return b"\xc6" + nbytes.to_bytes(4, "big")
    raise ValueError(f"a msgpack bin holds at most 4 GiB, got {nbytes} bytes")


def _pack_into(obj: Any, packer: msgpack.Packer, chunks: list[bytes | memoryview]) -> None:
    # msgpack.packb would copy each tensor into a growing buffer (reallocating as it
    # doubles) and then copy the whole buffer into bytes; ending the packer's buffer
    # with the bin header and handing the tensor's memory through as its own chunk
    # avoids both.
    if isinstance(obj, dict):
        packer.pack_map_header(len(obj))
        for key, value in obj.items():
            packer.pack(key)
            _pack_into(value, packer, chunks)
    elif isinstance(obj, list):
        packer.pack_array_header(len(obj))
        for value in obj:
            _pack_into(value, packer, chunks)
    elif isinstance(obj, memoryview) and obj.nbytes > _INLINE_BIN_BYTES:
        chunks.append(packer.bytes() + _bin_header(obj.nbytes))
        packer.reset()
        chunks.append(obj.cast("B"))
    else:
        packer.pack(obj)


class _ObjectCounter:
    """msgpack hooks that stop decoding once a message holds too many objects."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count = 0

    def _charge(self, n: int) -> None:
        self.count += n + 1
        if self.count > self.limit:
            raise LimitExceeded("message", "decoded object count", self.count, self.limit)

    def on_list(self, items: list) -> list:
        self._charge(len(items))
        return items

    def on_map(self, mapping: dict) -> dict:
        self._charge(len(mapping))
        return mapping


def _refuse_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"msgpack extension types are not part of this protocol (got ext {code})")


def _unpack(data: bytes | bytearray | memoryview, limits: WireLimits) -> Any:
    counter = _ObjectCounter(_MAX_OBJECTS)
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=True,
            list_hook=counter.on_list,
            object_hook=counter.on_map,
            max_bin_len=limits.max_message_bytes,
            max_str_len=limits.max_str_len,
            max_array_len=limits.max_list_len,
            max_map_len=limits.max_map_len,
            max_ext_len=64,
            ext_hook=_refuse_ext,
        )
    except LimitExceeded:
        raise
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        # msgpack signals every malformation (bad bytes, trailing data, nesting too
        # deep, non-string keys, ext types) with one of these. Some carry no text
        # (FormatError, StackError); their docstring says what they mean.
        reason = str(exc) or (type(exc).__doc__ or "").strip()
        raise MalformedMessage("message", f"not a valid msgpack message ({type(exc).__name__}: {reason})") from exc


def decode(data: bytes | bytearray | memoryview, *, expect: type[M] | None = None,
           limits: WireLimits = DEFAULT_LIMITS) -> M:
    """Parse and validate a message; raises a ``ProtocolError`` naming what is wrong.

    ``expect`` restricts the accepted message type (a service endpoint knows which
    message it takes). Tensors in the result are views of the received buffer.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"decode takes bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise MalformedMessage("message", "empty body")
    if len(data) > limits.max_message_bytes:
        raise LimitExceeded("message", "size in bytes", len(data), limits.max_message_bytes)
    obj = _unpack(data, limits)
    if not isinstance(obj, dict):
        raise WrongType("message", "a msgpack map", obj)
    if "v" not in obj:
        raise UnsupportedVersion("v", f"missing version field (this build speaks {sorted(SUPPORTED_VERSIONS)})")
    version = obj["v"]
    if not isinstance(version, int) or isinstance(version, bool) or version not in SUPPORTED_VERSIONS:
        raise UnsupportedVersion("v", f"version not supported (this build speaks {sorted(SUPPORTED_VERSIONS)})", version)
    name = obj.get("type")
    cls = MESSAGE_TYPES.get(name) if isinstance(name, str) else None
    if cls is None:
        raise UnknownMessageType("type", f"unknown message type (known: {sorted(MESSAGE_TYPES)})", name)
    if expect is not None and cls is not expect:
        raise UnknownMessageType("type", f"this endpoint takes {expect.__name__}", name)
    body = {k: v for k, v in obj.items() if k not in _ENVELOPE_KEYS}
    return cls.from_wire(body, DecodeBudget(limits))
