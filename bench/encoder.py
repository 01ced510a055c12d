"""Encoder service throughput: dynamic batching on versus ``max_batch_size=1``, and MFU.

Two real ``step37-serve encoder`` processes with the same seeded weights: ``batched``
(``--max-batch-size 16``, a short queue delay) and ``unbatched`` (``--max-batch-size
1``). At each client concurrency (1, 4, 16 by default) both serve the same stream of
one-JPEG ``POST /v1/encode`` requests, interleaved round by round, and images/s is the
median over rounds. Model-FLOP utilisation is ``flops_per_image x images/s`` divided by
a dense matmul's FLOP/s measured in this run in the tower's compute dtype (fp32 on
CPU, bf16 on a GPU); the tower alone (in-process forward at batch 1 and 16) is
measured the same way, so the service's overhead is visible.

The load generator shares the machine with the servers (on a 2-core box it takes a
real share of the CPU), so compare variants within one run, not across machines. The
servers, the tower-alone forward and the matmul peak all use ``--torch-threads``
intra-op threads (default 1): on a shared 2-core box, two OpenMP threads contending
with preprocessing and other processes run several times slower than one.

    python bench/encoder.py [--preset step37-tiny --concurrency 1 4 16 --requests 64 --rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import statistics
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import proto
from bench.common import interleaved, sync, write_result
from encoder_server.model import (
    VisionConfig,
    flops_per_image,
    init_random,
    resolve_device,
    resolve_dtype,
)
from encoder_server.preprocess import preprocess_batch
from services.common.procs import ServiceProcess

BATCHED_MAX = 16


def jpeg(seed: int = 0, size: tuple[int, int] = (320, 240)) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def matmul_flops(device: torch.device, dtype: torch.dtype, repeats: int = 20) -> float:
    """Dense matmul FLOP/s in the tower's compute dtype, now: the ceiling for MFU."""
    size = 1024 if device.type == "cpu" else 8192
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    samples = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        a @ b
        sync()
        samples.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(samples)


async def load(client: httpx.AsyncClient, body: bytes, requests: int, concurrency: int) -> None:
    """``requests`` single-image encodes through ``concurrency`` concurrent workers."""
    remaining = requests

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            response = await client.post("/v1/encode", content=body, headers={"content-type": "image/jpeg"})
            if response.status_code != 200:
                raise RuntimeError(f"encode failed: {response.status_code} {response.text[:200]}")

    await asyncio.gather(*(worker() for _ in range(concurrency)))


def model_stats(url: str, name: str) -> tuple[int, int, int]:
    """(images, forwards, forward ns) served so far, from the Triton statistics endpoint."""
    stats = httpx.get(f"{url}/v2/models/{name}/stats").json()["model_stats"][0]
    forward_ns = sum(batch["compute_infer"]["ns"] for batch in stats["batch_stats"])
    return stats["inference_count"], stats["execution_count"], forward_ns


def check_same_features(urls: dict[str, str], body: bytes) -> float:
    """Correct first: both servers give the same fp32 features for one image."""
    features = []
    for url in urls.values():
        response = httpx.post(f"{url}/v1/encode?dtype=fp32", content=body,
                              headers={"content-type": "image/jpeg"}, timeout=60)
        response.raise_for_status()
        features.append(proto.decode(response.content, expect=proto.EncodeResponse).image.image_features)
    difference = (features[0] - features[1]).abs().max().item()
    assert difference < 1e-4, f"batched and unbatched servers disagree by {difference}"
    return difference


def tower_alone(config: VisionConfig, body: bytes, rounds: int, device: torch.device,
                dtype: torch.dtype) -> dict[str, dict[str, float]]:
    """The forward alone, in this process (servers stopped): the ceiling for the service."""
    model = init_random(config, seed=0, dtype=dtype, device=device)
    pixels = preprocess_batch([body], config.image_size).to(device)
    batches = {1: pixels, BATCHED_MAX: pixels.expand(BATCHED_MAX, -1, -1, -1).contiguous()}
    with torch.inference_mode():
        timings = interleaved({f"batch_{n}": (lambda p=p: model(p)) for n, p in batches.items()}, rounds)
    return {name: {**row, "images_per_s": int(name.split("_")[1]) / row["median_s"]}
            for name, row in timings.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="step37-tiny")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=64, help="requests per timed run")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-queue-delay-ms", type=float, default=2.0)
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="intra-op threads for the servers, the tower alone and the matmul peak")
    args = parser.parse_args()
    torch.set_num_threads(args.torch_threads)

    config = VisionConfig.preset(args.preset)
    body = jpeg()
    flops = flops_per_image(config)
    common = ["encoder", "--preset", args.preset, "--max-queue-delay-ms", str(args.max_queue_delay_ms),
              "--max-queue-size", "1024", "--torch-threads", str(args.torch_threads), "--log-level", "warning"]
    servers = {
        "batched": ServiceProcess("batched", [*common, "--max-batch-size", str(BATCHED_MAX)]),
        "unbatched": ServiceProcess("unbatched", [*common, "--max-batch-size", "1"]),
    }
    loop = asyncio.new_event_loop()
    try:
        for server in servers.values():
            server.start()
        for server in servers.values():
            server.wait_ready(120)
        urls = {name: server.url for name, server in servers.items()}
        max_difference = check_same_features(urls, body)
        limits = httpx.Limits(max_connections=max(args.concurrency) + 4)
        clients = {name: httpx.AsyncClient(base_url=url, timeout=120, limits=limits) for name, url in urls.items()}
        service: dict[str, dict[str, object]] = {}
        for concurrency in args.concurrency:
            before = {name: model_stats(url, args.preset) for name, url in urls.items()}
            timings = interleaved(
                {name: (lambda c=client, n=concurrency: loop.run_until_complete(load(c, body, args.requests, n)))
                 for name, client in clients.items()},
                rounds=args.rounds,
            )
            row: dict[str, object] = {}
            for name, timing in timings.items():
                images, forwards, forward_ns = (
                    a - b for a, b in zip(model_stats(urls[name], args.preset), before[name], strict=True))
                row[name] = {**timing, "images_per_s": args.requests / timing["median_s"],
                             "images_per_s_best_round": args.requests / timing["min_s"],
                             "mean_batch_size": images / max(forwards, 1),
                             "forward_ms_per_image": forward_ns / 1e6 / max(images, 1)}
            row["speedup_batched_vs_unbatched"] = row["batched"]["images_per_s"] / row["unbatched"]["images_per_s"]
            service[f"concurrency_{concurrency}"] = row
        for client in clients.values():
            loop.run_until_complete(client.aclose())
    finally:
        loop.close()
        for server in servers.values():
            server.stop()

    device = resolve_device(None)  # what the servers picked: the GPU when there is one
    dtype = resolve_dtype(None, device)
    peak = matmul_flops(device, dtype)
    alone = tower_alone(config, body, max(args.rounds, 5), device, dtype)
    for rows in (alone, *service.values()):
        for entry in rows.values():
            if isinstance(entry, dict):
                entry["mfu"] = flops * entry["images_per_s"] / peak
    payload = {
        "config": vars(args) | {"batched_max_batch_size": BATCHED_MAX, "image_size": config.image_size,
                                "tokens_per_image": config.tokens_per_image},
        "flops_per_image": flops,
        "device": str(device),
        "compute_dtype": str(dtype).removeprefix("torch."),
        "matmul_flops_per_s": peak,
        "max_abs_diff_batched_vs_unbatched": max_difference,
        "tower_in_process": alone,
        "service": service,
    }
    path = write_result("encoder", payload)
    print(f"dense {str(dtype).removeprefix('torch.')} matmul on {device}: {peak / 1e9:.1f} GFLOP/s; tower: {flops / 1e6:.1f} MFLOP/image")
    for name, entry in alone.items():
        print(f"tower alone {name:<9} {entry['images_per_s']:8.1f} img/s  MFU {entry['mfu']:.1%}")
    for key, row in service.items():
        for name in ("batched", "unbatched"):
            entry = row[name]
            print(f"{key:<15} {name:<9} {entry['images_per_s']:6.1f} img/s (best round "
                  f"{entry['images_per_s_best_round']:6.1f})  mean batch {entry['mean_batch_size']:4.1f}  "
                  f"forward {entry['forward_ms_per_image']:5.1f} ms/img  MFU {entry['mfu']:.1%}")
        print(f"{key:<15} speedup batched / unbatched {row['speedup_batched_vs_unbatched']:.2f}x")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
