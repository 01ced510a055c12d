"""HTTP helpers shared by the services: bounded body reading, msgpack responses."""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Awaitable
from typing import TypeVar

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

import proto
from proto import LimitExceeded

__all__ = ["CLIENT_CLOSED_REQUEST", "cancel_on_disconnect", "msgpack_response", "read_body"]

CLIENT_CLOSED_REQUEST = 499  # nginx's status for "the client went away"; nobody reads it

T = TypeVar("T")


async def read_body(request: Request, max_bytes: int, *, field: str = "body") -> bytes:
    """The request body, refusing (413) as soon as it is known to exceed ``max_bytes``.

    A declared ``Content-Length`` is checked before reading; a chunked body is counted
    as it streams, so an oversized upload never sits in memory whole. ``gzip`` and
    ``deflate`` bodies are inflated under the same bound.
    """
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise LimitExceeded(field, "size in bytes", int(declared), max_bytes)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise LimitExceeded(field, "size in bytes", size, max_bytes)
        chunks.append(chunk)
    body = b"".join(chunks)
    encoding = request.headers.get("content-encoding", "").strip().lower()
    if encoding in ("gzip", "deflate"):
        body = _inflate(body, encoding, max_bytes, field)
    elif encoding not in ("", "identity"):
        raise proto.InvalidValue("content-encoding", "unsupported (use gzip, deflate or identity)", encoding)
    return body


def _inflate(body: bytes, encoding: str, max_bytes: int, field: str) -> bytes:
    # wbits: 16+MAX for gzip framing, MAX for zlib framing (what HTTP calls deflate).
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS)
    try:
        out = inflater.decompress(body, max_bytes + 1)
    except zlib.error as exc:
        raise proto.InvalidValue("content-encoding", f"body is not valid {encoding}: {exc}") from exc
    if len(out) > max_bytes or inflater.unconsumed_tail:
        raise LimitExceeded(field, "inflated size in bytes", len(out), max_bytes)
    if not inflater.eof:
        raise proto.InvalidValue("content-encoding", f"body is truncated {encoding} data")
    return out


# Below this size a wire message is sent as one body: a streamed response costs more
# (Starlette runs a task group to watch for a disconnect) than copying it once.
STREAM_ABOVE_BYTES = 1 << 20


def msgpack_response(message: object, *, headers: dict[str, str] | None = None) -> Response:
    """A wire message as a response; a large one is streamed, its tensor payloads sent
    without being copied into one buffer."""
    chunks = _coalesce(proto.encode_chunks(message))
    length = sum(len(chunk) if isinstance(chunk, bytes) else chunk.nbytes for chunk in chunks)
    if length <= STREAM_ABOVE_BYTES:
        return Response(b"".join(chunks), media_type=proto.CONTENT_TYPE, headers=headers)

    async def body():
        for chunk in chunks:
            yield chunk

    all_headers = {"content-length": str(length), **(headers or {})}
    return StreamingResponse(body(), media_type=proto.CONTENT_TYPE, headers=all_headers)


def _coalesce(chunks: list[bytes | memoryview], large: int = 1 << 16) -> list[bytes | memoryview]:
    """Merge runs of small chunks so each ASGI send carries a useful amount of data."""
    out: list[bytes | memoryview] = []
    pending: list[bytes | memoryview] = []
    for chunk in chunks:
        size = len(chunk) if isinstance(chunk, bytes) else chunk.nbytes
        if size >= large:
            if pending:
                out.append(b"".join(pending))
                pending = []
            out.append(chunk)
        else:
            pending.append(chunk)
    if pending:
        out.append(b"".join(pending))
    return out


async def cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T | None:
    """``work``'s result, or ``None`` (``work`` cancelled) if the client disconnected first.

    Starlette does not cancel a handler when its client leaves: without this, a
    non-streamed request would keep its encoder slot or KV-cache slot until done.
    Call it after the body has been read (the watcher consumes ``receive``).
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_until_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)  # let it unwind before answering
    return task.result() if not task.cancelled() else None


async def _until_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
