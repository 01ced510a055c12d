"""The call channel's server side: ``RpcServer`` runs handlers for calls on a port."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass

from proto.errors import DescribedError, LimitExceeded
from services.common.errors import error_body, status_of
from services.common.rpc.frames import (
    CALL,
    CANCEL,
    CHUNK,
    ERROR,
    HEADER,
    HELLO,
    MAGIC,
    MAX_TOKEN_BYTES,
    METHODS,
    REPLY,
    TOKEN_LENGTH,
    Chunks,
    Frames,
    chunk_size,
)

__all__ = ["Handler", "RpcListen", "RpcServer"]

logger = logging.getLogger(__name__)

MAX_CALLS_PER_CONNECTION = 1024
HELLO_TIMEOUT_S = 10.0  # a connection that has not said hello by then is closed

Handler = Callable[[bytes], Awaitable[Chunks | AsyncIterator[Chunks]]]


@dataclass(frozen=True)
class RpcListen:
    """Where a service listens for calls: ``port`` 0 takes any free port (the service
    reports the one it got in ``/ready``)."""

    host: str = "127.0.0.1"
    port: int = 0
    token: str | None = None


class _Refused(DescribedError):
    """A call the channel itself turns away (the handler never runs)."""

    def __init__(self, status: int, kind: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.http_status, self.kind, self.field = status, kind, field


def _error_payload(exc: BaseException) -> bytes:
    return json.dumps({"error": error_body(exc)}).encode()


class RpcServer:
    """Serves ``handlers`` (method name → ``async (payload) -> reply chunks``, or an async
    iterator of chunks for a streamed answer) on a port.

    A handler raises to answer an error: a ``DescribedError`` becomes its status and
    body, anything else a logged 500. ``on_error(kind)`` counts errors for metrics,
    ``on_call(method, status, seconds)`` every finished call (``method`` with
    ``:stream`` appended for a streamed answer that started).
    """

    def __init__(self, handlers: Mapping[str, Handler], *, max_frame_bytes: int, token: str | None = None,
                 on_error: Callable[[str], None] | None = None,
                 on_call: Callable[[str, int, float], None] | None = None) -> None:
        unknown = set(handlers) - set(METHODS)
        if unknown:
            raise ValueError(f"no method id for {sorted(unknown)}")
        self.handlers = {METHODS[name]: (name, handler) for name, handler in handlers.items()}
        self.max_frame_bytes = max_frame_bytes
        self._token = token.encode() if token else b""
        self.on_error = on_error
        self.on_call = on_call
        self._server: asyncio.base_events.Server | None = None
        self._connections: set[_ServerConnection] = set()
        self.port: int | None = None
        self.closing = False

    async def start(self, listen: RpcListen) -> int:
        """Listen; returns the port (the one the OS chose when ``listen.port`` is 0)."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _ServerConnection(self), listen.host, listen.port)
        self.port = int(self._server.sockets[0].getsockname()[1])
        logger.info("calls served on %s:%d", listen.host, self.port)
        return self.port

    async def stop(self, grace_s: float = 10.0) -> None:
        """Stop accepting connections and calls (a new call is answered 503, which the
        gateway retries elsewhere), let calls in flight finish (up to ``grace_s``), close."""
        self.closing = True
        if self._server is not None:
            self._server.close()
        deadline = asyncio.get_running_loop().time() + grace_s
        while True:
            tasks = [task for connection in self._connections for task in connection.calls.values()]
            remaining = deadline - asyncio.get_running_loop().time()
            if not tasks or remaining <= 0:
                break
            await asyncio.wait(tasks, timeout=remaining)
        for connection in list(self._connections):
            connection.close()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    def token_ok(self, presented: bytes) -> bool:
        """The hello's token; any is fine where none is required (as HTTP ignores the header)."""
        return not self._token or hmac.compare_digest(presented, self._token)


class _ServerConnection(asyncio.Protocol):
    def __init__(self, server: RpcServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.frames = Frames(server.max_frame_bytes)
        self.calls: dict[int, asyncio.Task] = {}
        self.streaming: set[int] = set()  # calls whose answer is a stream under way
        self._hello = bytearray()  # until the hello is complete
        self._greeted = False
        self._loop = asyncio.get_running_loop()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server._connections.add(self)
        self._hello_deadline = self._loop.call_later(HELLO_TIMEOUT_S, self.close)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server._connections.discard(self)
        self._hello_deadline.cancel()
        for task in list(self.calls.values()):  # nobody is left to read the answers
            task.cancel()

    # A peer that does not read its replies stops being read: no new calls are taken
    # while the replies already written wait in the transport's buffer.
    def pause_writing(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if not self._greeted:
            data = self._greet(data)
            if not data:
                return
        for kind, call_id, code, payload in self.frames.feed(data):
            if kind == CALL:
                self._call(call_id, code, payload)
            elif kind == CANCEL:
                task = self.calls.get(call_id)
                if task is not None:
                    task.cancel()
            else:
                logger.warning("closing a call connection that sent frame type %d", kind)
                self.close()
                return

    def _greet(self, data: bytes) -> bytes:
        """Consume the hello; returns the bytes after it ('' while incomplete or refused)."""
        self._hello += data
        fixed = len(MAGIC) + TOKEN_LENGTH.size
        if len(self._hello) < fixed:
            if not MAGIC.startswith(bytes(self._hello[: len(MAGIC)])):
                self.close()  # not our protocol (an HTTP client on the wrong port, a scanner)
            return b""
        if self._hello[: len(MAGIC)] != MAGIC:
            self.close()
            return b""
        (length,) = TOKEN_LENGTH.unpack_from(self._hello, len(MAGIC))
        if length > MAX_TOKEN_BYTES:
            self.close()
            return b""
        if len(self._hello) < fixed + length:
            return b""
        token, rest = bytes(self._hello[fixed:fixed + length]), bytes(self._hello[fixed + length:])
        self._hello = bytearray()
        if not self.server.token_ok(token):
            refused = _Refused(401, "unauthorized", "missing or wrong internal token", field="token")
            self._send(ERROR, 0, 401, [_error_payload(refused)])
            self.close()
            return b""
        self._greeted = True
        self._hello_deadline.cancel()
        self._send(HELLO, 0, 200, [])
        return rest

    def _call(self, call_id: int, code: int, payload: bytes | int) -> None:
        entry = self.server.handlers.get(code)
        if isinstance(payload, int):  # the same refusal as an HTTP body over the limit
            error = LimitExceeded("body", "size in bytes", payload, self.server.max_frame_bytes)
        elif entry is None:
            error = _Refused(404, "unknown_method", f"no method with id {code} here")
        elif call_id in self.calls:
            error = _Refused(400, "invalid_request", f"call id {call_id} is already in flight")
        elif self.server.closing:
            error = _Refused(503, "overloaded", "the service is shutting down")
        elif len(self.calls) >= MAX_CALLS_PER_CONNECTION:
            error = _Refused(503, "overloaded", f"more than {MAX_CALLS_PER_CONNECTION} calls in flight")
        else:
            name, handler = entry
            started = self._loop.time()
            task = self._loop.create_task(self._run(call_id, name, handler, payload, started))
            # Forgotten when done, however it ends: a call cancelled before its first step
            # never runs its own code, and must not hold a slot of this connection forever.
            task.add_done_callback(lambda done: self._forget(call_id, done, name, started))
            self.calls[call_id] = task
            return
        self._fail(call_id, error, method=entry[0] if entry else "unknown", started=self._loop.time())

    async def _run(self, call_id: int, method: str, handler: Handler, payload: bytes, started: float) -> None:
        try:
            answer = await handler(payload)
            if isinstance(answer, AsyncIterator):
                method += ":stream"
                self.streaming.add(call_id)
                await self._stream(call_id, answer)
                answer = []
        except Exception as exc:
            if status_of(exc) >= 500:
                logger.exception("%s call failed", method)
            self._fail(call_id, exc, method=method, started=started)
        else:
            self._send(REPLY, call_id, 200, answer)
            self._record(method, 200, started)

    async def _stream(self, call_id: int, items: AsyncIterator[Chunks]) -> None:
        """One CHUNK per item; the iterator is closed however this ends (a CANCEL too)."""
        try:
            async for chunks in items:
                self._send(CHUNK, call_id, 200, chunks)
        finally:
            close = getattr(items, "aclose", None)
            if close is not None:
                await close()

    def _forget(self, call_id: int, task: asyncio.Task, method: str, started: float) -> None:
        if self.calls.get(call_id) is task:
            del self.calls[call_id]
            if call_id in self.streaming:
                self.streaming.discard(call_id)
                method += ":stream"
        if task.cancelled():
            self._record(method, 499, started)

    def _fail(self, call_id: int, exc: BaseException, *, method: str, started: float) -> None:
        status = status_of(exc)
        body = error_body(exc)
        if self.server.on_error is not None:
            self.server.on_error(body.get("type", "internal_error"))
        self._send(ERROR, call_id, status, [json.dumps({"error": body}).encode()])
        self._record(method, status, started)

    def _record(self, method: str, status: int, started: float) -> None:
        if self.server.on_call is not None:
            self.server.on_call(method, status, self._loop.time() - started)

    def _send(self, kind: int, call_id: int, code: int, chunks: Chunks) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        header = HEADER.pack(kind, call_id, code, sum(chunk_size(chunk) for chunk in chunks))
        transport.writelines([header, *chunks])
