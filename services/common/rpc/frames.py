"""The call channel's wire: the hello, frame types and the frame splitter (see
``services.common.rpc`` for the format)."""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence

__all__ = ["CALL", "CANCEL", "CHUNK", "ERROR", "HEADER", "HELLO", "MAGIC", "MAX_TOKEN_BYTES", "METHODS", "REPLY",
           "TOKEN_LENGTH", "Chunks", "Frames", "chunk_size"]

MAGIC = b"S37RPC/1"
TOKEN_LENGTH = struct.Struct("!H")
MAX_TOKEN_BYTES = 1024
HEADER = struct.Struct("!BIHI")  # type, call id, code, payload length

CALL, CANCEL, REPLY, ERROR, HELLO, CHUNK = 1, 2, 3, 4, 5, 6
METHODS = {"encode": 1, "generate": 2}  # method name → id on the wire

Chunks = Sequence[bytes | memoryview]


def chunk_size(chunk: bytes | memoryview) -> int:
    return chunk.nbytes if isinstance(chunk, memoryview) else len(chunk)


class Frames:
    """Splits a byte stream into ``(type, call id, code, payload)``; a payload longer
    than ``max_payload`` comes out as its length (an ``int``) and its bytes are skipped
    as they arrive."""

    def __init__(self, max_payload: int) -> None:
        self.max_payload = max_payload
        self._buffer = bytearray()
        self._skip = 0

    def feed(self, data: bytes) -> Iterator[tuple[int, int, int, bytes | int]]:
        if self._skip:
            skipped = min(self._skip, len(data))
            self._skip -= skipped
            data = data[skipped:]
        buffer = self._buffer
        buffer += data
        while len(buffer) >= HEADER.size:
            kind, call_id, code, length = HEADER.unpack_from(buffer)
            if length > self.max_payload:
                available = min(length, len(buffer) - HEADER.size)
                del buffer[: HEADER.size + available]
                self._skip = length - available
                yield kind, call_id, code, length
                continue
            end = HEADER.size + length
            if len(buffer) < end:
                return
            payload = bytes(buffer[HEADER.size:end])
            del buffer[:end]
            yield kind, call_id, code, payload
