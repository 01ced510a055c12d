"""``create_app``: the LM worker's FastAPI application.

The lifespan starts the engine thread before the first request and stops it after
the last (uvicorn drains in-flight requests first); whatever is still queued then is
failed with a 503 rather than left hanging. With ``internal_token`` set, work routes
require it in ``x-internal-token`` (health, readiness and metrics stay open). With
``rpc`` set, generates are also served as calls on their own port
(``services.common.rpc``), reported in ``/ready`` as ``rpc_port``: a streamed one as
one chunk per event of the HTTP route's stream.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

import proto
from lm_worker.protocol import event_payloads
from lm_worker.router import create_router
from lm_worker.sequence import GenerationStream
from lm_worker.serving import LMWorkerService
from lm_worker.settings import LMWorkerSettings
from services.common.auth import InternalTokenMiddleware
from services.common.errors import install_error_handlers
from services.common.rpc import RpcListen, RpcServer

__all__ = ["create_app"]


def rpc_server(service: LMWorkerService, token: str | None = None) -> RpcServer:
    """``generate`` calls: a msgpack ``GenerateRequest`` in, a ``GenerateResponse`` out, as
    on ``POST /v1/generate``; with ``stream`` set, the JSON events of that route's
    server-sent events, one per chunk, once the first is ready (failures before it are
    the call's error, as they are the route's status)."""

    async def generate(payload: bytes) -> list[bytes | memoryview] | AsyncIterator[list[bytes]]:
        message, sequence = await service.prepare_async(payload)
        if message.stream:
            return _events(await service.open_stream(sequence))
        return proto.encode_chunks(await service.generate(sequence))

    async def _events(stream: GenerationStream) -> AsyncIterator[list[bytes]]:
        try:
            async for event in stream:
                for item in event_payloads(stream.request_id, event):
                    yield [item.encode()]
        finally:
            stream.cancel()  # a no-op when finished; frees the slot of a cancelled call

    return RpcServer({"generate": generate}, max_frame_bytes=service.settings.max_body_bytes,
                     token=token, on_error=service.metrics.on_error, on_call=service.metrics.on_call)


def create_app(service: LMWorkerService | LMWorkerSettings, *, rpc: RpcListen | None = None) -> FastAPI:
    """An app serving ``service`` (or a service loaded from ``settings``)."""
    if isinstance(service, LMWorkerSettings):
        service = LMWorkerService.from_settings(service)
    owned = service

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        owned.start()
        calls = rpc_server(owned, rpc.token) if rpc is not None else None
        try:
            if calls is not None:
                app.state.rpc_port = await calls.start(rpc)
            yield
        finally:
            if calls is not None:
                await calls.stop()
            await asyncio.to_thread(owned.stop)  # joins the engine thread: not on the loop

    app = FastAPI(title="step37-serve LM worker", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.service = service
    app.state.rpc_port = None
    install_error_handlers(app, on_error=service.metrics.on_error)
    app.include_router(create_router(service))
    if service.settings.internal_token is not None:
        app.add_middleware(InternalTokenMiddleware, token=service.settings.internal_token)
    return app
