"""Calling the encoder tier: one small transport interface, failover across endpoints.

``EncoderTransport`` is one attempt against one endpoint in one protocol:

* :class:`NativeEncoderTransport` — ``POST /v1/encode`` with a msgpack
  ``EncodeRequest``; the answer is an ``EncodeResponse`` (features in any dtype, bf16
  by default, plus the insert token and RoPE metadata). The same messages go over an
  endpoint's call channel (``services.common.rpc``) when it has one.
* ``KServeEncoderTransport`` (``encoder_kserve``) — KServe v2 ``infer``, so the tier
  can be a real Triton Inference Server.

:class:`EncoderClient` adds what every protocol needs: endpoint choice from the
pool, a timeout per attempt, and a retry on another endpoint after a connection error
or a 5xx — safe because an encode has no side effects.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import httpx

import proto
from proto import EncodeRequest, EncodeResponse, ImageForInsert
from services.common.rpc import RpcClient, RpcError, RpcUnavailable
from services.gateway.errors import GatewayError, ServiceUnavailable, UpstreamError, UpstreamTimeout
from services.gateway.pool import Endpoint, EndpointPool
from services.gateway.upstream import (
    error_from_exception,
    error_from_rpc,
    error_from_status,
    read_bounded,
)

__all__ = ["EncodeResult", "EncoderClient", "EncoderTransport", "NativeEncoderTransport"]

logger = logging.getLogger(__name__)

SERVICE = "encoder"


@dataclass
class EncodeResult:
    """Features for the images sent, in order, with the encoder's own stage timings (ms)."""

    image: ImageForInsert
    model: str = ""
    timings: dict[str, float] = field(default_factory=dict)


class EncoderTransport(Protocol):
    """One encode attempt against one endpoint; raises ``GatewayError`` (see ``upstream``)."""

    ready_path: str

    async def encode(self, client: httpx.AsyncClient, base_url: str, images: Sequence[bytes], *,
                     request_id: str, timeout: httpx.Timeout) -> EncodeResult: ...


class NativeEncoderTransport:
    """msgpack ``EncodeRequest`` → ``EncodeResponse`` over ``POST /v1/encode``."""

    ready_path = "/ready"

    def __init__(self, output_dtype: str = "bfloat16", limits: proto.WireLimits = proto.DEFAULT_LIMITS) -> None:
        self.output_dtype = output_dtype
        self.limits = limits

    async def encode(self, client: httpx.AsyncClient, base_url: str, images: Sequence[bytes], *,
                     request_id: str, timeout: httpx.Timeout) -> EncodeResult:
        body = proto.encode(EncodeRequest(images=list(images), output_dtype=self.output_dtype, request_id=request_id))
        request = client.build_request("POST", f"{base_url}/v1/encode", content=body, timeout=timeout,
                                       headers={"content-type": proto.CONTENT_TYPE, "x-request-id": request_id})
        try:
            response = await client.send(request, stream=True)
            try:
                if response.status_code != 200:
                    raise error_from_status(SERVICE, response.status_code,
                                            await read_bounded(response, 64 * 1024, service=SERVICE), idempotent=True)
                data = await read_bounded(response, self.limits.max_message_bytes, service=SERVICE)
            finally:
                await response.aclose()
        except httpx.HTTPError as exc:
            raise error_from_exception(SERVICE, exc, idempotent=True) from exc
        return self._result(data)

    async def encode_rpc(self, rpc: RpcClient, address: tuple[str, int], images: Sequence[bytes], *,
                         request_id: str) -> EncodeResult:
        """The same encode as one call; ``RpcUnavailable`` passes through (the caller falls back)."""
        request = EncodeRequest(images=list(images), output_dtype=self.output_dtype, request_id=request_id)
        try:
            data = await rpc.call(address, "encode", proto.encode_chunks(request))
        except RpcUnavailable:
            raise
        except RpcError as exc:
            raise error_from_rpc(SERVICE, exc, idempotent=True) from exc
        return self._result(data)

    def _result(self, data: bytes) -> EncodeResult:
        try:
            message = proto.decode(data, expect=EncodeResponse, limits=self.limits)
        except proto.ProtocolError as exc:
            raise UpstreamError(f"the encoder sent an invalid EncodeResponse ({exc})", retryable=True,
                                endpoint_fault=True) from exc
        return EncodeResult(image=message.image, model=message.model, timings=message.timings)


class EncoderClient:
    """Encodes a batch of images on the least busy ready endpoint, failing over on errors."""

    def __init__(self, pool: EndpointPool, client: httpx.AsyncClient, transport: EncoderTransport, *,
                 attempts: int = 2, timeout_s: float = 60.0, connect_timeout_s: float = 5.0,
                 on_error: Callable[[str, GatewayError], None] | None = None, rpc: RpcClient | None = None) -> None:
        self.pool = pool
        self.client = client
        self.transport = transport
        # Calls go over an endpoint's call channel when it has one and the transport speaks it.
        self.rpc = rpc if isinstance(transport, NativeEncoderTransport) else None
        self.attempts = attempts
        self.timeout_s = timeout_s
        self.timeout = httpx.Timeout(timeout_s, connect=connect_timeout_s)
        self.on_error = on_error

    async def encode(self, images: Sequence[bytes], *, request_id: str) -> EncodeResult:
        """Features for ``images``; a retryable failure is tried again on another endpoint,
        or, after a lost connection with no other endpoint left, on the same one (another
        connection: a server may close a kept-alive one just as it is reused)."""
        tried: list[Endpoint] = []
        last_error: GatewayError | None = None
        for attempt in range(1, self.attempts + 1):
            try:
                endpoint = self.pool.acquire(exclude=tried)
            except ServiceUnavailable:
                if last_error is None:
                    raise
                if not last_error.connection_lost:
                    raise last_error from None  # every endpoint was tried: report the real failure
                try:
                    endpoint = self.pool.acquire(exclude=tried[:-1])
                except ServiceUnavailable:
                    raise last_error from None
            tried.append(endpoint)
            try:
                result = await self._attempt(endpoint, images, request_id)
            except GatewayError as exc:
                if exc.endpoint_fault:
                    self.pool.record_failure(endpoint, exc.message)
                if self.on_error is not None:
                    self.on_error(SERVICE, exc)
                if not exc.retryable or attempt == self.attempts:
                    raise
                last_error = exc
                logger.warning("encode %s on %s failed (%s); trying again", request_id, endpoint.url, exc.message)
                continue
            finally:
                self.pool.release(endpoint)
            self.pool.record_success(endpoint)
            return result
        raise AssertionError("unreachable: the loop returns or raises")  # pragma: no cover

    async def _call(self, endpoint: Endpoint, images: Sequence[bytes], request_id: str) -> EncodeResult:
        address = endpoint.rpc_address if self.rpc is not None else None
        if address is not None:
            try:
                return await self.transport.encode_rpc(self.rpc, address, images,  # type: ignore[attr-defined]
                                                       request_id=request_id)
            except RpcUnavailable as exc:  # nothing was sent: the same endpoint over HTTP
                endpoint.rpc_failed(str(exc))
        return await self.transport.encode(self.client, endpoint.url, images, request_id=request_id,
                                           timeout=self.timeout)

    async def _attempt(self, endpoint: Endpoint, images: Sequence[bytes], request_id: str) -> EncodeResult:
        # httpx bounds each read and write; this bounds the whole call, so an endpoint
        # that dribbles its answer out cannot hold a request past the timeout either.
        try:
            return await asyncio.wait_for(self._call(endpoint, images, request_id), self.timeout_s)
        except asyncio.TimeoutError:
            raise UpstreamTimeout(f"the encoder did not answer within {self.timeout_s:g} s",
                                  endpoint_fault=True) from None
