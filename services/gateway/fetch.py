"""Fetching ``http(s)`` image URLs, for hosts on an allow-list only (empty by default).

A gateway that fetches arbitrary URLs is a server-side request forgery hole: it can be
made to read cloud metadata endpoints or internal services. So only hosts the operator
listed are fetched, redirects are refused (a redirect could leave the allow-list), the
body is bounded while it streams, and the whole fetch has a timeout.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import httpx

from services.gateway.errors import ImageUrlNotAllowed, InvalidImage, PayloadTooLarge

__all__ = ["ImageFetcher"]


class ImageFetcher:
    """Downloads allow-listed image URLs with a size bound and a timeout."""

    def __init__(self, client: httpx.AsyncClient, allowed_hosts: tuple[str, ...], *, max_bytes: int,
                 timeout_s: float) -> None:
        self.client = client
        self.allowed_hosts = frozenset(host.lower() for host in allowed_hosts)
        self.max_bytes = max_bytes
        self.timeout = httpx.Timeout(timeout_s)

    def check_url(self, url: str, *, param: str) -> None:
        """Refuse (400) a URL the gateway will not fetch, before any network traffic."""
        try:
            parts = urlsplit(url)
            host = (parts.hostname or "").lower()
        except ValueError as exc:  # e.g. an unclosed IPv6 bracket
            raise InvalidImage(f"{param}: not a valid URL ({exc})", param=param) from exc
        if parts.scheme not in ("http", "https"):
            raise InvalidImage(f"{param}: image URLs must be data: URLs or http(s) URLs", param=param,
                               value=parts.scheme)
        if parts.username is not None or parts.password is not None:
            raise ImageUrlNotAllowed(f"{param}: image URLs may not carry credentials", param=param)
        if host not in self.allowed_hosts:
            hint = " (the allow-list is empty: send the image as a data: URL)" if not self.allowed_hosts else ""
            raise ImageUrlNotAllowed(f"{param}: fetching images from host {host!r} is not allowed{hint}",
                                     param=param, value=host)

    async def fetch(self, url: str, *, param: str) -> bytes:
        self.check_url(url, param=param)
        try:
            async with self.client.stream("GET", url, timeout=self.timeout, follow_redirects=False) as response:
                if response.status_code != 200:
                    reason = "redirects are not followed" if response.is_redirect else "expected 200"
                    raise InvalidImage(f"{param}: fetching the image URL returned HTTP "
                                       f"{response.status_code} ({reason})", param=param)
                declared = response.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > self.max_bytes:
                    raise PayloadTooLarge(f"{param}: the image is {declared} bytes; the limit is "
                                          f"{self.max_bytes}", param=param)
                chunks: list[bytes] = []
                size = 0
                async for chunk in response.aiter_bytes():
                    size += len(chunk)
                    if size > self.max_bytes:
                        raise PayloadTooLarge(f"{param}: the image is larger than the limit of "
                                              f"{self.max_bytes} bytes", param=param)
                    chunks.append(chunk)
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            # The URL is the client's: a failed download is a bad request, not our outage.
            raise InvalidImage(f"{param}: could not download the image URL ({type(exc).__name__})",
                               param=param) from exc
        return b"".join(chunks)
