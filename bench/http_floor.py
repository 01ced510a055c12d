"""The cost of one HTTP round trip between the gateway and a service, with no work in it.

    python bench/http_floor.py

Starts the system on the bundled model and times ``GET /health`` on the encoder and
the LM worker (keep-alive, one request at a time) from three clients in the same run:
``httpx.AsyncClient`` over httpx's own transport, the same client over the gateway's
``AiohttpTransport``, and the gateway's ``LeanClient`` over that transport. Besides
the round trip it records the client's own CPU time per call (its thread's). Every
request the gateway serves makes two such calls, so over HTTP (``--internal-transport
http``) twice this is the part of ``transfer`` (bench/e2e.py) that no serialisation
change removes. By default the gateway calls its tiers over their call channel
(``services/common/rpc/``), which skips these HTTP stacks.
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
from services.common.transport import AiohttpTransport, LeanClient
from services.launcher import Stack, StackConfig

WARMUP, SAMPLES = 20, 300


CLIENTS = {
    "httpx": lambda: httpx.AsyncClient(),
    "aiohttp": lambda: httpx.AsyncClient(transport=AiohttpTransport(max_connections=4)),
    "lean": lambda: LeanClient(transport=AiohttpTransport(max_connections=4)),
}


async def round_trips(url: str, client: httpx.AsyncClient) -> tuple[list[float], float]:
    """Round-trip times (ms) and the client thread's CPU ms per call."""
    async with client:
        for _ in range(WARMUP):
            (await client.get(url)).raise_for_status()
        times = []
        cpu_started = time.thread_time()
        for _ in range(SAMPLES):
            start = time.perf_counter()
            (await client.get(url)).raise_for_status()
            times.append(1e3 * (time.perf_counter() - start))
        cpu_ms = 1e3 * (time.thread_time() - cpu_started) / SAMPLES
    return times, cpu_ms


def main() -> None:
    results: dict[str, dict[str, dict[str, float]]] = {name: {} for name in CLIENTS}
    with Stack(StackConfig(device="cpu")) as stack:
        for name, service in (("encoder", stack.encoders[0]), ("lm_worker", stack.lm_workers[0])):
            for client, make in CLIENTS.items():
                times, cpu_ms = asyncio.run(round_trips(service.url + "/health", make()))
                times.sort()
                results[client][name] = row = {"median_ms": statistics.median(times),
                                               "p90_ms": times[int(0.9 * len(times))],
                                               "client_cpu_ms_per_call": cpu_ms, "samples": len(times)}
                print(f"{name:<10} {client:<8} GET /health: median {row['median_ms']:.2f} ms, "
                      f"p90 {row['p90_ms']:.2f} ms, client CPU {cpu_ms:.2f} ms per call")
    floors = {client: by_service["encoder"]["median_ms"] + by_service["lm_worker"]["median_ms"]
              for client, by_service in results.items()}
    client_cpu = {client: by_service["encoder"]["client_cpu_ms_per_call"]
                  + by_service["lm_worker"]["client_cpu_ms_per_call"] for client, by_service in results.items()}
    summary = {"results": results, "two_calls_ms": floors, "two_calls_client_cpu_ms": client_cpu,
               "aiohttp_over_httpx": floors["aiohttp"] / floors["httpx"],
               "lean_over_aiohttp_client_cpu": client_cpu["lean"] / client_cpu["aiohttp"]}
    print("two calls per request: " + ", ".join(
        f"{client} {floors[client]:.2f} ms ({client_cpu[client]:.2f} ms of client CPU)" for client in CLIENTS)
        + f"\nwrote {write_result('http_floor', summary)}")


if __name__ == "__main__":
    main()
