"""Shared-secret check between the gateway and the internal services.

Internal services bind 127.0.0.1 by default; when they must listen on a network
(compose, Kubernetes) they can also require the gateway to present a shared token in
``x-internal-token``. Health, readiness and metrics stay open so orchestrators and
Prometheus need no secret. Comparison is constant-time.
"""

from __future__ import annotations

import hmac
import json

__all__ = ["INTERNAL_TOKEN_HEADER", "OPEN_PATHS", "InternalTokenMiddleware"]

INTERNAL_TOKEN_HEADER = "x-internal-token"
OPEN_PATHS = ("/health", "/ready", "/metrics", "/v2/health/live", "/v2/health/ready")


class InternalTokenMiddleware:
    """Pure ASGI middleware: 401 unless the request carries the shared token."""

    def __init__(self, app, token: str) -> None:
        if not token:
            raise ValueError("InternalTokenMiddleware needs a non-empty token")
        self.app = app
        self._token = token.encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        presented = b""
        for name, value in scope.get("headers", ()):
            if name == INTERNAL_TOKEN_HEADER.encode():
                presented = value
                break
        if hmac.compare_digest(presented, self._token):
            await self.app(scope, receive, send)
            return
        body = json.dumps({"error": {"type": "unauthorized", "field": INTERNAL_TOKEN_HEADER,
                                     "message": f"missing or wrong {INTERNAL_TOKEN_HEADER} header"}}).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
