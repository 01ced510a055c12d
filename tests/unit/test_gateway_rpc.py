"""The gateway's clients over the call channel: real ``RpcServer``s on loopback standing
in for an encoder and an LM worker, the HTTP side faked.

Answers equal the HTTP path's, refusals map to the same gateway errors, a cancelled
generate, a closed stream and a timed-out encode cancel the service's work, and an
endpoint whose channel cannot be reached is served over HTTP instead.
"""

from __future__ import annotations

import asyncio
import json
import socket

import httpx
import pytest
from gateway_fakes import FakeEncoder, FakeLM, HangingCall, caption_of, png

import proto
from encoder_server.errors import BadImage
from lm_worker.errors import ClientError
from services.common.rpc import RpcClient, RpcListen, RpcServer
from services.gateway.encoder_client import EncoderClient, NativeEncoderTransport
from services.gateway.errors import GatewayError, InvalidRequest, UpstreamTimeout
from services.gateway.lm_client import LMClient, StreamFinish, TokenDelta
from services.gateway.pool import EndpointPool


def run(coro):
    return asyncio.run(coro)


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def encoder_server(fake: FakeEncoder) -> RpcServer:
    """Encodes as the fake's HTTP route does; an image of b"bad" is refused like the encoder's."""

    async def encode(payload: bytes) -> list[bytes]:
        request = proto.decode(payload, expect=proto.EncodeRequest)
        if b"bad" in request.images:
            raise BadImage("images[0]", "cannot identify image file")
        response = await fake.handler(httpx.Request("POST", "http://rpc/v1/encode", content=payload))
        return [response.content]

    return RpcServer({"encode": encode}, max_frame_bytes=1 << 24)


def test_encodes_go_over_the_channel_and_refusals_map_as_over_http() -> None:
    async def scenario():
        fake = FakeEncoder()
        server = encoder_server(fake)
        port = await server.start(RpcListen())
        rpc = RpcClient()
        pool = EndpointPool("encoder", ["http://127.0.0.1"], rpc=rpc)
        pool.endpoints[0].rpc_port = port
        http = httpx.AsyncClient(transport=httpx.MockTransport(lambda request: httpx.Response(500)))
        client = EncoderClient(pool, http, NativeEncoderTransport(), rpc=rpc)
        try:
            images = [png(colour=(1, 2, 3)), png(colour=(4, 5, 6))]
            result = await client.encode(images, request_id="r1")
            expected = [fake.features_for(image) for image in images]
            assert [block.tolist() for block in proto.feature_blocks(result.image.image_features)] == \
                [block.tolist() for block in expected]
            with pytest.raises(InvalidRequest) as refused:
                await client.encode([b"bad"], request_id="r2")
            assert refused.value.upstream_field == "images[0]"
            assert pool.endpoints[0].consecutive_failures == 0  # the client's fault, not the endpoint's
        finally:
            await rpc.aclose()
            await server.stop()

    run(scenario())


def test_an_unreachable_channel_falls_back_to_http_on_the_same_endpoint() -> None:
    async def scenario():
        fake_encoder, fake_lm = FakeEncoder(), FakeLM()
        rpc = RpcClient(connect_timeout_s=2)
        encoder_pool = EndpointPool("encoder", ["http://encoder-a"], rpc=rpc)
        lm_pool = EndpointPool("lm", ["http://lm-a"], rpc=rpc)
        for pool in (encoder_pool, lm_pool):
            pool.endpoints[0].host = "127.0.0.1"  # the channel's address: nothing listens there
            pool.endpoints[0].rpc_port = closed_port()
        encoder = EncoderClient(encoder_pool, httpx.AsyncClient(transport=httpx.MockTransport(fake_encoder.handler)),
                                NativeEncoderTransport(), rpc=rpc)
        lm = LMClient(lm_pool, httpx.AsyncClient(transport=httpx.MockTransport(fake_lm.handler)), rpc=rpc)
        result = await encoder.encode([png()], request_id="r")
        assert fake_encoder.images_encoded == 1 and result.image.num_images == 1
        request = proto.GenerateRequest(request_id="g", prompt="<image> describe",
                                        images=[result.image], sampling=proto.SamplingParams(max_new_tokens=4))
        answer = await lm.generate(request)
        assert answer.text == caption_of(fake_lm.requests[0])
        for pool in (encoder_pool, lm_pool):
            endpoint = pool.endpoints[0]
            assert endpoint.rpc_port is None and endpoint.ready and endpoint.consecutive_failures == 0
        await rpc.aclose()

    run(scenario())


def test_a_cancelled_generate_cancels_the_workers_call() -> None:
    async def scenario():
        hang = HangingCall()
        server = RpcServer({"generate": hang}, max_frame_bytes=1 << 24)
        rpc = RpcClient()
        pool = EndpointPool("lm", ["http://127.0.0.1"], rpc=rpc)
        pool.endpoints[0].rpc_port = await server.start(RpcListen())
        lm = LMClient(pool, httpx.AsyncClient(transport=httpx.MockTransport(lambda r: httpx.Response(500))), rpc=rpc)
        try:
            call = asyncio.ensure_future(lm.generate(proto.GenerateRequest(request_id="g", prompt="hi")))
            await asyncio.wait_for(hang.started.wait(), 5)
            assert pool.endpoints[0].outstanding == 1
            call.cancel()
            await asyncio.wait_for(hang.cancelled.wait(), 5)
            assert pool.endpoints[0].outstanding == 0
        finally:
            await rpc.aclose()
            await server.stop()

    run(scenario())


def test_an_encode_that_takes_too_long_times_out_and_is_cancelled_on_the_encoder() -> None:
    async def scenario():
        hang = HangingCall()
        server = RpcServer({"encode": hang}, max_frame_bytes=1 << 24)
        rpc = RpcClient()
        pool = EndpointPool("encoder", ["http://127.0.0.1"], rpc=rpc)
        pool.endpoints[0].rpc_port = await server.start(RpcListen())
        http = httpx.AsyncClient(transport=httpx.MockTransport(lambda request: httpx.Response(500)))
        client = EncoderClient(pool, http, NativeEncoderTransport(), rpc=rpc, attempts=1, timeout_s=0.3)
        try:
            with pytest.raises(UpstreamTimeout):
                await client.encode([png()], request_id="slow")
            await asyncio.wait_for(hang.cancelled.wait(), 5)
            assert pool.endpoints[0].consecutive_failures == 1 and pool.endpoints[0].outstanding == 0
        finally:
            await rpc.aclose()
            await server.stop()

    run(scenario())


def streaming_lm(words: list[str], closed: asyncio.Event, *, fail_at: int | None = None) -> RpcServer:
    """A streamed generate as the LM worker answers one: its SSE events' JSON, one per chunk."""

    async def generate(payload: bytes):
        request = proto.decode(payload, expect=proto.GenerateRequest)
        assert request.stream

        async def events():
            try:
                for index, word in enumerate(words):
                    if index == fail_at:
                        raise RuntimeError("device lost")
                    yield [json.dumps({"token_ids": [10 + index], "text": f" {word}" if index else word}).encode()]
                    await asyncio.sleep(0)
                yield [json.dumps({"request_id": request.request_id, "finish_reason": "stop", "prompt_tokens": 7,
                                   "completion_tokens": len(words), "cached_tokens": 4,
                                   "timings": {"prefill_ms": 1.5}}).encode()]
            finally:
                closed.set()

        return events()

    return RpcServer({"generate": generate}, max_frame_bytes=1 << 24)


async def _lm_over(server: RpcServer) -> tuple[LMClient, EndpointPool, RpcClient]:
    rpc = RpcClient()
    pool = EndpointPool("lm", ["http://127.0.0.1"], rpc=rpc)
    pool.endpoints[0].rpc_port = await server.start(RpcListen())
    http = httpx.AsyncClient(transport=httpx.MockTransport(lambda request: httpx.Response(500)))  # never used
    return LMClient(pool, http, rpc=rpc), pool, rpc


def test_a_stream_goes_over_the_channel_event_by_event() -> None:
    async def scenario():
        closed = asyncio.Event()
        server = streaming_lm(["a", "red", "circle"], closed)
        lm, pool, rpc = await _lm_over(server)
        try:
            stream = await lm.open_stream(proto.GenerateRequest(request_id="s", prompt="hi"))
            events = [event async for event in stream.events()]
            await stream.aclose()
            *deltas, finish = events
            assert "".join(delta.text for delta in deltas) == "a red circle"
            assert [t for delta in deltas for t in delta.token_ids] == [10, 11, 12]
            assert isinstance(finish, StreamFinish) and finish.finish_reason == "stop"
            assert (finish.prompt_tokens, finish.completion_tokens, finish.cached_tokens) == (7, 3, 4)
            assert finish.timings == {"prefill_ms": 1.5}
            assert pool.endpoints[0].outstanding == 0 and pool.endpoints[0].consecutive_failures == 0
        finally:
            await rpc.aclose()
            await server.stop()

    run(scenario())


def test_closing_a_stream_midway_cancels_it_on_the_worker_and_a_failure_midway_is_an_upstream_error() -> None:
    async def scenario():
        closed = asyncio.Event()
        server = streaming_lm([f"w{i}" for i in range(1000)], closed)
        lm, pool, rpc = await _lm_over(server)
        try:
            stream = await lm.open_stream(proto.GenerateRequest(request_id="s", prompt="hi"))
            first = await stream.events().__anext__()
            assert isinstance(first, TokenDelta) and first.text == "w0"
            await stream.aclose()
            await asyncio.wait_for(closed.wait(), 5)
            assert pool.endpoints[0].outstanding == 0
        finally:
            await rpc.aclose()
            await server.stop()

        closed = asyncio.Event()
        server = streaming_lm(["a", "b", "c"], closed, fail_at=2)
        lm, pool, rpc = await _lm_over(server)
        try:
            stream = await lm.open_stream(proto.GenerateRequest(request_id="f", prompt="hi"))
            texts = []
            with pytest.raises(GatewayError) as failed:
                async for event in stream.events():
                    texts.append(event.text)
            await stream.aclose()
            assert texts == ["a", " b"]
            assert failed.value.status >= 500
            assert pool.endpoints[0].consecutive_failures == 1
        finally:
            await rpc.aclose()
            await server.stop()

    run(scenario())


def test_a_worker_that_refuses_streamed_calls_streams_over_http() -> None:
    async def scenario():
        async def generate(payload: bytes) -> list[bytes]:  # a worker from before streamed calls
            if proto.decode(payload, expect=proto.GenerateRequest).stream:
                raise ClientError("stream", "a streamed generate goes to POST /v1/generate", True)
            raise AssertionError("only streams are sent here")

        server = RpcServer({"generate": generate}, max_frame_bytes=1 << 24)
        fake = FakeLM()
        rpc = RpcClient()
        pool = EndpointPool("lm", ["http://127.0.0.1"], rpc=rpc)
        pool.endpoints[0].rpc_port = await server.start(RpcListen())
        lm = LMClient(pool, httpx.AsyncClient(transport=httpx.MockTransport(fake.handler)), rpc=rpc)
        try:
            request = proto.GenerateRequest(request_id="old", prompt="<image> describe")
            stream = await lm.open_stream(request)
            events = [event async for event in stream.events()]
            await stream.aclose()
            assert "".join(e.text for e in events if isinstance(e, TokenDelta)) == caption_of(fake.requests[0])
            assert isinstance(events[-1], StreamFinish) and pool.endpoints[0].outstanding == 0
        finally:
            await rpc.aclose()
            await server.stop()

    run(scenario())
