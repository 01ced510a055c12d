"""Server-sent events: parsing the LM worker's stream, and writing the client's.

Only the ``data`` field matters here (both peers send ``data: <json>`` events); other
fields and ``:`` comments (keep-alives) are skipped, as the SSE spec says. The
response class guarantees the upstream is closed however the client stream ends —
finished, failed, or the client gone — because Starlette leaves an unfinished body
iterator suspended, and a suspended generator would keep the LM worker generating.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

__all__ = ["DONE", "SSEResponse", "format_event", "iter_events"]

DONE = b"data: [DONE]\n\n"


async def iter_events(lines: AsyncIterator[str], *, max_event_chars: int = 4 << 20) -> AsyncIterator[str]:
    """The ``data`` payload of each event (multi-line data joined with newlines)."""
    data: list[str] = []
    size = 0
    async for line in lines:
        if not line:
            if data:
                yield "\n".join(data)
            data, size = [], 0
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        if name != "data":
            continue
        value = value[1:] if value.startswith(" ") else value
        size += len(value)
        if size > max_event_chars:
            raise ValueError(f"an event is longer than {max_event_chars} characters")
        data.append(value)
    if data:  # a final event without its blank line: the stream was cut, but the event is whole
        yield "\n".join(data)


def format_event(payload: Mapping[str, Any] | str) -> bytes:
    text = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
    return f"data: {text}\n\n".encode()


class SSEResponse(StreamingResponse):
    """``text/event-stream`` whose ``on_close`` runs exactly once, whatever ends the stream."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[bytes], *, on_close: Callable[[], Awaitable[None]],
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(content, headers={"cache-control": "no-cache", "x-accel-buffering": "no", **(headers or {})})
        self._content = content
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            # Shielded: on a disconnect this runs inside a cancelled scope, and closing
            # the upstream connection is the whole point.
            with anyio.CancelScope(shield=True):
                aclose = getattr(self._content, "aclose", None)
                if aclose is not None:
                    await aclose()
                await self._on_close()
