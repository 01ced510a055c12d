"""``create_app(settings, transports=None)``: the gateway's FastAPI app, wired.

Everything an app needs is built here, once, from settings: the endpoint pools, one
``httpx.AsyncClient`` per downstream tier, the feature cache, the pipeline and its
services. ``transports`` swaps the clients' network layer (tests pass
``httpx.MockTransport`` fakes for the encoder and the LM worker; nothing else
changes). The lifespan runs the readiness probes and closes the clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx
from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import proto
from services.common.auth import INTERNAL_TOKEN_HEADER
from services.common.rpc import RpcClient
from services.common.transport import AiohttpTransport, LeanClient
from services.gateway.auth import ApiKeyAuth
from services.gateway.cache import FeatureCache
from services.gateway.encoder_client import EncoderClient, EncoderTransport, NativeEncoderTransport
from services.gateway.errors import ServiceUnavailable, error_response, install_error_handlers
from services.gateway.fetch import ImageFetcher
from services.gateway.lm_client import LMClient
from services.gateway.metrics import GatewayMetrics
from services.gateway.pool import EndpointPool
from services.gateway.protocol import CaptionRequest, ChatCompletionRequest
from services.gateway.router import router
from services.gateway.serving import Pipeline
from services.gateway.serving_captions import CaptionService
from services.gateway.serving_chat import ChatService
from services.gateway.settings import GatewaySettings

__all__ = ["GatewayState", "Transports", "create_app"]

logger = logging.getLogger(__name__)

# Routes that do model work: admission-limited, and labelled by path in metrics.
_WORK_ROUTES = frozenset({"/v1/chat/completions", "/v1/captions"})
_KNOWN_ROUTES = _WORK_ROUTES | {"/v1/models", "/health", "/ready", "/metrics"}


@dataclass
class Transports:
    """Optional network layers per downstream (``None``: real HTTP)."""

    encoder: httpx.AsyncBaseTransport | None = None
    lm: httpx.AsyncBaseTransport | None = None
    fetch: httpx.AsyncBaseTransport | None = None


@dataclass
class GatewayState:
    """The app's long-lived objects (``app.state.gateway``)."""

    settings: GatewaySettings
    metrics: GatewayMetrics
    auth: ApiKeyAuth
    cache: FeatureCache
    encoder_pool: EndpointPool
    lm_pool: EndpointPool
    clients: dict[str, httpx.AsyncClient]
    rpc: RpcClient | None
    pipeline: Pipeline
    chat: ChatService
    captions: CaptionService
    started: int = field(default_factory=lambda: int(time.time()))
    admitted: int = 0

    async def probe(self) -> bool:
        """Probe both tiers now; ready when an endpoint of each answered ready."""
        counts = await asyncio.gather(self.encoder_pool.probe_once(self.clients["encoder"]),
                                      self.lm_pool.probe_once(self.clients["lm"]))
        return all(count > 0 for count in counts)

    async def aclose(self) -> None:
        for client in self.clients.values():
            await client.aclose()
        if self.rpc is not None:
            await self.rpc.aclose()


def _client(transport: httpx.AsyncBaseTransport | None, settings: GatewaySettings, *,
            internal: bool) -> httpx.AsyncClient:
    # trust_env=False: an HTTP(S)_PROXY meant for the outside world must not capture
    # calls to loopback or cluster-internal services.
    limits = httpx.Limits(max_connections=settings.max_concurrent_requests * 2,
                          max_keepalive_connections=settings.max_concurrent_requests)
    # The internal token goes to our own services only, never to an image host.
    headers = {INTERNAL_TOKEN_HEADER: settings.internal_token} if internal and settings.internal_token else {}
    timeout = httpx.Timeout(settings.lm_timeout_s, connect=settings.connect_timeout_s)
    if internal:  # our own tiers: the cheaper per-call client and transport
        return LeanClient(transport=transport or AiohttpTransport(max_connections=limits.max_connections),
                          limits=limits, trust_env=False, headers=headers, timeout=timeout)
    return httpx.AsyncClient(transport=transport, limits=limits, trust_env=False, headers=headers, timeout=timeout)


def _encoder_transport(settings: GatewaySettings) -> EncoderTransport:
    if settings.encoder_protocol == "kserve":
        from services.gateway.encoder_kserve import KServeEncoderTransport

        return KServeEncoderTransport(settings.encoder_model, settings.kserve_insert_start_token)
    return NativeEncoderTransport(settings.feature_dtype)


def build_state(settings: GatewaySettings, transports: Transports | None = None) -> GatewayState:
    transports = transports or Transports()
    metrics = GatewayMetrics()
    encoder_transport = _encoder_transport(settings)
    # The call channel, where the tiers offer one: not for a KServe encoder, nor for
    # downstreams swapped for test fakes (they have no port to call).
    rpc = RpcClient(token=settings.internal_token, connect_timeout_s=settings.connect_timeout_s,
                    max_reply_bytes=proto.DEFAULT_LIMITS.max_message_bytes) \
        if settings.internal_transport == "auto" else None
    encoder_rpc = rpc is not None and transports.encoder is None and isinstance(encoder_transport,
                                                                                 NativeEncoderTransport)
    lm_rpc = rpc is not None and transports.lm is None
    encoder_pool = EndpointPool("encoder", settings.encoder_urls, ready_path=encoder_transport.ready_path,
                                eject_after_failures=settings.eject_after_failures,
                                probe_timeout_s=settings.connect_timeout_s, rpc=rpc if encoder_rpc else None)
    lm_pool = EndpointPool("lm", settings.lm_urls, eject_after_failures=settings.eject_after_failures,
                           probe_timeout_s=settings.connect_timeout_s, rpc=rpc if lm_rpc else None,
                           affinity_slack=settings.lm_affinity_slack)
    clients = {name: _client(getattr(transports, name), settings, internal=name != "fetch")
               for name in ("encoder", "lm", "fetch")}
    cache = FeatureCache(settings.cache_bytes)
    metrics.watch(cache, [encoder_pool, lm_pool])
    encoder = EncoderClient(encoder_pool, clients["encoder"], encoder_transport, attempts=settings.encoder_attempts,
                            timeout_s=settings.encoder_timeout_s, connect_timeout_s=settings.connect_timeout_s,
                            on_error=metrics.upstream_error, rpc=rpc if encoder_rpc else None)
    lm = LMClient(lm_pool, clients["lm"], timeout_s=settings.lm_timeout_s,
                  connect_timeout_s=settings.connect_timeout_s, on_error=metrics.upstream_error,
                  on_features=lambda how: metrics.lm_features.labels(how=how).inc(),
                  rpc=rpc if lm_rpc else None)
    fetcher = ImageFetcher(clients["fetch"], settings.allowed_url_hosts, max_bytes=settings.max_image_bytes,
                           timeout_s=settings.fetch_timeout_s)
    pipeline = Pipeline(settings, encoder=encoder, lm=lm, cache=cache, fetcher=fetcher, metrics=metrics)
    return GatewayState(settings=settings, metrics=metrics, auth=ApiKeyAuth(settings.api_key), cache=cache,
                        encoder_pool=encoder_pool, lm_pool=lm_pool, clients=clients, rpc=rpc, pipeline=pipeline,
                        chat=ChatService(pipeline), captions=CaptionService(pipeline))


class _AdmissionAndMetrics:
    """Counts every request (route, status, latency, in flight) and turns work beyond
    ``max_concurrent_requests`` away with 503 + Retry-After before it costs anything. A streamed
    response stays admitted until its last byte."""

    def __init__(self, app: ASGIApp, state: GatewayState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        route = path if path in _KNOWN_ROUTES else "/v1/models/{id}" if path.startswith("/v1/models/") else "other"
        metrics, state = self.state.metrics, self.state
        status = 500  # if the app dies before answering
        start = time.perf_counter()

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        admitted = path in _WORK_ROUTES
        metrics.in_flight.inc()
        try:
            if admitted and state.admitted >= state.settings.max_concurrent_requests:
                admitted = False
                error = ServiceUnavailable(f"the gateway is overloaded: it is serving {state.admitted} requests, "
                                           "its limit; retry later")
                metrics.error(error)
                await error_response(error)(scope, receive, send_and_record)
                return
            if admitted:
                state.admitted += 1
            await self.app(scope, receive, send_and_record)
        finally:
            if admitted:
                state.admitted -= 1
            metrics.in_flight.dec()
            metrics.requests.labels(route=route, status=str(status)).inc()
            metrics.request_seconds.labels(route=route).observe(time.perf_counter() - start)


def create_app(settings: GatewaySettings, transports: Transports | None = None) -> FastAPI:
    """The gateway app. ``transports`` replaces the downstream network layer (tests)."""
    state = build_state(settings, transports)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # One round before serving (each probe within its timeout): what the workers offer,
        # such as honouring cache_salt, is known from the first request on.
        await state.probe()
        probes = [asyncio.create_task(pool.run_probes(state.clients[name], settings.probe_interval_s))
                  for name, pool in (("encoder", state.encoder_pool), ("lm", state.lm_pool))]
        logger.info("gateway up: encoders %s (%s), LM workers %s, cache %d bytes, auth %s",
                    list(settings.encoder_urls), settings.encoder_protocol, list(settings.lm_urls),
                    settings.cache_bytes, "on" if state.auth.enabled else "off")
        try:
            yield
        finally:
            for task in probes:
                task.cancel()
            await asyncio.gather(*probes, return_exceptions=True)
            await state.aclose()

    app = FastAPI(title="step37-serve gateway", version="0.1.0", lifespan=lifespan)
    app.state.gateway = state
    install_error_handlers(app, on_error=state.metrics.error)
    app.include_router(router)
    app.add_middleware(_AdmissionAndMetrics, state=state)
    _document_request_bodies(app)
    return app


def _document_request_bodies(app: FastAPI) -> None:
    """Put the JSON bodies of chat completions and captions into ``/openapi.json``.

    The routes read bounded raw bodies (size first, then strict parsing), so FastAPI
    cannot see their models; the document gets them here, for clients, ``/docs`` and
    schema-driven fuzzers. Captions also take multipart files (``file`` parts).
    """
    generate = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is not None:
            return app.openapi_schema
        document = generate()
        schemas = document.setdefault("components", {}).setdefault("schemas", {})
        for path, model in (("/v1/chat/completions", ChatCompletionRequest), ("/v1/captions", CaptionRequest)):
            body = model.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(body.pop("$defs", {}))
            schemas[model.__name__] = body
            content = {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}
            if model is CaptionRequest:
                content["multipart/form-data"] = {"schema": {"type": "object", "properties": {
                    "file": {"type": "array", "items": {"type": "string", "format": "binary"}},
                    "prompt": {"type": "string"}, "max_tokens": {"type": "integer", "minimum": 1},
                    "temperature": {"type": "number", "minimum": 0, "maximum": 2}}}}
            document["paths"][path]["post"]["requestBody"] = {"required": True, "content": content}
        app.openapi_schema = document
        return document

    app.openapi = openapi
