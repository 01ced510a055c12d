"""The cost of one HTTP round trip between the gateway and a service, with no work in it.

    python bench/http_floor.py

Starts the system on the bundled model and times ``GET /health`` on the encoder and
the LM worker from an ``httpx.AsyncClient`` (keep-alive, one request at a time), once
over httpx's own transport and once over the gateway's ``AiohttpTransport``, in the
same run. Every request the gateway serves makes two such calls, so twice this is the
part of ``transfer`` (bench/e2e.py) that no serialisation change removes: the floor of
the wire overhead on this machine with this HTTP stack.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import write_result
from services.common.transport import AiohttpTransport
from services.launcher import Stack, StackConfig

WARMUP, SAMPLES = 20, 300


TRANSPORTS = {"httpx": lambda: None, "aiohttp": lambda: AiohttpTransport(max_connections=4)}


async def round_trips(url: str, transport: httpx.AsyncBaseTransport | None) -> list[float]:
    async with httpx.AsyncClient(transport=transport) as client:
        for _ in range(WARMUP):
            (await client.get(url)).raise_for_status()
        times = []
        for _ in range(SAMPLES):
            start = time.perf_counter()
            (await client.get(url)).raise_for_status()
            times.append(1e3 * (time.perf_counter() - start))
    return times


def main() -> None:
    results: dict[str, dict[str, dict[str, float]]] = {name: {} for name in TRANSPORTS}
    with Stack(StackConfig(device="cpu")) as stack:
        for name, service in (("encoder", stack.encoders[0]), ("lm_worker", stack.lm_workers[0])):
            for transport, make in TRANSPORTS.items():
                times = sorted(asyncio.run(round_trips(service.url + "/health", make())))
                results[transport][name] = {"median_ms": statistics.median(times),
                                            "p90_ms": times[int(0.9 * len(times))], "samples": len(times)}
                print(f"{name:<10} {transport:<8} GET /health: median {results[transport][name]['median_ms']:.2f} ms, "
                      f"p90 {results[transport][name]['p90_ms']:.2f} ms")
    floors = {transport: by_service["encoder"]["median_ms"] + by_service["lm_worker"]["median_ms"]
              for transport, by_service in results.items()}
    summary = {"results": results, "two_calls_ms": floors,
               "aiohttp_over_httpx": floors["aiohttp"] / floors["httpx"]}
    print(f"two calls per request: {floors['httpx']:.2f} ms over httpx's transport, {floors['aiohttp']:.2f} ms "
          f"over aiohttp's\nwrote {write_result('http_floor', summary)}")


if __name__ == "__main__":
    main()
