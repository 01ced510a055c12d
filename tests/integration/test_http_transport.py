"""The aiohttp transport under httpx's API (gateway → tiers, load tester → target),
against real sockets: bodies and headers both ways, keep-alive, and every failure
arriving as the httpx exception the gateway's error mapping expects (refused, stalled,
dropped mid-body), and an abandoned stream closing its connection so the server sees
the client leave. The client is :class:`LeanClient`, as in the gateway and the load
tester; its own differences from ``httpx.AsyncClient`` are checked at the end."""

from __future__ import annotations

import asyncio
import gzip
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from threaded_server import serve_in_thread

from services.common.server import find_free_port
from services.common.transport import AiohttpTransport, LeanClient


class Seen:
    def __init__(self) -> None:
        self.stream_closed = threading.Event()


def make_app(seen: Seen) -> FastAPI:
    app = FastAPI()

    @app.post("/echo")
    async def echo(request: Request) -> Response:
        body = await request.body()
        facts = {"length": len(body), "first": body[:4].decode("latin-1"), "x_test": request.headers.get("x-test"),
                 "content_length": request.headers.get("content-length"), "cookie": request.headers.get("cookie"),
                 "authorization": request.headers.get("authorization"),
                 "client_port": request.client.port if request.client else None}
        return Response(json.dumps(facts), media_type="application/json", headers={"x-answer": "yes"})

    @app.get("/cookie")
    async def cookie() -> Response:
        return Response("set", headers={"set-cookie": "session=abc; Path=/"})

    @app.get("/moved")
    async def moved() -> Response:
        return Response(status_code=307, headers={"location": "/echo"})

    @app.get("/gzip")
    async def gzipped() -> Response:
        return Response(gzip.compress(b"squeezed " * 100), media_type="text/plain",
                        headers={"content-encoding": "gzip"})

    @app.get("/slow")
    async def slow() -> Response:
        await asyncio.sleep(3.0)
        return Response("late")

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        async def events() -> AsyncIterator[bytes]:
            try:
                for index in range(200):
                    yield f"data: {index}\n\n".encode()
                    await asyncio.sleep(0.02)
            finally:
                seen.stream_closed.set()

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, Seen]]:
    seen = Seen()
    with serve_in_thread(make_app(seen), "transport-test-server") as url:
        yield url, seen


def client(**timeouts: float) -> httpx.AsyncClient:
    return LeanClient(transport=AiohttpTransport(max_connections=4),
                             timeout=httpx.Timeout(timeouts.get("read", 10.0), connect=timeouts.get("connect", 5.0)),
                             headers={"x-test": "default"})


async def test_bodies_headers_and_keep_alive(server: tuple[str, Seen]) -> None:
    url, _ = server
    body = b"MSGP" + bytes(range(256)) * 400
    async with client() as http:
        first = await http.post(f"{url}/echo", content=body, headers={"content-type": "application/x-msgpack"})
        second = await http.post(f"{url}/echo", content=b"tiny", headers={"x-test": "override"})
        unzipped = await http.get(f"{url}/gzip")
    assert first.status_code == 200 and first.headers["x-answer"] == "yes"
    facts = first.json()
    assert facts == {**facts, "length": len(body), "first": "MSGP", "x_test": "default",
                     "content_length": str(len(body))}
    assert second.json()["x_test"] == "override" and second.json()["length"] == 4
    assert second.json()["client_port"] == facts["client_port"]  # one kept-alive connection
    assert unzipped.text == "squeezed " * 100  # httpx decodes what the transport leaves encoded


async def test_refused_connection_is_a_connect_error() -> None:
    async with client() as http:
        with pytest.raises(httpx.ConnectError):
            await http.get(f"http://127.0.0.1:{find_free_port()}/health")


async def test_a_stalled_answer_is_a_read_timeout(server: tuple[str, Seen]) -> None:
    url, _ = server
    async with client(read=0.3) as http:
        started = time.monotonic()
        with pytest.raises(httpx.ReadTimeout):
            await http.get(f"{url}/slow")
        assert time.monotonic() - started < 2.5


async def test_a_connection_dropped_mid_body_is_a_protocol_error() -> None:
    async def half_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\nContent-Type: text/plain\r\n\r\nonly this")
        await writer.drain()
        writer.close()

    listener = await asyncio.start_server(half_answer, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    try:
        async with client() as http:
            with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
                await http.get(f"http://127.0.0.1:{port}/")
    finally:
        listener.close()
        await listener.wait_closed()


async def test_closing_a_stream_early_disconnects_the_server_side(server: tuple[str, Seen]) -> None:
    url, seen = server
    async with client() as http:
        async with http.stream("GET", f"{url}/stream") as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            lines = response.aiter_lines()
            assert await anext(lines) == "data: 0"
        # 200 events at 20 ms would take 4 s; the server's generator ends once we leave.
        assert await asyncio.to_thread(seen.stream_closed.wait, 3.0)
        assert (await http.post(f"{url}/echo", content=b"after")).json()["length"] == 5  # the client still works


async def test_the_environment_proxy_is_used_and_no_proxy_respected(server: tuple[str, Seen], monkeypatch) -> None:
    """With ``trust_env`` a request goes through ``HTTP_PROXY`` (the test server plays the
    proxy: it answers a request for a host that does not resolve), and a host listed in
    ``NO_PROXY`` goes direct; without ``trust_env`` the environment is ignored."""
    url, _ = server
    monkeypatch.setenv("HTTP_PROXY", url)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.delenv("http_proxy", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    trusting = AiohttpTransport(max_connections=4, trust_env=True)
    async with httpx.AsyncClient(transport=trusting, timeout=10.0) as proxied:
        answer = await proxied.post("http://unresolvable.invalid/echo", content=b"via proxy")
        assert answer.status_code == 200 and answer.json()["length"] == 9
        direct = await proxied.post(f"{url}/echo", content=b"direct")  # 127.0.0.1 is in NO_PROXY
        assert direct.status_code == 200
    assert trusting.proxy_for(httpx.URL("http://unresolvable.invalid/echo")) == url
    assert trusting.proxy_for(httpx.URL(f"{url}/echo")) is None
    async with httpx.AsyncClient(transport=AiohttpTransport(max_connections=4), timeout=10.0) as plain:
        with pytest.raises(httpx.ConnectError):
            await plain.post("http://unresolvable.invalid/echo", content=b"direct")


async def test_the_lean_client_keeps_no_cookies_and_follows_no_redirects(server: tuple[str, Seen]) -> None:
    url, _ = server
    async with client() as http:
        assert (await http.get(f"{url}/cookie")).headers["set-cookie"].startswith("session=abc")
        assert (await http.post(f"{url}/echo", content=b"x")).json()["cookie"] is None
        moved = await http.get(f"{url}/moved")
        assert moved.status_code == 307 and moved.headers["location"] == "/echo"
        assert moved.request.url == f"{url}/moved"
    async with httpx.AsyncClient(transport=AiohttpTransport(max_connections=4)) as plain:  # what it skips
        await plain.get(f"{url}/cookie")
        assert (await plain.post(f"{url}/echo", content=b"x")).json()["cookie"] == "session=abc"


async def test_the_lean_client_takes_httpx_path_for_auth_and_redirects(server: tuple[str, Seen]) -> None:
    url, _ = server
    async with client() as http:
        answer = await http.post(f"{url}/echo", content=b"x", auth=("user", "secret"))
        assert answer.json()["authorization"].startswith("Basic ")
        followed = await http.get(f"{url}/moved", follow_redirects=True)
        assert followed.status_code == 405 and followed.url == f"{url}/echo"  # GET on a POST route: it got there


async def test_the_lean_client_attaches_the_request_to_transport_errors() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused")  # raised without a request, as a fake may

    async with LeanClient(transport=httpx.MockTransport(refuse)) as http:
        with pytest.raises(httpx.ConnectError) as caught:
            await http.get("http://tier.test/ready")
    assert caught.value.request.url == "http://tier.test/ready"
