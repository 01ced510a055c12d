"""What the load tester itself costs: its CPU time per request, against the bundled system.

On a small machine the load tester shares the cores with the services it measures, so
its own cost per request is part of every figure it reports there. This starts the
system on the bundled model, writes held-out scenes as PNG files (so drawing images is
not part of the run), and sends them to ``/v1/captions`` at a fixed concurrency in
count mode, measuring this process's user + system CPU time over each load point.

    python bench/loadtest_cost.py [--concurrency 16 --requests 240 --rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import RESULTS_DIR, write_result
from services.launcher import Stack, StackConfig
from services.loadtest.images import DirectoryImages, GeneratedImages
from services.loadtest.runner import LoadPoint, LoadTester, RunSettings
from services.loadtest.workload import Workload, WorkloadConfig


def own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def one_point(url: str, directory: Path, concurrency: int, requests: int, seed: int) -> dict[str, float]:
    settings = RunSettings(url=f"{url}/v1/captions", endpoint="captions", requests=requests, warmup_requests=2,
                           timeout_s=120, seed=seed, progress=False)
    workload = Workload(WorkloadConfig(endpoint="captions", seed=seed, max_tokens=48), DirectoryImages(directory))
    cpu, started = own_cpu_s(), time.perf_counter()
    (result,) = asyncio.run(LoadTester(settings, workload).run([LoadPoint(concurrency=concurrency)]))
    cpu, wall = own_cpu_s() - cpu, time.perf_counter() - started
    failed = sum(not record.ok for record in result.records)
    if failed:
        raise RuntimeError(f"{failed} requests failed")
    return {"cpu_ms_per_request": 1e3 * cpu / (requests + 2), "requests_per_s": requests / wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=240)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    points = []
    with tempfile.TemporaryDirectory() as tmp:
        images = GeneratedImages("scenes", 224, "png", seed=77)
        # Every round sends new images (the gateway's feature cache would answer repeats).
        count = (args.requests + 2) * (args.rounds + 1)
        for index in range(count):
            (Path(tmp) / f"{index:05d}.png").write_bytes(images.image(index).data)
        with Stack(StackConfig(device="cpu", log_dir=str(RESULTS_DIR / "tmp" / "loadtest-cost-logs"))) as stack:
            for round_index in range(args.rounds + 1):  # the first warms the services up
                part = Path(tmp) / f"round-{round_index}"
                part.mkdir()
                for index in range((args.requests + 2) * round_index, (args.requests + 2) * (round_index + 1)):
                    (Path(tmp) / f"{index:05d}.png").rename(part / f"{index:05d}.png")
                point = one_point(stack.url, part, args.concurrency, args.requests, seed=round_index)
                print(f"round {round_index}: {point['cpu_ms_per_request']:.2f} ms of load-tester CPU per request, "
                      f"{point['requests_per_s']:.1f} req/s", flush=True)
                if round_index:
                    points.append(point)
    summary = {key: statistics.median(point[key] for point in points) for key in points[0]}
    path = write_result("loadtest_cost", {"config": vars(args), "rounds": points, "median": summary}, device="cpu")
    print(f"median: {summary['cpu_ms_per_request']:.2f} ms per request\nwrote {path}")


if __name__ == "__main__":
    main()
