"""Optional API-key check for the public ``/v1/*`` routes.

Off unless a key is configured (``--api-key`` / ``STEP37_API_KEY``). Clients send
``Authorization: Bearer <key>``, as OpenAI clients do with their ``api_key``. The
comparison is constant-time (``hmac.compare_digest`` on bytes), so response timing
does not reveal how much of a guessed key was right. Health, readiness and metrics
stay open for orchestrators and scrapers; the gateway binds loopback by default.
"""

from __future__ import annotations

import hmac

from services.gateway.errors import AuthenticationFailed

__all__ = ["ApiKeyAuth"]


class ApiKeyAuth:
    def __init__(self, api_key: str | None) -> None:
        self._key = api_key.encode() if api_key else None

    @property
    def enabled(self) -> bool:
        return self._key is not None

    def check(self, authorization: str | None) -> None:
        """Raise ``AuthenticationFailed`` (401) unless the header carries the key."""
        if self._key is None:
            return
        scheme, _, token = (authorization or "").strip().partition(" ")
        if not authorization or scheme.lower() != "bearer" or not token.strip():
            raise AuthenticationFailed("missing API key: send 'Authorization: Bearer <key>'")
        if not hmac.compare_digest(token.strip().encode(), self._key):
            raise AuthenticationFailed("invalid API key")
