"""The call channel's client side: ``RpcClient`` keeps one connection per server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

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

__all__ = ["RpcClient", "RpcConnectionLost", "RpcError", "RpcFailed", "RpcProtocolError", "RpcStream",
           "RpcTimeout", "RpcUnavailable"]


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
        self.frames = Frames(max_reply_bytes)
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
        header = HEADER.pack(CALL, self._next_id, method_id, sum(chunk_size(chunk) for chunk in chunks))
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
        self._hello = MAGIC + TOKEN_LENGTH.pack(len(token_bytes)) + token_bytes
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

