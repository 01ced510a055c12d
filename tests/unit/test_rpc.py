"""The call channel (``services.common.rpc``): a real server and client on loopback.

Frames split anywhere, concurrent calls answered out of order, errors with the HTTP
routes' status and body, bounded sizes both ways that fail one call and keep the
connection, cancellation reaching the server's handler, the hello's token, and
connections that cannot be made or are lost.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket

import pytest
from gateway_fakes import HangingCall

from proto.errors import MalformedMessage
from services.common.rpc import (
    RpcClient,
    RpcConnectionLost,
    RpcFailed,
    RpcListen,
    RpcProtocolError,
    RpcServer,
    RpcStream,
    RpcTimeout,
    RpcUnavailable,
)
from services.common.rpc import frames as rpc
from services.common.rpc import server as rpc_server
from services.common.rpc.frames import HEADER


async def _echo(payload: bytes) -> list[bytes]:
    """Answers the payload reversed, after sleeping as many ms as its first byte says."""
    await asyncio.sleep(payload[0] / 1000 if payload else 0)
    return [payload[::-1]]


def _run(coroutine):
    return asyncio.run(coroutine)


async def _serve(handlers=None, **kwargs) -> tuple[RpcServer, tuple[str, int]]:
    server = RpcServer(handlers or {"encode": _echo}, max_frame_bytes=kwargs.pop("max_frame_bytes", 1 << 20), **kwargs)
    port = await server.start(RpcListen("127.0.0.1", 0))
    return server, ("127.0.0.1", port)


def test_frames_split_at_any_byte_come_out_whole() -> None:
    rng = random.Random(0)
    frames = [(rpc.CALL, i + 1, 2, bytes(rng.randrange(256) for _ in range(rng.randrange(0, 300)))) for i in range(40)]
    stream = b"".join(HEADER.pack(kind, call_id, code, len(payload)) + payload
                      for kind, call_id, code, payload in frames)
    parser = rpc.Frames(max_payload=1000)
    out, position = [], 0
    while position < len(stream):
        step = rng.randrange(1, 50)
        out += list(parser.feed(stream[position:position + step]))
        position += step
    assert out == frames


def test_a_frame_over_the_limit_is_reported_and_skipped_whatever_the_split() -> None:
    big = HEADER.pack(rpc.CALL, 1, 1, 5000) + bytes(5000)
    small = HEADER.pack(rpc.CALL, 2, 1, 3) + b"abc"
    for step in (1, 7, 100, 6000):
        parser = rpc.Frames(max_payload=1000)
        stream, out = big + small, []
        for position in range(0, len(stream), step):
            out += list(parser.feed(stream[position:position + step]))
        assert out == [(rpc.CALL, 1, 1, 5000), (rpc.CALL, 2, 1, b"abc")]


def test_concurrent_calls_on_one_connection_are_answered_out_of_order() -> None:
    async def scenario():
        server, address = await _serve()
        client = RpcClient()
        try:
            finished: list[int] = []

            async def call(delay_ms: int, tag: int) -> bytes:
                reply = await client.call(address, "encode", [bytes([delay_ms, tag]), b"xyz"])
                finished.append(tag)
                return reply

            replies = await asyncio.gather(call(60, 0), call(1, 1), call(30, 2))
            assert replies == [b"zyx" + bytes([0, 60]), b"zyx" + bytes([1, 1]), b"zyx" + bytes([2, 30])]
            assert finished == [1, 2, 0]
            assert len(client._connections) == 1  # all three shared one connection
        finally:
            await client.aclose()
            await server.stop()

    _run(scenario())


def test_errors_carry_the_status_and_json_body_of_the_http_routes_and_the_connection_lives_on() -> None:
    async def failing(payload: bytes) -> list[bytes]:
        if payload == b"bad":
            raise MalformedMessage("images[0]", "not a PNG", value=b"bad")
        raise RuntimeError("secret internals")

    async def scenario():
        counted: list[str] = []
        calls: list[tuple[str, int]] = []
        server, address = await _serve({"encode": failing, "generate": _echo}, on_error=counted.append,
                                        on_call=lambda method, status, seconds: calls.append((method, status)))
        client = RpcClient()
        try:
            with pytest.raises(RpcFailed) as refused:
                await client.call(address, "encode", [b"bad"])
            assert refused.value.status == 400
            error = json.loads(refused.value.body)["error"]
            assert error["field"] == "images[0]" and "not a PNG" in error["message"]
            with pytest.raises(RpcFailed) as crashed:
                await client.call(address, "encode", [b"other"])
            assert crashed.value.status == 500
            assert b"secret" not in crashed.value.body
            assert await client.call(address, "generate", [b"\x00ok"]) == b"ko\x00"
            assert counted == ["malformed_message", "internal_error"]
            assert calls == [("encode", 400), ("encode", 500), ("generate", 200)]
        finally:
            await client.aclose()
            await server.stop()

    _run(scenario())


def test_an_unknown_method_is_a_404() -> None:
    async def scenario():
        server, address = await _serve({"encode": _echo})
        client = RpcClient()
        try:
            with pytest.raises(RpcFailed) as refused:
                await client.call(address, "generate", [b"\x00"])
            assert refused.value.status == 404
            assert await client.call(address, "encode", [b"\x00a"]) == b"a\x00"
        finally:
            await client.aclose()
            await server.stop()

    _run(scenario())


def test_sizes_are_bounded_both_ways_failing_one_call_only() -> None:
    async def big_reply(payload: bytes) -> list[bytes]:
        return [bytes(int(payload))]

    async def scenario():
        server, address = await _serve({"encode": _echo, "generate": big_reply}, max_frame_bytes=1000)
        client = RpcClient(max_reply_bytes=500)
        try:
            with pytest.raises(RpcFailed) as too_large:
                await client.call(address, "encode", [b"\x00", bytes(5000)])
            assert too_large.value.status == 413
            assert json.loads(too_large.value.body)["error"]["field"] == "body"
            with pytest.raises(RpcProtocolError):
                await client.call(address, "generate", [b"2000"])
            # the same connection still serves calls
            assert await client.call(address, "encode", [b"\x00ab"]) == b"ba\x00"
            assert len(await client.call(address, "generate", [b"400"])) == 400
        finally:
            await client.aclose()
            await server.stop()

    _run(scenario())


def test_a_cancelled_call_cancels_the_servers_work() -> None:
    async def scenario():
        hang = HangingCall()
        statuses: list[int] = []
        server, address = await _serve({"generate": hang, "encode": _echo},
                                       on_call=lambda method, status, seconds: statuses.append(status))
        client = RpcClient()
        try:
            call = asyncio.ensure_future(client.call(address, "generate", [b"x"]))
            await asyncio.wait_for(hang.started.wait(), 5)
            call.cancel()
            await asyncio.wait_for(hang.cancelled.wait(), 5)
            assert statuses == [499]
            assert await client.call(address, "encode", [b"\x00a"]) == b"a\x00"
        finally:
            await client.aclose()
            await server.stop()

    _run(scenario())


def test_the_hello_must_carry_the_servers_token() -> None:
    async def scenario():
        server, address = await _serve(token="s3cret")
        try:
            for token in (None, "wrong"):
                client = RpcClient(token=token)
                with pytest.raises(RpcFailed) as refused:
                    await client.call(address, "encode", [b"\x00a"])
                assert refused.value.status == 401
                await client.aclose()
            client = RpcClient(token="s3cret")
            assert await client.call(address, "encode", [b"\x00a"]) == b"a\x00"
            await client.aclose()
        finally:
            await server.stop()

    _run(scenario())


def test_a_peer_speaking_another_protocol_is_disconnected() -> None:
    async def scenario():
        server, address = await _serve()
        try:
            reader, writer = await asyncio.open_connection(*address)
            writer.write(b"GET /ready HTTP/1.1\r\nhost: x\r\n\r\n")
            assert await asyncio.wait_for(reader.read(), 5) == b""  # closed, nothing answered
            writer.close()
        finally:
            await server.stop()

    _run(scenario())


def test_no_server_is_unavailable_and_a_lost_connection_fails_calls_in_flight() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]

    async def scenario():
        client = RpcClient(connect_timeout_s=2)
        with pytest.raises(RpcUnavailable):
            await client.call(("127.0.0.1", closed_port), "encode", [b"x"])
        hang = HangingCall()
        server, address = await _serve({"encode": hang, "generate": _echo})
        call = asyncio.ensure_future(client.call(address, "encode", [b"x"]))
        await asyncio.wait_for(hang.started.wait(), 5)
        await server.stop(grace_s=0.05)
        with pytest.raises(RpcConnectionLost):
            await call
        server, address = await _serve({"generate": _echo})
        try:  # a fresh server: the client connects again
            assert await client.call(address, "generate", [b"\x00b"]) == b"b\x00"
        finally:
            await client.aclose()
            await server.stop()

    _run(scenario())


async def _raw_hello(address: tuple[str, int]) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A hand-made client: connected, hello sent and answered."""
    reader, writer = await asyncio.open_connection(*address)
    writer.write(rpc.MAGIC + rpc.TOKEN_LENGTH.pack(0))
    kind, _call_id, _code, _length = HEADER.unpack(await reader.readexactly(HEADER.size))
    assert kind == rpc.HELLO
    return reader, writer


def test_a_call_cancelled_before_it_starts_frees_its_place() -> None:
    async def scenario():
        statuses: list[int] = []
        server, address = await _serve({"encode": _echo}, on_call=lambda method, status, seconds: statuses.append(status))
        try:
            reader, writer = await _raw_hello(address)
            # CALL and CANCEL in one write: the server reads both before the call's first step
            frames = b"".join(HEADER.pack(rpc.CALL, i, rpc.METHODS["encode"], 2) + b"\x00a"
                              + HEADER.pack(rpc.CANCEL, i, 0, 0) for i in range(1, 6))
            writer.write(frames + HEADER.pack(rpc.CALL, 9, rpc.METHODS["encode"], 2) + b"\x00b")
            kind, call_id, code, length = HEADER.unpack(await reader.readexactly(HEADER.size))
            assert (kind, call_id, code, await reader.readexactly(length)) == (rpc.REPLY, 9, 200, b"b\x00")
            (connection,) = server._connections
            assert connection.calls == {}
            assert sorted(statuses) == [200, 499, 499, 499, 499, 499]
            writer.close()
        finally:
            await server.stop()

    _run(scenario())


def test_a_peer_that_does_not_read_its_replies_stops_being_read() -> None:
    async def scenario():
        started: list[int] = []

        async def big(payload: bytes) -> list[bytes]:
            started.append(1)
            return [bytes(1 << 20)]

        server, address = await _serve({"encode": big})
        try:
            reader, writer = await _raw_hello(address)
            for i in range(1, 201):
                writer.write(HEADER.pack(rpc.CALL, i, rpc.METHODS["encode"], 1) + b"x")
                await asyncio.sleep(0.002)
            assert len(started) < 200  # the server stopped taking calls while its replies waited
            replies = 0
            while replies < 200:  # reading lets it go on: every call is answered
                kind, _call_id, _code, length = HEADER.unpack(await asyncio.wait_for(reader.readexactly(HEADER.size), 10))
                await reader.readexactly(length)
                replies += kind == rpc.REPLY
            assert len(started) == 200
            writer.close()
        finally:
            await server.stop()

    _run(scenario())


def test_stopping_refuses_new_calls_as_busy_and_lets_running_ones_finish() -> None:
    async def scenario():
        release = asyncio.Event()

        async def slow(payload: bytes) -> list[bytes]:
            await release.wait()
            return [b"done"]

        server, address = await _serve({"generate": slow, "encode": _echo})
        client = RpcClient()
        try:
            running = asyncio.ensure_future(client.call(address, "generate", [b"x"]))
            await asyncio.sleep(0.05)
            stopping = asyncio.ensure_future(server.stop(grace_s=5))
            await asyncio.sleep(0.05)
            with pytest.raises(RpcFailed) as busy:
                await client.call(address, "encode", [b"\x00a"])
            assert busy.value.status == 503  # the gateway tries another endpoint
            release.set()
            assert await running == b"done"
            await stopping
        finally:
            await client.aclose()

    _run(scenario())


def test_a_server_without_a_token_takes_a_hello_with_one_and_a_silent_peer_is_closed(monkeypatch) -> None:
    monkeypatch.setattr(rpc_server, "HELLO_TIMEOUT_S", 0.1)

    async def scenario():
        server, address = await _serve()
        client = RpcClient(token="unneeded")
        try:
            assert await client.call(address, "encode", [b"\x00a"]) == b"a\x00"
            reader, writer = await asyncio.open_connection(*address)  # says nothing
            assert await asyncio.wait_for(reader.read(), 5) == b""
            writer.close()
        finally:
            await client.aclose()
            await server.stop()

    _run(scenario())


class Counting:
    """A streamed answer: ``int(payload)`` items ``b"0"``, ``b"1"``, …; an item ``fail_at``
    raises instead; ``slow`` waits for ``release`` before each item after the first.
    Records whether its generator was closed."""

    def __init__(self, *, fail_at: int | None = None, slow: bool = False, refuse: bool = False) -> None:
        self.fail_at, self.slow, self.refuse = fail_at, slow, refuse
        self.release = asyncio.Event()
        self.closed = asyncio.Event()

    async def __call__(self, payload: bytes):
        if self.refuse:
            raise MalformedMessage("prompt", "refused before the stream started")
        return self._items(int(payload))

    async def _items(self, count: int):
        try:
            for index in range(count):
                if index == self.fail_at:
                    raise MalformedMessage("stream", "failed midway")
                if self.slow and index:
                    await self.release.wait()
                yield [str(index).encode()]
        finally:
            self.closed.set()


async def _collect(stream: RpcStream) -> list[bytes]:
    return [item async for item in stream.chunks()]


def test_a_streamed_answer_comes_item_by_item_then_ends_and_the_connection_serves_on() -> None:
    async def scenario():
        calls: list[tuple[str, int]] = []
        server, address = await _serve({"generate": Counting(), "encode": _echo},
                                       on_call=lambda method, status, seconds: calls.append((method, status)))
        client = RpcClient()
        try:
            streams = [await client.open_stream(address, "generate", [str(n).encode()]) for n in (5, 1, 3)]
            got = await asyncio.gather(*(_collect(s) for s in streams))
            assert got == [[b"0", b"1", b"2", b"3", b"4"], [b"0"], [b"0", b"1", b"2"]]
            empty = await client.open_stream(address, "generate", [b"0"])
            assert await _collect(empty) == []
            assert await client.call(address, "encode", [b"\x00a"]) == b"a\x00"
            assert calls == [("generate:stream", 200)] * 4 + [("encode", 200)]
        finally:
            await client.aclose()
            await server.stop()

    _run(scenario())


def test_a_stream_refused_before_it_starts_raises_at_open_and_one_failing_midway_raises_in_order() -> None:
    async def scenario():
        server, address = await _serve({"generate": Counting(fail_at=2), "encode": Counting(refuse=True)})
        client = RpcClient()
        try:
            with pytest.raises(RpcFailed) as refused:
                await client.open_stream(address, "encode", [b"3"])
            assert refused.value.status == 400 and json.loads(refused.value.body)["error"]["field"] == "prompt"
            stream = await client.open_stream(address, "generate", [b"5"])
            items: list[bytes] = []
            with pytest.raises(RpcFailed) as midway:
                async for item in stream.chunks():
                    items.append(item)
            assert items == [b"0", b"1"]
            assert midway.value.status == 400 and json.loads(midway.value.body)["error"]["field"] == "stream"
        finally:
            await client.aclose()
            await server.stop()

    _run(scenario())


def test_closing_a_stream_midway_closes_the_servers_generator() -> None:
    async def scenario():
        counting = Counting(slow=True)
        statuses: list[int] = []
        server, address = await _serve({"generate": counting},
                                       on_call=lambda method, status, seconds: statuses.append((method, status)))
        client = RpcClient()
        try:
            stream = await client.open_stream(address, "generate", [b"100"])
            assert await stream.chunks().__anext__() == b"0"
            await stream.aclose()
            await asyncio.wait_for(counting.closed.wait(), 5)
            for _ in range(100):  # the server's task records its end once cancelled
                if statuses:
                    break
                await asyncio.sleep(0.01)
            assert statuses == [("generate:stream", 499)]
        finally:
            await client.aclose()
            await server.stop()

    _run(scenario())


def test_a_stream_is_bounded_per_item_in_size_and_in_waiting_time() -> None:
    big_closed = asyncio.Event()

    async def big_items(payload: bytes):
        async def items():
            try:
                yield [b"small"]
                yield [bytes(int(payload))]
                await asyncio.Event().wait()  # would go on for ever unless cancelled
            finally:
                big_closed.set()
        return items()

    async def scenario():
        counting = Counting(slow=True)
        server, address = await _serve({"generate": big_items, "encode": counting})
        client = RpcClient(max_reply_bytes=500)
        try:
            stream = await client.open_stream(address, "generate", [b"2000"])
            with pytest.raises(RpcProtocolError):
                await _collect(stream)
            await asyncio.wait_for(big_closed.wait(), 5)  # the oversized item cancelled it there
            slow = await client.open_stream(address, "encode", [b"3"], gap_timeout_s=0.2)
            with pytest.raises(RpcTimeout):
                await _collect(slow)
            await slow.aclose()  # ended by its timeout: nothing left to cancel
            await asyncio.wait_for(counting.closed.wait(), 5)  # the timeout cancelled it there
        finally:
            await client.aclose()
            await server.stop()

    _run(scenario())


def test_a_lost_connection_fails_an_open_stream() -> None:
    async def scenario():
        counting = Counting(slow=True)
        server, address = await _serve({"generate": counting})
        client = RpcClient()
        stream = await client.open_stream(address, "generate", [b"5"])
        await server.stop(grace_s=0)
        with pytest.raises(RpcConnectionLost):
            await _collect(stream)
        await client.aclose()

    _run(scenario())
