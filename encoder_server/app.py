"""The encoder's ASGI app: native and KServe v2 routes around one `EncoderService`.

The lifespan starts the service (preprocessing pool, batcher thread, warm-up forward)
before the first request and stops it after the last one, so uvicorn's graceful
shutdown drains in-flight requests before the batcher ends. With ``rpc`` set it also
serves ``encode`` calls on their own port (``services.common.rpc``), reported in
``/ready`` as ``rpc_port`` for the gateway to find.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import proto
from encoder_server import kserve, router
from encoder_server.metrics import EncoderMetrics
from encoder_server.serving import EncoderService
from services.common.errors import install_error_handlers
from services.common.rpc import RpcListen, RpcServer

__all__ = ["create_app"]

_UNTIMED_ROUTES = frozenset({"/metrics", "/health"})


class RequestMetricsMiddleware:
    """Counts and times every HTTP request by route template and status code.

    Pure ASGI (not BaseHTTPMiddleware) so streamed responses pass through untouched;
    the route template comes from the scope FastAPI fills in while routing, which keeps
    label cardinality bounded whatever paths clients send.
    """

    def __init__(self, app: ASGIApp, metrics: EncoderMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the client sees if the app raises before responding

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            if route not in _UNTIMED_ROUTES:
                self.metrics.http_request(route, status, time.perf_counter() - started)


def rpc_server(service: EncoderService, token: str | None = None) -> RpcServer:
    """``encode`` calls: a msgpack ``EncodeRequest`` in, an ``EncodeResponse`` out, as on
    ``POST /v1/encode``."""

    async def encode(payload: bytes) -> list[bytes | memoryview]:
        request = proto.decode(payload, expect=proto.EncodeRequest, limits=service.wire_limits)
        return proto.encode_chunks(await service.encode(request))

    return RpcServer({"encode": encode}, max_frame_bytes=service.settings.max_body_bytes, token=token,
                     on_error=service.metrics.error,
                     on_call=lambda method, status, seconds: service.metrics.http_request(
                         f"rpc:{method}", status, seconds))


def create_app(service: EncoderService, *, rpc: RpcListen | None = None) -> FastAPI:
    """An app serving ``service``; the caller keeps ownership of the model object."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await service.start()
        calls = rpc_server(service, rpc.token) if rpc is not None else None
        try:
            if calls is not None:
                app.state.rpc_port = await calls.start(rpc)
            yield
        finally:
            if calls is not None:
                await calls.stop()
            await service.stop()

    app = FastAPI(title="step37-serve encoder", version="0.1.0", lifespan=lifespan,
                  description="Step3.7 vision tower: native msgpack API and KServe v2 / Triton HTTP.")
    app.state.service = service
    app.state.rpc_port = None
    install_error_handlers(app, on_error=service.metrics.error)
    app.include_router(router.router)
    app.include_router(kserve.router)
    app.add_middleware(RequestMetricsMiddleware, metrics=service.metrics)
    return app
