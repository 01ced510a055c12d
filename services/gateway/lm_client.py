"""Calling the LM worker tier: one generate, or one token stream, per request.

Generation is not idempotent (sampling with no seed, and it costs GPU time), so a
request moves to another endpoint only when the first provably did nothing: the
connection was refused, or the worker answered "busy" (503) before starting. Once a
stream is open nothing is retried — the client may already hold tokens. Generates
and streams go over the endpoint's call channel (``services.common.rpc``) when it has
one, else over HTTP (a stream as server-sent events). Closing an :class:`LMStream`
cancels the call, or closes the HTTP response, which the worker sees as a disconnect;
either way it frees the sequence's KV-cache slot, as cancelling a generate does.

Image features go by name to a worker that keeps them (``/ready`` says so) and was
sent them whole before: a chat about one photo ships its features once per worker,
not once per turn. A worker that no longer has them answers 400 naming
``feature_refs``; they are sent whole again, to the same worker.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx
import torch

import proto
from proto import GenerateRequest, GenerateResponse
from proto.messages import FINISH_REASONS
from services.common.rpc import RpcClient, RpcError, RpcStream, RpcUnavailable
from services.gateway.errors import (
    GatewayError,
    InvalidRequest,
    ServiceUnavailable,
    UpstreamError,
    UpstreamTimeout,
)
from services.gateway.pool import Endpoint, EndpointPool
from services.gateway.protocol import IMAGE_PLACEHOLDER
from services.gateway.sse import iter_events
from services.gateway.upstream import (
    error_from_exception,
    error_from_rpc,
    error_from_status,
    read_bounded,
)

__all__ = ["LMClient", "LMStream", "StreamFinish", "TokenDelta", "affinity_key"]

logger = logging.getLogger(__name__)

SERVICE = "LM worker"
T = TypeVar("T")
_FINISH_REASONS = frozenset(FINISH_REASONS)
_AFFINITY_VALUES = 256  # leading feature values that stand for an image in affinity_key


@dataclass
class TokenDelta:
    token_ids: list[int]
    text: str


@dataclass
class StreamFinish:
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    timings: dict[str, float] = field(default_factory=dict)
    cached_tokens: int = 0


def _event(payload: str) -> dict[str, Any]:
    try:
        event = json.loads(payload)
    except json.JSONDecodeError as exc:
        raise UpstreamError(f"the LM worker streamed an event that is not JSON ({exc})") from exc
    if not isinstance(event, dict):
        raise UpstreamError("the LM worker streamed an event that is not a JSON object")
    if "error" in event:
        error = event["error"]
        message = error.get("message", error) if isinstance(error, dict) else error
        raise UpstreamError(f"the LM worker failed mid-stream: {message}")
    return event


def _delta(event: dict[str, Any]) -> TokenDelta:
    token_ids, text = event.get("token_ids", []), event.get("text", "")
    if not isinstance(token_ids, list) or not all(isinstance(t, int) for t in token_ids) or not isinstance(text, str):
        raise UpstreamError("the LM worker streamed a chunk without int token_ids / str text")
    return TokenDelta(token_ids, text)


def _finish(event: dict[str, Any], counted_tokens: int) -> StreamFinish:
    """The final event; the worker's own ``completion_tokens`` wins over the count of
    streamed ids (they agree unless the worker held tokens back, e.g. a stop string)."""
    reason, prompt_tokens, timings = event["finish_reason"], event.get("prompt_tokens", 0), event.get("timings", {})
    completion_tokens = event.get("completion_tokens", counted_tokens)
    cached_tokens = event.get("cached_tokens", 0)
    if not isinstance(completion_tokens, int) or not isinstance(cached_tokens, int):
        raise UpstreamError("the LM worker streamed a non-integer completion_tokens or cached_tokens")
    if reason not in _FINISH_REASONS or not isinstance(prompt_tokens, int) or not isinstance(timings, dict):
        raise UpstreamError(f"the LM worker streamed a malformed final event (finish_reason={reason!r})")
    clean = {str(k): float(v) for k, v in timings.items() if isinstance(v, (int, float))}
    return StreamFinish(reason, prompt_tokens, completion_tokens, clean, cached_tokens)


def affinity_key(request: GenerateRequest) -> bytes | None:
    """What names the LM worker likely to hold ``request``'s prompt prefix: the text before
    its first image and that image's leading feature values (None without images).

    Routing only: two images that share their first values would share a worker, never
    an answer (the worker's prefix cache keys hash every value)."""
    if not request.images or request.images[0].image_features is None:
        return None
    first = next(proto.feature_blocks(request.images[0].image_features))  # [L, C]
    head = first.reshape(-1)[:_AFFINITY_VALUES].contiguous()
    key = hashlib.blake2b((request.prompt or "").split(IMAGE_PLACEHOLDER, 1)[0].encode(), digest_size=16)
    key.update((request.cache_salt or "").encode())  # a salted prompt hits only its own salt's prefixes
    key.update(str(head.dtype).encode())
    key.update(head.view(torch.uint8).numpy())
    return key.digest()


class LMStream:
    """An open token stream from one LM worker; iterate :meth:`events` once, then :meth:`aclose`.

    ``source`` is an HTTP response of server-sent events or a call channel's stream:
    both carry the same JSON events."""

    def __init__(self, client: LMClient, endpoint: Endpoint, source: httpx.Response | RpcStream) -> None:
        self._client = client
        self._endpoint = endpoint
        self._source = source
        self._closed = False

    def _payloads(self) -> AsyncIterator[str]:
        if isinstance(self._source, RpcStream):
            return _decoded(self._source.chunks())
        return iter_events(self._source.aiter_lines())

    async def events(self) -> AsyncIterator[TokenDelta | StreamFinish]:
        """Token deltas, then exactly one :class:`StreamFinish`; raises ``GatewayError`` otherwise."""
        completion_tokens = 0
        try:
            async for payload in self._payloads():
                if payload.strip() == "[DONE]":
                    break
                event = _event(payload)
                delta = _delta(event)
                completion_tokens += len(delta.token_ids)
                if delta.token_ids or delta.text:
                    yield delta
                if "finish_reason" in event:
                    self._client.pool.record_success(self._endpoint)
                    yield _finish(event, completion_tokens)
                    return
        except (httpx.HTTPError, RpcError) as exc:
            if isinstance(exc, RpcError):
                error = error_from_rpc(SERVICE, exc, idempotent=False)
            else:
                error = error_from_exception(SERVICE, exc, idempotent=False)
            self._client._failed(self._endpoint, error)
            raise error from exc
        except GatewayError as exc:
            self._client._failed(self._endpoint, exc)
            raise
        except ValueError as exc:  # iter_events: an oversized event; an item that is not UTF-8
            raise UpstreamError(f"the LM worker stream is malformed ({exc})") from exc
        error = UpstreamError("the LM worker ended the stream without a finish_reason")
        self._client._failed(self._endpoint, error)
        raise error

    async def aclose(self) -> None:
        """Close the upstream response (idempotent): the worker stops generating."""
        if self._closed:
            return
        self._closed = True
        try:
            await self._source.aclose()
        finally:
            self._client.pool.release(self._endpoint)


def _headers(request: GenerateRequest) -> dict[str, str]:
    return {"content-type": proto.CONTENT_TYPE, "x-request-id": request.request_id}


async def _decoded(chunks: AsyncIterator[bytes]) -> AsyncIterator[str]:
    async for chunk in chunks:
        yield chunk.decode()


class LMClient:
    """Sends ``GenerateRequest`` messages to the least busy ready LM worker."""

    def __init__(self, pool: EndpointPool, client: httpx.AsyncClient, *, timeout_s: float = 120.0,
                 connect_timeout_s: float = 5.0, limits: proto.WireLimits = proto.DEFAULT_LIMITS,
                 on_error: Callable[[str, GatewayError], None] | None = None, rpc: RpcClient | None = None,
                 on_features: Callable[[str], None] | None = None) -> None:
        """``on_features``: told how each request's image features went: "by_name", "whole"
        or "resent" (whole again, after a worker no longer had them)."""
        self.pool = pool
        self.on_features = on_features or (lambda how: None)
        self.client = client
        self.rpc = rpc
        # read: a whole non-streaming generate, or the longest gap between streamed events
        # (over the call channel as over HTTP).
        self.timeout_s = timeout_s
        self.timeout = httpx.Timeout(timeout_s, connect=connect_timeout_s)
        self.limits = limits
        self.on_error = on_error

    async def generate(self, request: GenerateRequest) -> GenerateResponse:
        """The whole generation in one answer, within ``timeout_s`` (httpx bounds each read;
        this bounds the call, so a worker that dribbles bytes cannot hold it forever)."""
        try:
            return await asyncio.wait_for(self._generate(request), self.timeout_s)
        except asyncio.TimeoutError:
            error = UpstreamTimeout(f"the LM worker did not answer within {self.timeout_s:g} s")
            if self.on_error is not None:
                self.on_error(SERVICE, error)
            raise error from None

    async def _generate(self, request: GenerateRequest) -> GenerateResponse:
        request.stream = False
        endpoint, data = await self._first_to_start(
            request.request_id, affinity_key(request),
            lambda endpoint: self._features_by_name(endpoint, request, lambda chunks: self._generate_on(
                endpoint, request, chunks)))
        self.pool.release(endpoint)
        try:
            message = proto.decode(data, expect=GenerateResponse, limits=self.limits)
        except proto.ProtocolError as exc:
            raise UpstreamError(f"the LM worker sent an invalid GenerateResponse ({exc})") from exc
        self.pool.record_success(endpoint)
        return message

    async def _generate_on(self, endpoint: Endpoint, request: GenerateRequest,
                           chunks: list[bytes | memoryview]) -> bytes:
        """One generate's answer from ``endpoint``."""
        answer = await self._send_to(endpoint, request, chunks,
                                     lambda rpc, address: rpc.call(address, "generate", chunks))
        if isinstance(answer, bytes):
            return answer
        try:
            return await read_bounded(answer, self.limits.max_message_bytes, service=SERVICE)
        except httpx.HTTPError as exc:
            raise error_from_exception(SERVICE, exc, idempotent=False) from exc
        finally:
            await answer.aclose()

    async def open_stream(self, request: GenerateRequest) -> LMStream:
        """Start generating; returns once the worker accepted (over HTTP: status 200, before
        any token; over the call channel: with the first event)."""
        request.stream = True
        endpoint, source = await self._first_to_start(
            request.request_id, affinity_key(request),
            lambda endpoint: self._features_by_name(endpoint, request, lambda chunks: self._stream_on(
                endpoint, request, chunks)))
        return LMStream(self, endpoint, source)

    async def _features_by_name(self, endpoint: Endpoint, request: GenerateRequest,
                                send: Callable[[list[bytes | memoryview]], Awaitable[T]]) -> T:
        """``send`` the request's message for ``endpoint``: its features by name where the
        worker was sent them before, else (or when it no longer has them) whole."""
        if request.cache_salt is not None and not endpoint.honours_cache_salt:
            # A worker from before cache_salt would share the prompt's prefix across salts.
            raise ServiceUnavailable(f"the LM worker at {endpoint.url} does not honour cache_salt (an older "
                                     "version, or not probed yet); retry later", retryable=True)
        names = request.feature_refs or []
        how = "whole"
        if endpoint.holds_features(names):
            named = dataclasses.replace(request, images=[proto.ImageForInsert(item.insert_start_token)
                                                         for item in request.images])
            try:
                answer = await send(proto.encode_chunks(named))
                self.on_features("by_name")
                return answer
            except InvalidRequest as exc:
                if not (exc.upstream_field or "").startswith("feature_refs["):
                    raise
                endpoint.forget_features(names)  # evicted (or the worker restarted): whole, once more
                how = "resent"
        store = endpoint.feature_store_bytes
        whole = request if store else dataclasses.replace(request, feature_refs=None)
        answer = await send(proto.encode_chunks(whole))
        if request.images:
            self.on_features(how)
        if store and names:  # named next time: what the worker keeps (not an item larger than its store)
            endpoint.sent_features([name for name, item in zip(names, request.images, strict=True)
                                    if proto.feature_nbytes(item.image_features) <= store])
        return answer

    async def _stream_on(self, endpoint: Endpoint, request: GenerateRequest,
                         chunks: list[bytes | memoryview]) -> httpx.Response | RpcStream:
        try:
            source = await self._send_to(endpoint, request, chunks, lambda rpc, address: rpc.open_stream(
                address, "generate", chunks, gap_timeout_s=self.timeout_s))
        except InvalidRequest as exc:
            if exc.upstream_field != "stream":
                raise
            # A worker from before streamed calls refuses them (a rolling upgrade): over HTTP.
            source = await self._post(endpoint, b"".join(chunks), _headers(request))
        if isinstance(source, httpx.Response):
            content_type = source.headers.get("content-type", "")
            if not content_type.startswith("text/event-stream"):
                await source.aclose()
                raise UpstreamError(f"the LM worker answered a stream request with "
                                    f"{content_type or 'no content type'}")
        return source

    async def _send_to(self, endpoint: Endpoint, request: GenerateRequest, chunks: list[bytes | memoryview],
                       call: Callable[[RpcClient, tuple[str, int]], Awaitable[T]]) -> T | httpx.Response:
        """``call`` on ``endpoint``'s call channel if it has one; else, or when that cannot be
        reached (nothing was sent), a POST whose 200 response comes back unread."""
        address = endpoint.rpc_address if self.rpc is not None else None
        if self.rpc is not None and address is not None:
            try:
                return await call(self.rpc, address)
            except RpcUnavailable as exc:
                endpoint.rpc_failed(str(exc))
            except RpcError as exc:
                raise error_from_rpc(SERVICE, exc, idempotent=False) from exc
        return await self._post(endpoint, b"".join(chunks), _headers(request))

    def _failed(self, endpoint: Endpoint, error: GatewayError) -> None:
        if error.endpoint_fault:
            self.pool.record_failure(endpoint, error.message)
        if self.on_error is not None:
            self.on_error(SERVICE, error)

    async def _first_to_start(self, request_id: str, affinity: bytes | None,
                              attempt: Callable[[Endpoint], Awaitable[T]]) -> tuple[Endpoint, T]:
        """``attempt`` on one endpoint after another until one answers: a failure that
        provably did nothing (a refused connection, a busy worker) moves on, any other
        is raised, and with no endpoint left the last failure is. The endpoint that
        answered stays acquired; the caller releases it."""
        tried: list[Endpoint] = []
        last_error: GatewayError | None = None
        while True:
            try:
                endpoint = self.pool.acquire(exclude=tried, affinity=affinity)
            except ServiceUnavailable:
                if last_error is not None:
                    raise last_error from None
                raise
            tried.append(endpoint)
            try:
                return endpoint, await attempt(endpoint)
            except GatewayError as exc:
                self.pool.release(endpoint)
                self._failed(endpoint, exc)
                if not exc.retryable:
                    raise
                last_error = exc
                logger.warning("generate %s on %s failed before starting (%s); trying another endpoint",
                               request_id, endpoint.url, exc.message)
            except BaseException:
                self.pool.release(endpoint)  # cancelled: the caller's disconnect
                raise

    async def _post(self, endpoint: Endpoint, body: bytes, headers: dict[str, str]) -> httpx.Response:
        request = self.client.build_request("POST", f"{endpoint.url}/v1/generate", content=body, headers=headers,
                                            timeout=self.timeout)
        try:
            response = await self.client.send(request, stream=True)
            if response.status_code != 200:
                try:
                    error_body = await read_bounded(response, 64 * 1024, service=SERVICE)
                finally:
                    await response.aclose()
                raise error_from_status(SERVICE, response.status_code, error_body, idempotent=False)
        except httpx.HTTPError as exc:
            raise error_from_exception(SERVICE, exc, idempotent=False) from exc
        return response
