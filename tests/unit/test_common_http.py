"""Shared HTTP plumbing: bounded, well-formed compressed bodies; Retry-After on 503."""

from __future__ import annotations

import gzip

import httpx
import pytest
import torch
from fastapi import FastAPI, Request

import proto
from proto import EncodeResponse, ImageForInsert
from proto.errors import DescribedError
from services.common.errors import install_error_handlers
from services.common.http import STREAM_ABOVE_BYTES, msgpack_response, read_body


class Busy(DescribedError):
    http_status = 503
    kind = "overloaded"
    retry_after_s = 2.4


def make_client() -> httpx.AsyncClient:
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/echo")
    async def echo(request: Request) -> dict:
        return {"size": len(await read_body(request, 1000))}

    @app.get("/busy")
    async def busy() -> dict:
        raise Busy()

    return httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test")


@pytest.mark.parametrize(("body", "status", "text"), [
    (gzip.compress(b"x" * 500), 200, None),
    (gzip.compress(b"x" * 500)[:-12], 400, "truncated gzip"),
    (gzip.compress(b"x" * 5000), 413, "inflated size"),
    (b"not gzip at all", 400, "not valid gzip"),
])
async def test_gzip_bodies(body, status, text):
    async with make_client() as client:
        response = await client.post("/echo", content=body, headers={"content-encoding": "gzip"})
    assert response.status_code == status
    if text:
        assert text in response.json()["error"]["message"]


async def test_overloaded_answers_carry_retry_after():
    async with make_client() as client:
        response = await client.get("/busy")
    assert response.status_code == 503 and response.headers["retry-after"] == "2"


async def test_wire_errors_answer_with_their_own_status_without_registration():
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/decode")
    async def decode(request: Request) -> dict:
        proto.decode(await request.body())
        return {}

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test") as client:
        response = await client.post("/decode", content=b"\xc1")
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "malformed_message"


def test_servers_keep_idle_connections_longer_than_our_clients(monkeypatch):
    """A server that closed idle keep-alive connections before our clients do could close
    one just as the gateway (or the load tester) reuses it: that request would fail."""
    import uvicorn

    from services.common.server import KEEP_ALIVE_S, serve
    from services.common.transport import AiohttpTransport

    seen: list[uvicorn.Config] = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, *args, **kwargs: seen.append(self.config))
    serve(FastAPI(), host="127.0.0.1", port=0)
    assert seen and seen[0].timeout_keep_alive == KEEP_ALIVE_S
    assert AiohttpTransport(max_connections=1).keepalive_s < KEEP_ALIVE_S


@pytest.mark.parametrize("rows", [4, 2 * STREAM_ABOVE_BYTES // (2 * 64)])  # one body; streamed in chunks
async def test_wire_messages_arrive_whole_sent_at_once_or_streamed(rows):
    features = torch.randn(rows, 64).bfloat16()
    app = FastAPI()

    @app.get("/message")
    async def message():
        return msgpack_response(EncodeResponse(image=ImageForInsert(3, image_features=features[None]),
                                               request_id="r1"))

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test") as client:
        response = await client.get("/message")
    assert response.headers["content-type"] == proto.CONTENT_TYPE
    assert int(response.headers["content-length"]) == len(response.content)
    back = proto.decode(response.content, expect=EncodeResponse)
    assert back.request_id == "r1" and torch.equal(back.image.image_features[0], features)
