"""Framed calls over one TCP connection: the gateway's fast path to its own tiers.

An HTTP call between the gateway and an encoder or LM worker costs ~3 ms on two CPU
cores beyond the work itself: uvicorn, Starlette routing and middleware, a disconnect
watcher task, the HTTP client's request and response objects. Here a call is one
frame out and one frame back on a kept-open connection, parsed by a few lines of
``asyncio.Protocol`` code. The payloads are the same msgpack messages the HTTP
routes take and answer, and errors carry the same status and JSON body, so the
gateway treats both paths alike. HTTP stays for everything else: health, readiness,
metrics, KServe, and any client that is not the gateway.

Wire format. The client opens a connection and sends a hello::

    b"S37RPC/1" | u16 token length | token (UTF-8; empty when none is required)

The server answers a HELLO frame, or an ERROR frame (401) and closes. Then both sides
send frames: an 11-byte header ``!BIHI`` — type, call id, code, payload length — and
the payload:

    CALL    client → server   code: method id        payload: the request message
    CANCEL  client → server   no payload: the caller gave up; its work is cancelled
    REPLY   server → client   code: 200              payload: the response message
    ERROR   server → client   code: HTTP status      payload: ``{"error": {...}}`` JSON
    CHUNK   server → client   code: 200              payload: one item of a streamed answer

Calls on a connection run concurrently; replies come back as they finish. A handler
that returns an async iterator answers a stream: one CHUNK per item, then an empty
REPLY, or an ERROR if it fails midway. The first frame tells the caller whether the
stream started (a CHUNK) or was refused (an ERROR), as an HTTP status line would. Sizes are
bounded both ways: a request frame over the server's limit is answered 413 and its
bytes skipped (the connection stays usable); a reply over the caller's limit fails
that call alone. Payloads are never unpickled: handlers decode them with ``proto``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from proto.errors import DescribedError, LimitExceeded
from services.common.errors import error_body, status_of

__all__ = [
    "METHODS",
    "RpcClient",
    "RpcConnectionLost",
    "RpcError",
    "RpcFailed",
    "RpcListen",
    "RpcProtocolError",
    "RpcServer",
    "RpcStream",
    "RpcTimeout",
    "RpcUnavailable",
]

logger = logging.getLogger(__name__)

MAGIC = b"S37RPC/1"
_TOKEN_LENGTH = struct.Struct("!H")
MAX_TOKEN_BYTES = 1024
HEADER = struct.Struct("!BIHI")  # type, call id, code, payload length

CALL, CANCEL, REPLY, ERROR, HELLO, CHUNK = 1, 2, 3, 4, 5, 6
METHODS = {"encode": 1, "generate": 2}  # method name → id on the wire
MAX_CALLS_PER_CONNECTION = 1024
HELLO_TIMEOUT_S = 10.0  # a connection that has not said hello by then is closed

Chunks = Sequence[bytes | memoryview]
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


def _size(chunk: bytes | memoryview) -> int:
    return chunk.nbytes if isinstance(chunk, memoryview) else len(chunk)


def _error_payload(exc: BaseException) -> bytes:
    return json.dumps({"error": error_body(exc)}).encode()


class _Frames:
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


# ---- server ---------------------------------------------------------------------------


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
        self.frames = _Frames(server.max_frame_bytes)
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
        fixed = len(MAGIC) + _TOKEN_LENGTH.size
        if len(self._hello) < fixed:
            if not MAGIC.startswith(bytes(self._hello[: len(MAGIC)])):
                self.close()  # not our protocol (an HTTP client on the wrong port, a scanner)
            return b""
        if self._hello[: len(MAGIC)] != MAGIC:
            self.close()
            return b""
        (length,) = _TOKEN_LENGTH.unpack_from(self._hello, len(MAGIC))
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
        header = HEADER.pack(kind, call_id, code, sum(_size(chunk) for chunk in chunks))
        transport.writelines([header, *chunks])


# ---- client ---------------------------------------------------------------------------


class RpcError(Exception):
    """A call that did not get a reply."""


class RpcUnavailable(RpcError):
    """No connection could be made (nothing was sent): safe to try elsewhere."""


class RpcConnectionLost(RpcError):
    """The connection closed with the call in flight: the work may have run."""


class RpcProtocolError(RpcError):
    """The peer broke the protocol for this call (a reply over the size limit, a bad frame)."""


class RpcTimeout(RpcError):
    """A stream's next item did not come in time (the call is cancelled on the server)."""


class RpcFailed(RpcError):
    """The server answered an error: ``status`` and the JSON ``body`` an HTTP route would give."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"status {status}")
        self.status = status
        self.body = body


class _ClientConnection(asyncio.Protocol):
    def __init__(self, max_reply_bytes: int) -> None:
        self.transport: asyncio.Transport | None = None
        self.frames = _Frames(max_reply_bytes)
        self.pending: dict[int, asyncio.Future] = {}
        self.streams: dict[int, asyncio.Queue] = {}  # call id → its frames, for streamed answers
        self.greeted: asyncio.Future = asyncio.get_running_loop().create_future()
        self._next_id = 0
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        error = RpcConnectionLost(f"connection closed ({exc or 'by the server'})")
        if not self.greeted.done():
            self.greeted.set_exception(RpcUnavailable("the server closed the connection during the hello"))
        for future in self.pending.values():
            if not future.done():
                future.set_exception(error)
        self.pending.clear()
        for queue in self.streams.values():
            queue.put_nowait(error)
        self.streams.clear()

    def data_received(self, data: bytes) -> None:
        for kind, call_id, code, payload in self.frames.feed(data):
            if kind == HELLO:
                if not self.greeted.done():
                    self.greeted.set_result(None)
                continue
            if kind == ERROR and call_id == 0 and not self.greeted.done():
                self.greeted.set_exception(RpcFailed(code, payload if isinstance(payload, bytes) else b""))
                continue
            queue = self.streams.get(call_id)
            if queue is not None:
                if kind != CHUNK or isinstance(payload, int):
                    del self.streams[call_id]  # the last frame of this stream
                    if isinstance(payload, int) and kind == CHUNK and self.transport is not None:
                        self.transport.write(HEADER.pack(CANCEL, call_id, 0, 0))  # its reader fails now
                queue.put_nowait(self._stream_item(kind, code, payload))
                continue
            future = self.pending.pop(call_id, None)
            if future is None or future.done():
                continue  # a call its caller gave up on
            if isinstance(payload, int):
                future.set_exception(RpcProtocolError(
                    f"the reply is larger than the limit of {self.frames.max_payload} bytes"))
            elif kind == REPLY:
                future.set_result(payload)
            elif kind == ERROR:
                future.set_exception(RpcFailed(code, payload))
            else:
                future.set_exception(RpcProtocolError(f"unexpected frame type {kind}"))
                if kind == CHUNK and self.transport is not None:  # a stream nobody will read: stop it
                    self.transport.write(HEADER.pack(CANCEL, call_id, 0, 0))

    def _stream_item(self, kind: int, code: int, payload: bytes | int) -> bytes | None | RpcError:
        """A stream's frame as its reader takes it: a chunk, None at the end, or the error."""
        if isinstance(payload, int):
            return RpcProtocolError(f"a stream item is larger than the limit of {self.frames.max_payload} bytes")
        if kind == CHUNK:
            return payload
        if kind == REPLY:
            return None
        if kind == ERROR:
            return RpcFailed(code, payload)
        return RpcProtocolError(f"unexpected frame type {kind} in a stream")

    @property
    def usable(self) -> bool:
        return not self.closed and self.transport is not None and not self.transport.is_closing()

    def call(self, method_id: int, chunks: Chunks) -> tuple[int, asyncio.Future]:
        call_id = self._send_call(method_id, chunks)
        future = asyncio.get_running_loop().create_future()
        self.pending[call_id] = future
        return call_id, future

    def call_streamed(self, method_id: int, chunks: Chunks) -> tuple[int, asyncio.Queue]:
        call_id = self._send_call(method_id, chunks)
        queue: asyncio.Queue = asyncio.Queue()
        self.streams[call_id] = queue
        return call_id, queue

    def _send_call(self, method_id: int, chunks: Chunks) -> int:
        if not self.usable:
            raise RpcUnavailable("the connection closed before the call was sent")
        self._next_id = self._next_id % 0xFFFFFFFF + 1  # 1 .. 2**32 - 1: 0 is the hello's
        header = HEADER.pack(CALL, self._next_id, method_id, sum(_size(chunk) for chunk in chunks))
        self.transport.writelines([header, *chunks])  # type: ignore[union-attr]
        return self._next_id

    def cancel(self, call_id: int) -> None:
        waiting = self.pending.pop(call_id, None) is not None or self.streams.pop(call_id, None) is not None
        if waiting and not self.closed and self.transport is not None:
            self.transport.write(HEADER.pack(CANCEL, call_id, 0, 0))


class RpcStream:
    """A streamed answer: iterate :meth:`chunks` once; :meth:`aclose` cancels it on the
    server unless it already ended. ``RpcClient.open_stream`` returns it started."""

    def __init__(self, connection: _ClientConnection, call_id: int, queue: asyncio.Queue,
                 first: bytes | None, gap_timeout_s: float | None) -> None:
        self._connection = connection
        self._call_id = call_id
        self._queue = queue
        self._first = first
        self._ended = first is None
        self.gap_timeout_s = gap_timeout_s

    async def chunks(self) -> AsyncIterator[bytes]:
        """Every item's payload, in order; raises the stream's error (``RpcFailed`` for an
        ERROR midway, ``RpcConnectionLost``, ``RpcProtocolError``, ``RpcTimeout``)."""
        if self._first is not None:
            first, self._first = self._first, None
            yield first
        while not self._ended:
            item = await _next_item(self._queue, self.gap_timeout_s)
            if item is None:
                self._ended = True
                return
            if isinstance(item, RpcError):
                self._ended = True
                self._connection.cancel(self._call_id)  # a timeout leaves it running there
                raise item
            yield item

    async def aclose(self) -> None:
        if not self._ended:
            self._ended = True
            self._connection.cancel(self._call_id)


async def _next_item(queue: asyncio.Queue, timeout_s: float | None) -> bytes | None | RpcError:
    try:
        return await asyncio.wait_for(queue.get(), timeout_s)
    except asyncio.TimeoutError:
        return RpcTimeout(f"no stream item within {timeout_s:g} s")


class RpcClient:
    """Calls to any number of servers, one kept-open connection each, opened on first use.

    ``call`` raises ``RpcUnavailable`` when it cannot connect, ``RpcConnectionLost``
    when the connection drops mid-call, ``RpcFailed`` for an error answer and
    ``RpcProtocolError`` for a reply it refuses. Cancelling a call sends CANCEL, so
    the server stops its work (a freed encoder slot, a freed KV-cache slot).
    """

    def __init__(self, *, token: str | None = None, connect_timeout_s: float = 5.0,
                 max_reply_bytes: int = 64 * 1024 * 1024) -> None:
        token_bytes = (token or "").encode()
        if len(token_bytes) > MAX_TOKEN_BYTES:
            raise ValueError(f"the internal token is longer than {MAX_TOKEN_BYTES} bytes")
        self._hello = MAGIC + _TOKEN_LENGTH.pack(len(token_bytes)) + token_bytes
        self.connect_timeout_s = connect_timeout_s
        self.max_reply_bytes = max_reply_bytes
        self._connections: dict[tuple[str, int], _ClientConnection] = {}
        self._connecting: dict[tuple[str, int], asyncio.Task] = {}

    async def call(self, address: tuple[str, int], method: str, chunks: Chunks) -> bytes:
        connection = await self._open_connection(address)
        call_id, future = connection.call(METHODS[method], chunks)
        try:
            return await future
        except asyncio.CancelledError:
            connection.cancel(call_id)
            raise

    async def open_stream(self, address: tuple[str, int], method: str, chunks: Chunks, *,
                          gap_timeout_s: float | None = None) -> RpcStream:
        """Call ``method`` for a streamed answer; returns once its first item came (the
        stream started), raises as :meth:`call` when it was refused. ``gap_timeout_s``
        bounds the wait for each item, the first included."""
        connection = await self._open_connection(address)
        call_id, queue = connection.call_streamed(METHODS[method], chunks)
        try:
            first = await _next_item(queue, gap_timeout_s)
        except asyncio.CancelledError:
            connection.cancel(call_id)
            raise
        if isinstance(first, RpcError):
            connection.cancel(call_id)  # a timeout leaves the call running there
            raise first
        return RpcStream(connection, call_id, queue, first, gap_timeout_s)

    async def connect(self, address: tuple[str, int]) -> None:
        """Open the connection to ``address`` now, unless one is open (``RpcUnavailable``,
        ``RpcFailed`` when the hello is refused)."""
        await self._open_connection(address)

    async def _open_connection(self, address: tuple[str, int]) -> _ClientConnection:
        connection = self._connections.get(address)
        if connection is None or not connection.usable:
            connection = await self._connect(address)
        return connection

    async def _connect(self, address: tuple[str, int]) -> _ClientConnection:
        task = self._connecting.get(address)
        if task is None:  # concurrent first calls share one connection attempt
            task = asyncio.ensure_future(self._open(address))
            self._connecting[address] = task
            task.add_done_callback(lambda _: self._connecting.pop(address, None))
        return await asyncio.shield(task)

    async def _open(self, address: tuple[str, int]) -> _ClientConnection:
        try:
            connection = await asyncio.wait_for(self._handshake(address), self.connect_timeout_s)
        except asyncio.TimeoutError as exc:
            raise RpcUnavailable(f"no answer from {address[0]}:{address[1]} within "
                                 f"{self.connect_timeout_s:g} s") from exc
        except OSError as exc:
            raise RpcUnavailable(f"cannot connect to {address[0]}:{address[1]} ({exc})") from exc
        self._connections[address] = connection
        return connection

    async def _handshake(self, address: tuple[str, int]) -> _ClientConnection:
        max_reply = self.max_reply_bytes
        transport, connection = await asyncio.get_running_loop().create_connection(
            lambda: _ClientConnection(max_reply), *address)
        try:
            transport.write(self._hello)
            await connection.greeted
        except BaseException:
            transport.close()
            raise
        return connection

    async def aclose(self) -> None:
        for connection in self._connections.values():
            if connection.transport is not None:
                connection.transport.close()
        self._connections.clear()

