"""httpx's client API over aiohttp's sockets, for the calls whose fixed cost is measured.

Every gateway request makes two downstream calls, so their fixed cost is part of every
latency, and the load tester's own cost per request is part of what it reports.
httpx's own transport spends about 1 ms more per keep-alive call than aiohttp on the
same loopback connection (``python bench/http_floor.py`` times both), so the gateway's
encoder and LM worker clients and the load tester send through
:class:`AiohttpTransport`. The code above it keeps httpx's API, timeouts and exception
types (``services.gateway.upstream`` maps those to gateway errors), and tests keep
``httpx.MockTransport`` as their seam. The gateway still fetches image URLs with
httpx's own transport: that path is not latency-bound.

:class:`LeanClient` is the ``httpx.AsyncClient`` those calls go through: its ``send``
hands a request straight to the transport, skipping the cookie jar, the auth flow and
the redirect loop that ``httpx.AsyncClient.send`` runs for every call (``python
bench/http_floor.py`` times the client's CPU per call with each).

The mapping: httpx's per-request ``connect`` timeout bounds waiting for a pooled
connection and opening one, its ``read`` timeout the gap between received bytes.
Connection failures become ``httpx.ConnectError``/``ConnectTimeout``, a connection
lost mid-answer ``httpx.RemoteProtocolError``/``ReadError``, a stalled read
``httpx.ReadTimeout``. Closing a response whose body was not read to the end closes
its connection, so the server sees the disconnect (the LM worker frees the slot).
"""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import AsyncIterator

import aiohttp
import httpx

__all__ = ["AiohttpTransport", "LeanClient"]

# Set by aiohttp itself from the URL and body; forwarding httpx's would duplicate them.
_SKIP_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "connection"})


def _as_httpx_error(exc: BaseException, request: httpx.Request, *, reading: bool) -> httpx.TransportError:
    message = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return httpx.ConnectTimeout(message, request=request)
    if isinstance(exc, aiohttp.ClientConnectorError):
        return httpx.ConnectError(message, request=request)
    if isinstance(exc, (aiohttp.ServerTimeoutError, asyncio.TimeoutError)):
        return httpx.ReadTimeout(message, request=request)
    if isinstance(exc, (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError, aiohttp.ClientResponseError)):
        return httpx.RemoteProtocolError(message, request=request)
    if isinstance(exc, aiohttp.ClientOSError):
        return (httpx.ReadError if reading else httpx.WriteError)(message, request=request)
    return httpx.TransportError(message, request=request)


class _Body(httpx.AsyncByteStream):
    def __init__(self, response: aiohttp.ClientResponse, request: httpx.Request) -> None:
        self._response = response
        self._request = request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.content.iter_any():
                yield chunk
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise _as_httpx_error(exc, self._request, reading=True) from exc

    async def aclose(self) -> None:
        if self._response.content.at_eof():
            self._response.release()  # fully read: the connection goes back to the pool
        else:
            self._response.close()  # abandoned mid-body: drop the connection


class AiohttpTransport(httpx.AsyncBaseTransport):
    """An ``httpx.AsyncBaseTransport`` over one ``aiohttp.ClientSession``, created on
    first use inside the running loop and closed with the httpx client."""

    def __init__(self, *, max_connections: int | None, keepalive_s: float = 15.0, trust_env: bool = False) -> None:
        self.max_connections = max_connections
        self.keepalive_s = keepalive_s
        # Honour HTTP(S)_PROXY and NO_PROXY (the load tester, as httpx does by default),
        # looked up once per origin: aiohttp's own trust_env reads the environment and
        # parses ~/.netrc again for every request, a measurable share of a load test's CPU.
        self.trust_env = trust_env
        self._proxies: dict[tuple[str, str, int | None], str | None] = {}
        self._session: aiohttp.ClientSession | None = None

    def _open_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=self.max_connections or 0,  # 0: unbounded
                                             keepalive_timeout=self.keepalive_s)
            # No decompression here (httpx decodes by content-encoding), no cookies.
            self._session = aiohttp.ClientSession(connector=connector, auto_decompress=False,
                                                  cookie_jar=aiohttp.DummyCookieJar())
        return self._session

    def proxy_for(self, url: httpx.URL) -> str | None:
        """The proxy the environment names for ``url``'s origin, or None (direct)."""
        if not self.trust_env:
            return None
        key = (url.scheme, url.host, url.port)
        if key not in self._proxies:
            bypass = urllib.request.proxy_bypass(url.host if url.port is None else f"{url.host}:{url.port}")
            self._proxies[key] = None if bypass else urllib.request.getproxies().get(url.scheme)
        return self._proxies[key]

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeouts = request.extensions.get("timeout", {})
        timeout = aiohttp.ClientTimeout(total=None, connect=timeouts.get("connect"), sock_read=timeouts.get("read"))
        headers = [(name, value) for name, value in request.headers.multi_items() if name not in _SKIP_HEADERS]
        body = await request.aread()
        try:
            response = await self._open_session().request(
                request.method, str(request.url), headers=headers, data=body or None, timeout=timeout,
                allow_redirects=False, proxy=self.proxy_for(request.url))
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise _as_httpx_error(exc, request, reading=False) from exc
        return httpx.Response(response.status, headers=list(response.raw_headers), stream=_Body(response, request),
                              extensions={"http_version": b"HTTP/1.1"})

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class LeanClient(httpx.AsyncClient):
    """An ``httpx.AsyncClient`` for calls to our own services (and the load tester's target).

    ``send`` hands the request to the transport and returns its response as it is: no
    cookies are stored or sent, no auth flow runs, redirects are returned, not followed
    (our services answer none), and ``response.elapsed`` is not set. A request that asks
    for auth or redirect following (or a client built with them, or with event hooks)
    takes httpx's own path.
    """

    def __init__(self, *, transport: httpx.AsyncBaseTransport, **kwargs: object) -> None:
        super().__init__(transport=transport, **kwargs)  # type: ignore[arg-type]
        self._lean_transport = transport

    async def send(self, request: httpx.Request, *, stream: bool = False,
                   auth: object = httpx.USE_CLIENT_DEFAULT,
                   follow_redirects: object = httpx.USE_CLIENT_DEFAULT) -> httpx.Response:
        if (auth not in (httpx.USE_CLIENT_DEFAULT, None) or follow_redirects is True or self.auth is not None
                or (follow_redirects is httpx.USE_CLIENT_DEFAULT and self.follow_redirects) or self.is_closed
                or any(self.event_hooks.values())):
            return await super().send(request, stream=stream, auth=auth,  # type: ignore[arg-type]
                                      follow_redirects=follow_redirects)  # type: ignore[arg-type]
        if "timeout" not in request.extensions:  # a request built by hand: the client's default, as httpx
            request.extensions = {**request.extensions, "timeout": self.timeout.as_dict()}
        try:
            response = await self._lean_transport.handle_async_request(request)
        except httpx.RequestError as exc:
            try:
                exc.request  # noqa: B018 -- raises when the transport raised it without one
            except RuntimeError:
                exc.request = request
            raise
        response.request = request
        if not stream:
            try:
                await response.aread()
            except BaseException:
                await response.aclose()
                raise
        return response
