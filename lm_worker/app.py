"""``create_app``: the LM worker's FastAPI application.

The lifespan starts the engine thread before the first request and stops it after
the last (uvicorn drains in-flight requests first); whatever is still queued then is
failed with a 503 rather than left hanging. With ``internal_token`` set, work routes
require it in ``x-internal-token`` (health, readiness and metrics stay open).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from lm_worker.router import create_router
from lm_worker.serving import LMWorkerService
from lm_worker.settings import LMWorkerSettings
from services.common.auth import InternalTokenMiddleware
from services.common.errors import install_error_handlers

__all__ = ["create_app"]


def create_app(service: LMWorkerService | LMWorkerSettings) -> FastAPI:
    """An app serving ``service`` (or a service loaded from ``settings``)."""
    if isinstance(service, LMWorkerSettings):
        service = LMWorkerService.from_settings(service)
    owned = service

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        owned.start()
        try:
            yield
        finally:
            await asyncio.to_thread(owned.stop)  # joins the engine thread: not on the loop

    app = FastAPI(title="step37-serve LM worker", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.service = service
    install_error_handlers(app, on_error=service.metrics.on_error)
    app.include_router(create_router(service))
    if service.settings.internal_token is not None:
        app.add_middleware(InternalTokenMiddleware, token=service.settings.internal_token)
    return app
