"""Endpoint pools: least-outstanding choice, ejection after failures, re-admission by probe."""

from __future__ import annotations

import asyncio
import socket
from collections import Counter

import httpx
import pytest
from gateway_fakes import FakeEncoder, chat_body, harness, png

from services.common.rpc import RpcClient, RpcListen, RpcServer
from services.gateway.errors import ServiceUnavailable
from services.gateway.pool import EndpointPool


def run(coro):
    return asyncio.run(coro)


def test_least_outstanding_wins_and_ties_rotate():
    pool = EndpointPool("encoder", ["http://a", "http://b", "http://c"])
    a, b, c = pool.endpoints
    a.outstanding, b.outstanding, c.outstanding = 2, 0, 1
    assert pool.choose() is b
    assert pool.choose(exclude=[b]) is c
    b.outstanding = 1
    picks = Counter(pool.choose().url for _ in range(10))
    assert picks == {"http://b": 5, "http://c": 5}


def test_acquire_counts_outstanding_until_release():
    pool = EndpointPool("lm", ["http://a", "http://b"])
    first = pool.acquire()
    second = pool.acquire()
    assert first is not second and first.outstanding == second.outstanding == 1
    pool.release(first)
    assert pool.acquire() is first


def test_an_affinity_key_keeps_its_endpoint_within_the_slack_and_keys_spread():
    pool = EndpointPool("lm", ["http://a", "http://b", "http://c"], affinity_slack=2)
    keys = [bytes([i]) * 8 for i in range(60)]
    homes = {key: pool.choose(affinity=key) for key in keys}
    assert all(pool.choose(affinity=key) is homes[key] for key in keys)  # stable, whatever the rotation
    assert set(Counter(e.url for e in homes.values())) == {"http://a", "http://b", "http://c"}
    key = keys[0]
    home = homes[key]
    others = [e for e in pool.endpoints if e is not home]
    home.outstanding = 2  # within the slack of the idle others
    assert pool.choose(affinity=key) is home
    home.outstanding = 3  # beyond it: the least busy takes the request
    assert pool.choose(affinity=key) in others
    home.outstanding = 0
    # Without its home (ejected, or tried already) a key has a stable second choice.
    second = pool.choose(exclude=[home], affinity=key)
    assert all(pool.choose(exclude=[home], affinity=key) is second for _ in range(5))
    home.ready = False
    assert pool.choose(affinity=key) is second


def test_affinity_is_ignored_when_off():
    pool = EndpointPool("lm", ["http://a", "http://b"])  # affinity_slack -1, the pool default
    picks = Counter(pool.choose(affinity=b"same image").url for _ in range(10))
    assert picks == {"http://a": 5, "http://b": 5}


def test_ejected_after_consecutive_failures_and_readmitted_by_a_probe():
    async def scenario():
        ready = {"http://a": True, "http://b": False}

        def handler(request: httpx.Request) -> httpx.Response:
            host = f"http://{request.url.host}"
            assert request.url.path == "/ready"
            return httpx.Response(200 if ready[host] else 503)

        client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
        pool = EndpointPool("encoder", ["http://a", "http://b"], eject_after_failures=2)
        a, b = pool.endpoints
        pool.record_failure(a, "boom")
        pool.record_success(a)  # a success resets the streak
        pool.record_failure(a, "boom")
        assert a.ready
        pool.record_failure(a, "boom")
        assert not a.ready and pool.choose() is b
        assert await pool.probe_once(client) == 1  # a answers ready: back in; b fails its first probe
        assert a.ready and a.consecutive_failures == 0 and b.ready
        assert await pool.probe_once(client) == 1
        assert not b.ready  # two probe failures in a row
        ready["http://a"] = False
        for _ in range(2):
            await pool.probe_once(client)
        with pytest.raises(ServiceUnavailable, match="no ready encoder endpoint"):
            pool.choose()
        ready["http://b"] = True
        await pool.probe_once(client)
        assert pool.choose() is b

    run(scenario())


def test_probe_treats_connection_errors_as_failures():
    async def scenario():
        def handler(request: httpx.Request) -> httpx.Response:
            raise httpx.ConnectError("refused", request=request)

        client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
        pool = EndpointPool("lm", ["http://a"], eject_after_failures=1)
        assert await pool.probe_once(client) == 0 and not pool.endpoints[0].ready

    run(scenario())


def test_a_dead_encoder_is_ejected_and_traffic_moves_to_the_live_one():
    async def scenario():
        encoder = FakeEncoder(behaviours={"http://encoder-a": httpx.ConnectError})
        h = harness(encoder, eject_after_failures=2, cache_bytes=0)
        for i in range(6):
            response = await h.client.post("/v1/chat/completions", json=chat_body(png(colour=(i, 0, 0))))
            assert response.status_code == 200, response.text
        hosts = [host for host, _ in encoder.calls]
        assert hosts.count("http://encoder-a") == 2  # tried until ejected, then skipped
        assert not h.state.encoder_pool.endpoints[0].ready
        # it comes back: the probe (here via /ready) sees it ready and re-admits it
        encoder.behaviours.clear()
        assert (await h.client.get("/ready")).status_code == 200
        assert h.state.encoder_pool.endpoints[0].ready
        metrics = (await h.client.get("/metrics")).text
        assert 'step37_gateway_endpoint_ready{service="encoder",url="http://encoder-a"} 1.0' in metrics

    run(scenario())


def test_concurrent_encodes_spread_over_replicas():
    async def scenario():
        encoder = FakeEncoder(delay_s=0.1)
        h = harness(encoder, cache_bytes=0)
        files = [{"file": (f"{i}.png", png(colour=(i, 1, 2)), "image/png")} for i in range(4)]
        responses = await asyncio.gather(*(h.client.post("/v1/captions", files=f) for f in files))
        assert all(r.status_code == 200 for r in responses)
        assert Counter(host for host, _ in encoder.calls) == {"http://encoder-a": 2, "http://encoder-b": 2}

    run(scenario())



def test_an_image_seen_before_goes_back_to_its_lm_worker():
    async def workers_per_image(slack: int) -> dict[int, set[str]]:
        # No feature cache: routing is the LM pool's alone. Five images, so plain rotation
        # over two idle workers would send each image to the other worker the next round.
        h = harness(cache_bytes=0, lm_urls=("http://lm-a", "http://lm-b"), lm_affinity_slack=slack)
        images = [png(colour=(40 * i, 7, 99)) for i in range(5)]
        served: dict[int, set[str]] = {}
        for _ in range(3):
            for index, image in enumerate(images):
                before = {e.url: e.requests for e in h.state.lm_pool.endpoints}
                response = await h.client.post("/v1/chat/completions", json=chat_body(image))
                assert response.status_code == 200, response.text
                (worker,) = [e.url for e in h.state.lm_pool.endpoints if e.requests > before[e.url]]
                served.setdefault(index, set()).add(worker)
        return served

    async def scenario():
        with_affinity = await workers_per_image(4)
        assert all(len(workers) == 1 for workers in with_affinity.values())
        assert len(set.union(*with_affinity.values())) == 2  # different images spread over both workers
        without = await workers_per_image(-1)
        assert any(len(workers) == 2 for workers in without.values())

    run(scenario())


def test_probes_connect_to_the_reported_call_channel_before_using_it():
    async def scenario():
        async def echo(payload: bytes) -> list[bytes]:
            return [payload]

        server = RpcServer({"encode": echo}, max_frame_bytes=1024)
        live = await server.start(RpcListen())
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            dead = probe.getsockname()[1]
        bodies = {"127.0.0.1": {"status": "ready", "rpc_port": live}, "localhost": {"status": "ready", "rpc_port": dead},
                  "other": {"status": "ready", "rpc_port": "7002"}}

        def handler(request: httpx.Request) -> httpx.Response:
            return httpx.Response(200, json=bodies[request.url.host])

        client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
        rpc = RpcClient(connect_timeout_s=2)
        pool = EndpointPool("encoder", ["http://127.0.0.1:8001", "http://localhost", "http://other"], rpc=rpc)
        a, b, c = pool.endpoints
        try:
            assert await pool.probe_once(client) == 3  # the channel decides nothing about readiness
            assert a.rpc_address == ("127.0.0.1", live)
            assert b.rpc_address is None and c.rpc_address is None  # nothing listens there; not an int
            a.rpc_failed("connection refused")  # as a call would find it
            await pool.probe_once(client)
            assert a.rpc_address is None  # the port that failed: HTTP for a while
            restarted = RpcServer({"encode": echo}, max_frame_bytes=1024)
            bodies["127.0.0.1"]["rpc_port"] = await restarted.start(RpcListen())
            await pool.probe_once(client)  # another port (the endpoint restarted): used at once
            assert a.rpc_address == ("127.0.0.1", bodies["127.0.0.1"]["rpc_port"])
            await restarted.stop()
            without = EndpointPool("encoder", ["http://127.0.0.1"])  # no rpc client: the port is not learnt
            await without.probe_once(client)
            assert without.endpoints[0].rpc_address is None
        finally:
            await rpc.aclose()
            await server.stop()

    run(scenario())
