"""Fault injection with real processes: the gateway in front of an encoder and an LM
worker that are killed, restarted and slowed down, and clients that hang up.

Each test builds its own small system (the faults leave it changed) with short
timeouts and probe intervals, so a failure shows within seconds instead of minutes.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from services.common.procs import ServiceProcess
from services.common.server import find_free_port
from services.demo.scenes import generate_scene
from services.launcher import BUNDLED_MODEL

SEED = 8_800_000  # scenes no other test uses: nothing is in a feature cache by accident
MODEL = ["--model", str(BUNDLED_MODEL), "--device", "cpu", "--torch-threads", "1"]
LM_SLOTS = 4
FAST_FAILURE = ["--connect-timeout-s", "1", "--probe-interval-s", "0.3", "--eject-after-failures", "1"]


def png(index: int) -> bytes:
    buffer = io.BytesIO()
    generate_scene(SEED + index).image.save(buffer, format="PNG")
    return buffer.getvalue()


def caption(url: str, index: int, timeout: float = 60.0, **fields: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/captions", files={"file": ("scene.png", png(index), "image/png")},
                      data=fields, timeout=timeout)


def metric(url: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        head, _, value = line.rpartition(" ")
        if line.startswith("#") or head.split("{", 1)[0] != name:
            continue
        if all(f'{key}="{val}"' in head for key, val in labels.items()):
            total += float(value)
    return total


def wait_until(condition: Callable[[], bool], timeout_s: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout_s:g} s")
        time.sleep(0.1)


def recovers(url: str, index: int, timeout_s: float = 30.0) -> bool:
    """True once a fresh image is captioned again (the gateway re-admits by probing)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if caption(url, index).status_code == 200:
            return True
        time.sleep(0.3)
    return False


class DelayProxy:
    """A TCP proxy on loopback that holds each chunk of the upstream's answer for
    ``delay_s`` seconds before passing it on: a slow service, seen from the client."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = find_free_port("127.0.0.1")
        self.delay_s = 0.0
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> DelayProxy:
        self._thread.start()
        assert self._started.wait(10), "proxy did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _shutdown(self) -> None:
        self._server.close()
        current = asyncio.current_task()
        tasks = [task for task in asyncio.all_tasks() if task is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", self.port))
        self._started.set()
        self._loop.run_forever()
        self._loop.close()

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)

        async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delayed: bool) -> None:
            try:
                while chunk := await reader.read(1 << 16):
                    if delayed and self.delay_s:
                        await asyncio.sleep(self.delay_s)
                    writer.write(chunk)
                    await writer.drain()
            except ConnectionError:
                pass
            finally:
                writer.close()

        await asyncio.gather(pipe(client_reader, upstream_writer, False), pipe(upstream_reader, client_writer, True))


@pytest.fixture
def services(tmp_path) -> Iterator[Callable[..., ServiceProcess]]:
    """``start(name, command, port=0, wait=True)``; every process is stopped afterwards."""
    started: list[ServiceProcess] = []

    def start(name: str, command: list[str], port: int = 0, wait: bool = True) -> ServiceProcess:
        service = ServiceProcess(name, command, port=port, log_path=str(tmp_path / f"{name}.log"))
        started.append(service)
        service.start()
        return service.wait_ready(120) if wait else service

    yield start
    for service in reversed(started):
        service.stop()


def start_encoder(services, port: int = 0) -> ServiceProcess:
    return services("encoder", ["encoder", *MODEL], port=port)


def start_lm_worker(services, port: int = 0) -> ServiceProcess:
    return services("lm-worker", ["lm-worker", *MODEL, "--max-batch-size", str(LM_SLOTS)], port=port)


def start_gateway(services, encoder_url: str, lm_url: str, *extra: str) -> ServiceProcess:
    return services("gateway", ["gateway", "--encoder-url", encoder_url, "--lm-url", lm_url,
                                 *FAST_FAILURE, *extra])


def test_without_an_encoder_requests_fail_fast_and_the_system_recovers(services) -> None:
    encoder, lm = start_encoder(services), start_lm_worker(services)
    gateway = start_gateway(services, encoder.url, lm.url, "--encoder-timeout-s", "5")
    assert caption(gateway.url, 0).status_code == 200

    encoder.kill()
    started = time.monotonic()
    down = caption(gateway.url, 1)
    assert down.status_code == 503, down.text
    assert time.monotonic() - started < 5, "a request waited although no encoder was up"
    assert "encoder" in down.json()["error"]["message"]
    # Features already in the cache still serve: the LM worker is up.
    assert caption(gateway.url, 0).status_code == 200
    assert httpx.get(gateway.url + "/health", timeout=5).status_code == 200
    assert httpx.get(gateway.url + "/ready", timeout=5).status_code == 503

    start_encoder(services, port=encoder.port)  # back on the address the gateway knows
    assert recovers(gateway.url, 2), "the gateway did not re-admit the restarted encoder"
    assert httpx.get(gateway.url + "/ready", timeout=5).status_code == 200


def long_chat(index: int, *, stream: bool, max_tokens: int = 300) -> dict:
    image = "data:image/png;base64," + base64.b64encode(png(index)).decode()
    return {"model": "step37-tiny", "max_tokens": max_tokens, "ignore_eos": True, "stream": stream,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}}]}]}


def test_killing_the_lm_worker_mid_generation_answers_in_flight_requests_and_recovers(services) -> None:
    encoder, lm = start_encoder(services), start_lm_worker(services)
    gateway = start_gateway(services, encoder.url, lm.url)
    first = httpx.post(gateway.url + "/v1/chat/completions", json=long_chat(0, stream=False, max_tokens=20),
                       timeout=60)
    assert first.status_code == 200 and first.json()["usage"]["completion_tokens"] == 20, first.text

    def non_streaming(index: int) -> httpx.Response:
        return httpx.post(gateway.url + "/v1/chat/completions", json=long_chat(index, stream=False),
                          timeout=60)

    with ThreadPoolExecutor(2) as pool, httpx.stream(
            "POST", gateway.url + "/v1/chat/completions", json=long_chat(1, stream=True),
            timeout=60) as stream:
        assert stream.status_code == 200
        lines = stream.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))  # generation is under way
        pending = [pool.submit(non_streaming, 2 + i) for i in range(2)]
        wait_until(lambda: metric(lm.url, "lm_worker_running_sequences") >= 2, what="requests running")
        lm.kill()
        rest = list(lines)
        answers = [future.result(timeout=30) for future in pending]
    events = [json.loads(line[6:]) for line in rest if line.startswith("data: ") and line != "data: [DONE]"]
    assert "error" in events[-1], f"the stream ended without an error event: {rest[-3:]}"
    for answer in answers:
        assert answer.status_code in (502, 503), answer.text
        assert answer.json()["error"]["message"]
    assert httpx.get(gateway.url + "/health", timeout=5).status_code == 200

    start_lm_worker(services, port=lm.port)
    assert recovers(gateway.url, 10), "the gateway did not serve again after the LM worker came back"


def test_a_slow_encoder_times_out_and_excess_load_is_turned_away(services) -> None:
    encoder, lm = start_encoder(services), start_lm_worker(services)
    with DelayProxy(encoder.port) as proxy:
        # HTTP only: the proxy delays HTTP; the encoder's call channel would go around it
        # (the same timeout on that path: tests/unit/test_gateway_rpc.py).
        gateway = start_gateway(services, proxy.url, lm.url, "--internal-transport", "http",
                                "--encoder-timeout-s", "1", "--encoder-attempts", "1",
                                "--max-concurrent-requests", "2", "--eject-after-failures", "100")
        assert caption(gateway.url, 0).status_code == 200
        proxy.delay_s = 3.0

        started = time.monotonic()
        slow = caption(gateway.url, 1)
        assert slow.status_code == 504, slow.text
        assert time.monotonic() - started < 3, "the encoder timeout did not fire"

        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda i: caption(gateway.url, 10 + i), range(6)))
        statuses = sorted(answer.status_code for answer in answers)
        turned_away = [a for a in answers if a.status_code == 503]
        assert len(turned_away) >= 4, statuses  # at most two admitted at a time
        assert set(statuses) <= {503, 504}, statuses
        assert all("overloaded" in a.json()["error"]["message"] for a in turned_away)

        proxy.delay_s = 0.0
        assert recovers(gateway.url, 20), "the gateway did not serve again once the encoder was fast"


def test_a_client_leaving_a_stream_frees_its_lm_worker_slot(services) -> None:
    encoder, lm = start_encoder(services), start_lm_worker(services)
    gateway = start_gateway(services, encoder.url, lm.url)
    aborted = metric(lm.url, "lm_worker_requests_total", finish_reason="abort")
    with httpx.stream("POST", gateway.url + "/v1/chat/completions", json=long_chat(0, stream=True),
                      timeout=60) as stream:
        received = 0
        for line in stream.iter_lines():
            received += line.startswith("data: ")
            if received == 3:
                break  # leaving the block hangs up mid-stream
    wait_until(lambda: metric(lm.url, "lm_worker_requests_total", finish_reason="abort") == aborted + 1,
               what="the sequence aborted")
    wait_until(lambda: metric(lm.url, "lm_worker_kv_cache_free_slots") == LM_SLOTS, what="every slot free")
    assert metric(lm.url, "lm_worker_running_sequences") == 0
    assert caption(gateway.url, 1).status_code == 200
