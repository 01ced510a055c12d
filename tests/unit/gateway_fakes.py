"""Fake downstreams for gateway unit tests: ``httpx.MockTransport`` handlers that speak
the real wire (msgpack ``EncodeResponse`` / ``GenerateResponse``, SSE), plus helpers
to build the app in-process and make test images."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import struct
import zlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import torch
from PIL import Image

import proto
from services.gateway import GatewaySettings, Transports, create_app

ENCODER_URLS = ("http://encoder-a", "http://encoder-b")
LM_URLS = ("http://lm-a",)
IM_START = 4

# A per-endpoint behaviour: None (serve), an int (answer that status), an exception
# class (raise it, as a dead socket would), bytes (answer them as a msgpack body),
# or "hang" (never answer).
Behaviour = int | type[Exception] | bytes | str | None


def png(width: int = 8, height: int = 6, colour: tuple[int, int, int] = (200, 30, 30), fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, format=fmt)
    return buffer.getvalue()


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64," + base64.b64encode(data).decode()


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid PNG of a few dozen bytes whose header declares ``width × height`` pixels."""
    data = bytearray(png(1, 1))
    ihdr = 8 + 8  # signature, then the IHDR chunk's length and type
    data[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr - 4 : ihdr + 13]))
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", crc)
    return bytes(data)


def _behave(behaviour: Behaviour, request: httpx.Request) -> httpx.Response:
    if isinstance(behaviour, int):
        return httpx.Response(behaviour, json={"error": {"type": "test", "field": "", "message": f"HTTP {behaviour}"}})
    if isinstance(behaviour, bytes):
        return httpx.Response(200, content=behaviour, headers={"content-type": proto.CONTENT_TYPE})
    if isinstance(behaviour, type) and issubclass(behaviour, Exception):
        raise behaviour("injected failure", request=request)
    raise AssertionError(f"unknown behaviour {behaviour!r}")


@dataclass
class FakeEncoder:
    """``POST /v1/encode`` and ``GET /ready``; features are a function of the image bytes."""

    tokens: int = 4
    dim: int = 8
    dtype: torch.dtype = torch.bfloat16
    model: str = "step37-tiny"
    behaviours: dict[str, Behaviour] = field(default_factory=dict)
    once: dict[str, Behaviour] = field(default_factory=dict)  # for the endpoint's next call only
    ready: dict[str, bool] = field(default_factory=dict)
    delay_s: float = 0.0
    calls: list[tuple[str, int]] = field(default_factory=list)  # (endpoint, images)

    def features_for(self, image: bytes) -> torch.Tensor:
        seed = int.from_bytes(hashlib.sha256(image).digest()[:4], "little")
        return torch.randn(self.tokens, self.dim, generator=torch.Generator().manual_seed(seed)).to(self.dtype)

    async def handler(self, request: httpx.Request) -> httpx.Response:
        host = f"{request.url.scheme}://{request.url.host}"
        if request.url.path == "/ready":
            return httpx.Response(200 if self.ready.get(host, True) else 503, json={})
        assert request.url.path == "/v1/encode", request.url.path
        if self.behaviours.get(host) == "hang":
            self.calls.append((host, 0))
            await asyncio.sleep(3600)
        behaviour = self.once.pop(host, None) or self.behaviours.get(host)
        if behaviour is not None:
            self.calls.append((host, 0))
            return _behave(behaviour, request)
        message = proto.decode(request.content, expect=proto.EncodeRequest)
        self.calls.append((host, len(message.images)))
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        features = torch.stack([self.features_for(image) for image in message.images])  # [N, L, C]
        n = len(message.images)
        cu = torch.arange(0, (n + 1) * self.tokens * 4, self.tokens * 4, dtype=torch.int32)  # [N+1]
        item = proto.ImageForInsert(IM_START, image_features=features, rope_cu_seqlens=cu,
                                    rope_max_seq_len=self.tokens * 4)
        body = proto.encode(proto.EncodeResponse(image=item, model=self.model, request_id=message.request_id,
                                                 timings={"queue": 0.5, "forward": 1.5}))
        return httpx.Response(200, content=body, headers={"content-type": proto.CONTENT_TYPE})

    @property
    def images_encoded(self) -> int:
        return sum(count for _, count in self.calls)


def caption_of(request: proto.GenerateRequest) -> str:
    """What the fake LM answers: the prompt's words plus a fingerprint of each image's features."""
    marks = []
    for item in request.images:
        for block in proto.feature_blocks(item.image_features):
            marks.append(f"{float(block.float().sum()):.3f}")
    return f"{request.prompt} -> " + " ".join(marks or ["no-image"])


@dataclass
class FakeLM:
    """``POST /v1/generate`` (msgpack or SSE) and ``GET /ready``."""

    behaviours: dict[str, Behaviour] = field(default_factory=dict)
    ready: dict[str, bool] = field(default_factory=dict)
    requests: list[proto.GenerateRequest] = field(default_factory=list)
    finish_reason: str = "stop"
    token_delay_s: float = 0.0
    fail_after_tokens: int | None = None  # stream: an error event after this many chunks
    stream_closed: asyncio.Event | None = None
    generate_delay_s: float = 0.0
    cancelled: int = 0  # non-streaming generates abandoned mid-way

    honours_cache_salt: bool = True  # what its /ready says

    async def handler(self, request: httpx.Request) -> httpx.Response:
        host = f"{request.url.scheme}://{request.url.host}"
        if request.url.path == "/ready":
            return httpx.Response(200 if self.ready.get(host, True) else 503,
                                  json={"cache_salt": True} if self.honours_cache_salt else {})
        assert request.url.path == "/v1/generate", request.url.path
        if self.behaviours.get(host) is not None:
            return _behave(self.behaviours[host], request)
        message = proto.decode(request.content, expect=proto.GenerateRequest)
        self.requests.append(message)
        text = caption_of(message)
        words = text.split(" ")
        token_ids = list(range(10, 10 + len(words)))
        prompt_tokens = len(message.prompt.split()) + sum(i.num_images * 6 for i in message.images)
        if not message.stream:
            if self.generate_delay_s:
                try:
                    await asyncio.sleep(self.generate_delay_s)
                except asyncio.CancelledError:
                    self.cancelled += 1
                    raise
            body = proto.encode(proto.GenerateResponse(token_ids=token_ids, text=text, finish_reason=self.finish_reason,
                                                       prompt_tokens=prompt_tokens, request_id=message.request_id,
                                                       timings={"prefill": 2.0, "decode": 3.0}))
            return httpx.Response(200, content=body, headers={"content-type": proto.CONTENT_TYPE})
        return httpx.Response(200, stream=_SSEStream(self, words, token_ids, prompt_tokens),
                              headers={"content-type": "text/event-stream"})


class _SSEStream(httpx.AsyncByteStream):
    """The worker's event stream; ``aclose`` is what a closed connection looks like to it."""

    def __init__(self, lm: FakeLM, words: list[str], token_ids: list[int], prompt_tokens: int) -> None:
        self.lm, self.words, self.token_ids, self.prompt_tokens = lm, words, token_ids, prompt_tokens
        self.sent_events = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        lm = self.lm
        for i, (word, token) in enumerate(zip(self.words, self.token_ids, strict=True)):
            if lm.fail_after_tokens is not None and i == lm.fail_after_tokens:
                yield b'data: {"error": {"type": "internal", "message": "device lost"}}\n\n'
                return
            if lm.token_delay_s:
                await asyncio.sleep(lm.token_delay_s)
            self.sent_events += 1
            text = word if i == 0 else " " + word
            yield f"data: {json.dumps({'token_ids': [token], 'text': text})}\n\n".encode()
        final = {"finish_reason": lm.finish_reason, "prompt_tokens": self.prompt_tokens,
                 "timings": {"prefill": 2.0, "decode": 3.0}}
        yield f"data: {json.dumps(final)}\n\n".encode()

    async def aclose(self) -> None:
        if self.lm.stream_closed is not None:
            self.lm.stream_closed.set()


def settings(**overrides: Any) -> GatewaySettings:
    values: dict[str, Any] = {"encoder_urls": ENCODER_URLS, "lm_urls": LM_URLS, "probe_interval_s": 3600.0}
    values.update(overrides)
    return GatewaySettings(**values)


@dataclass
class Harness:
    app: Any
    client: httpx.AsyncClient
    encoder: FakeEncoder
    lm: FakeLM

    @property
    def state(self) -> Any:
        return self.app.state.gateway


def harness(encoder: FakeEncoder | None = None, lm: FakeLM | None = None, *,
            fetch: Callable[[httpx.Request], httpx.Response] | None = None, **overrides: Any) -> Harness:
    encoder = encoder or FakeEncoder()
    lm = lm or FakeLM()
    transports = Transports(encoder=httpx.MockTransport(encoder.handler), lm=httpx.MockTransport(lm.handler),
                            fetch=httpx.MockTransport(fetch) if fetch is not None else None)
    app = create_app(settings(**overrides), transports)
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://gateway", timeout=30)
    return Harness(app, client, encoder, lm)


def chat_body(*images: bytes, text: str = "describe the image", **extra: Any) -> dict[str, Any]:
    content: list[dict[str, Any]] = [{"type": "text", "text": text}]
    content += [{"type": "image_url", "image_url": {"url": data_url(image)}} for image in images]
    return {"model": "step37-tiny", "messages": [{"role": "user", "content": content}], **extra}


def sse_payloads(text: str) -> list[str]:
    """The ``data`` of each event in an SSE body."""
    return [line[len("data: "):] for line in text.split("\n\n") if line.startswith("data: ")]


def asgi_request(path: str, body: dict[str, Any], *, disconnect: asyncio.Event) -> tuple[dict[str, Any], Any]:
    """An ASGI scope and ``receive`` for a JSON POST whose client hangs up once ``disconnect`` is set
    (httpx's ASGITransport buffers whole responses, so it cannot show a disconnect)."""
    raw = json.dumps(body).encode()
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())],
             "client": ("127.0.0.1", 40000), "server": ("gateway", 80)}
    body_sent = False

    async def receive() -> dict[str, Any]:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": raw, "more_body": False}
        await disconnect.wait()
        return {"type": "http.disconnect"}

    return scope, receive


class HangingCall:
    """A call-channel handler that never answers: ``started`` when a call arrives,
    ``cancelled`` when the caller's cancel (or a lost connection) reaches it."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.cancelled = asyncio.Event()

    async def __call__(self, payload: bytes) -> list[bytes]:
        self.started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return [b""]
