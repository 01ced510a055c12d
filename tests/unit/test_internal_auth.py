"""The shared token between gateway and internal services."""

from __future__ import annotations

import httpx
import pytest
from fastapi import FastAPI

from services.common.auth import INTERNAL_TOKEN_HEADER, InternalTokenMiddleware


def make_app() -> httpx.AsyncClient:
    app = FastAPI()

    @app.get("/ready")
    async def ready() -> dict:
        return {"ready": True}

    @app.post("/v1/encode")
    async def encode() -> dict:
        return {"ok": True}

    return httpx.AsyncClient(transport=httpx.ASGITransport(InternalTokenMiddleware(app, "s3cret")),
                             base_url="http://internal")


@pytest.mark.parametrize(("headers", "status"), [
    ({}, 401),
    ({INTERNAL_TOKEN_HEADER: "wrong"}, 401),
    ({INTERNAL_TOKEN_HEADER: "s3cret-and-more"}, 401),
    ({"authorization": "Bearer s3cret"}, 401),
    ({INTERNAL_TOKEN_HEADER: "s3cret"}, 200),
])
async def test_token_required_on_work_routes(headers, status):
    async with make_app() as client:
        response = await client.post("/v1/encode", headers=headers)
    assert response.status_code == status
    if status == 401:
        assert response.json()["error"]["field"] == INTERNAL_TOKEN_HEADER


async def test_health_routes_stay_open():
    async with make_app() as client:
        assert (await client.get("/ready")).status_code == 200


def test_empty_token_is_refused():
    with pytest.raises(ValueError, match="non-empty"):
        InternalTokenMiddleware(FastAPI(), "")
