"""The cost of one HTTP round trip between the gateway and a service, with no work in it.

    python bench/http_floor.py

Starts the system on the bundled model and times ``GET /health`` on the encoder and
the LM worker from an ``httpx.AsyncClient`` (the gateway's client, keep-alive, one
request at a time). Every request the gateway serves makes two such calls, so twice
this is the part of ``transfer`` (bench/e2e.py) that no serialisation change removes:
it is the floor of the wire overhead on this machine with this HTTP stack.
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
from services.launcher import Stack, StackConfig

WARMUP, SAMPLES = 20, 300


async def round_trips(url: str) -> list[float]:
    async with httpx.AsyncClient() as client:
        for _ in range(WARMUP):
            (await client.get(url)).raise_for_status()
        times = []
        for _ in range(SAMPLES):
            start = time.perf_counter()
            (await client.get(url)).raise_for_status()
            times.append(1e3 * (time.perf_counter() - start))
    return times


def main() -> None:
    results = {}
    with Stack(StackConfig(device="cpu")) as stack:
        for name, service in (("encoder", stack.encoders[0]), ("lm_worker", stack.lm_workers[0])):
            times = sorted(asyncio.run(round_trips(service.url + "/health")))
            results[name] = {"median_ms": statistics.median(times), "p90_ms": times[int(0.9 * len(times))],
                             "samples": len(times)}
            print(f"{name:<10} GET /health: median {results[name]['median_ms']:.2f} ms, "
                  f"p90 {results[name]['p90_ms']:.2f} ms")
    floor = results["encoder"]["median_ms"] + results["lm_worker"]["median_ms"]
    print(f"two calls per request: {floor:.2f} ms\nwrote "
          f"{write_result('http_floor', {'results': results, 'two_calls_ms': floor})}")


if __name__ == "__main__":
    main()
