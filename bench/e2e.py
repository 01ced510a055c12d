"""End to end: the decoupled system versus the monolithic in-process pipeline.

Same workload (held-out scenes as PNG, one image per request, greedy captions), same
model, same machine, in one run, rounds interleaved:

- ``decoupled``: encoder, LM worker and gateway as three processes (one torch thread
  each on this 2-core machine), driven over HTTP by the bundled load tester
  (``/v1/captions``, closed loop at each concurrency);
- ``monolithic``: vision tower → ImageInsertEmbedding → decoder in this process (two
  torch threads), the same closed loop: ``c`` clients means batches of ``c`` images;
- ``decoupled_reuse50``: the decoupled system where half the images repeat an earlier
  one, so the gateway's feature cache answers instead of the encoder, and the LM
  worker starts the prompt from its prefix cache;
- ``decoupled_http`` (lowest concurrency only): the same services behind a second
  gateway that calls them over HTTP (``--internal-transport http``) instead of their
  call channels, so the run also measures what the call channel saves on the wire.

Besides latency and throughput, each point records the CPU time per request: of each
service process (Linux ``/proc``) for the decoupled variants, of this process for the
monolithic one, where a machine's cores are what the two layouts share out.

    python bench/e2e.py [--concurrency 1,4,16 --requests 32 --rounds 2 --device auto --compile-steps off]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import RESULTS_DIR, write_result
from encoder_server.model import resolve_device
from services.common.procs import ServiceProcess
from services.demo.pipeline import InProcessCaptioner
from services.launcher import BUNDLED_MODEL, Stack, StackConfig
from services.loadtest.images import GeneratedImages
from services.loadtest.runner import LoadPoint, LoadTester, RunSettings
from services.loadtest.stats import distribution, summarize
from services.loadtest.workload import Workload, WorkloadConfig

# Stages the gateway reports; the wire's share is transfer (gateway ↔ services, both
# directions, msgpack included) plus the encoder's serialisation of the features.
WIRE_STAGES = ("transfer", "encoder.serialize")
LOG_DIR = RESULTS_DIR / "tmp" / "e2e-logs"


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process so far, from ``/proc`` (None where there is none)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def services_cpu(stack: Stack) -> dict[str, float | None]:
    return {child.name: cpu_seconds(child.process.pid) for child in stack.children if child.process is not None}


def prefix_cache_tokens(stack: Stack) -> dict[str, float]:
    """The LM workers' prefix-cache counters so far: prompt tokens looked up, and supplied."""
    totals = {"queried": 0.0, "hit": 0.0}
    for worker in stack.lm_workers:
        for line in httpx.get(f"{worker.url}/metrics", timeout=10).text.splitlines():
            for kind in totals:
                if line.startswith(f"lm_worker_prefix_cache_{kind}_tokens_total "):
                    totals[kind] += float(line.split()[-1])
    return totals


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def decoupled_point(url: str, concurrency: int, requests: int, seed: int, reuse: float) -> dict:
    settings = RunSettings(url=f"{url}/v1/captions", endpoint="captions", requests=requests,
                           warmup_requests=2, timeout_s=120, seed=seed, progress=False)
    workload = Workload(WorkloadConfig(endpoint="captions", reuse=reuse, seed=seed, max_tokens=48),
                        GeneratedImages("scenes", 224, "png", seed=seed))
    tester = LoadTester(settings, workload)
    client_cpu = time.thread_time()  # this thread runs the client; the bodies are built on another
    (result,) = asyncio.run(tester.run([LoadPoint(concurrency=concurrency)]))
    client_cpu = time.thread_time() - client_cpu
    summary = summarize(result.records, not_sent=result.not_sent)
    summary["client_cpu_ms_per_request"] = 1e3 * client_cpu / (requests + settings.warmup_requests)
    counts = summary["requests"]
    if counts["ok"] != requests:  # a point that lost requests measures the failure, not the system
        raise RuntimeError(f"c={concurrency}, reuse {reuse}: {counts} (see the services' logs in {LOG_DIR})")
    return summary


def http_gateway(stack: Stack) -> ServiceProcess:
    """A second gateway over the same encoder and LM worker, calling them over HTTP."""
    gateway = ServiceProcess("gateway-http", stack.gateway_command("--internal-transport", "http"),
                             log_path=str(LOG_DIR / "gateway-http.log"))
    return gateway.start().wait_ready()


def wire_ms(samples: list[dict]) -> tuple[dict[str, float], float]:
    """Median over rounds of each gateway stage's mean, and the wire's share of them."""
    per_stage: dict[str, list[float]] = {}
    for summary in samples:
        for stage, dist in (summary.get("server_timings_ms") or {}).items():
            per_stage.setdefault(stage, []).append(dist["mean"])
    means = {stage: statistics.median(values) for stage, values in per_stage.items()}
    return means, sum(means.get(stage, 0.0) for stage in WIRE_STAGES)


def monolithic_point(captioner: InProcessCaptioner, concurrency: int, requests: int, seed: int) -> dict:
    images = GeneratedImages("scenes", 224, "png", seed=seed)
    data = [images.image(i).data for i in range(requests + concurrency)]
    captioner.caption(data[:concurrency])  # warm-up, as the load tester's
    latencies = []
    cpu_before = own_cpu()
    started = time.perf_counter()
    for start in range(concurrency, concurrency + requests, concurrency):
        batch = data[start : start + concurrency]
        t0 = time.perf_counter()
        captioner.caption(batch)
        latencies += [1e3 * (time.perf_counter() - t0)] * len(batch)
    window = time.perf_counter() - started
    cpu_ms = 1e3 * (own_cpu() - cpu_before) / len(latencies)
    return {"requests": {"ok": len(latencies)}, "window_s": window, "cpu_ms_per_request": {"monolithic": cpu_ms},
            "throughput": {"requests_per_s": len(latencies) / window},
            "latency_ms": distribution(latencies)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(BUNDLED_MODEL))
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto, for the services and the pipeline")
    parser.add_argument("--compile-steps", default="off", choices=["on", "off"],
                        help="decode steps and prefills compiled by Inductor, in the LM worker and the pipeline alike")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]

    torch.set_num_threads(os.cpu_count() or 1)
    device = resolve_device(None if args.device == "auto" else args.device)
    compile_steps = args.compile_steps == "on"
    captioner = InProcessCaptioner.from_pretrained(args.model, device=str(device), compile_steps=compile_steps)
    captioner.decode_backend()  # built (and compiled) before any point is timed, as the worker's at start-up
    samples: dict[str, dict[int, list[dict]]] = {v: {c: [] for c in levels}
                                                 for v in ("decoupled", "monolithic", "decoupled_reuse50")}
    http_samples: list[dict] = []
    with Stack(StackConfig(model=args.model, device=str(device), log_dir=str(LOG_DIR),
                           lm_args=["--compile-steps", args.compile_steps])) as stack:
        over_http = http_gateway(stack)
        try:
            for round_index in range(args.rounds):
                for concurrency in levels:
                    run_point(stack, over_http, captioner, samples, http_samples, args, round_index, concurrency,
                              lowest=concurrency == levels[0])
        finally:
            over_http.stop()
    summarize_run(args, device, compile_steps, levels, samples, http_samples)


def run_point(stack: Stack, over_http: ServiceProcess, captioner: InProcessCaptioner,
              samples: dict[str, dict[int, list[dict]]], http_samples: list[dict], args: argparse.Namespace,
              round_index: int, concurrency: int, *, lowest: bool) -> None:
    """Every variant at one concurrency, in an order that alternates between rounds."""
    seed = 1000 * (round_index + 1) + concurrency  # fresh images: no cache hits across points
    order = ["decoupled", "monolithic", "decoupled_reuse50", *(["decoupled_http"] if lowest else [])]
    if round_index % 2:
        order.reverse()
    for variant in order:
        if variant == "monolithic":
            summary = monolithic_point(captioner, concurrency, args.requests, seed)
        else:
            reuse = 0.5 if variant == "decoupled_reuse50" else 0.0
            url = over_http.url if variant == "decoupled_http" else stack.url
            before, tokens_before = services_cpu(stack), prefix_cache_tokens(stack)
            # Each variant its own images: the LM worker's prefix cache is shared by both
            # gateways, and a scene another variant sent would start from its cached prompt.
            offset = {"decoupled": 0, "decoupled_reuse50": 500, "decoupled_http": 700}[variant]
            summary = decoupled_point(url, concurrency, args.requests, seed + offset, reuse)
            after, tokens_after = services_cpu(stack), prefix_cache_tokens(stack)
            # The services do nothing between points, so their CPU time over a point is its
            # requests' (warm-up's two included); the load tester's client is counted apart
            # (client_cpu_ms_per_request). (The HTTP variant's gateway is another process: not counted.)
            summary["cpu_ms_per_request"] = {
                name: 1e3 * (after[name] - before[name]) / (args.requests + 2)
                for name in before if before[name] is not None and after.get(name) is not None}
            # Prompt tokens per request (warm-up's included) the LM worker's prefix cache
            # looked up and supplied: a repeated image with the same prompt starts from its
            # cached prefix.
            summary["prefix_cache_tokens_per_request"] = {
                kind: (tokens_after[kind] - tokens_before[kind]) / (args.requests + 2) for kind in tokens_after}
        (http_samples if variant == "decoupled_http" else samples[variant][concurrency]).append(summary)
        print(f"round {round_index} c={concurrency:<3} {variant:<18} {summary['throughput']['requests_per_s']:.2f} "
              f"req/s  p50 {summary['latency_ms']['p50']:.0f} ms", flush=True)


def summarize_run(args: argparse.Namespace, device: torch.device, compile_steps: bool, levels: list[int],
                  samples: dict[str, dict[int, list[dict]]], http_samples: list[dict]) -> None:
    def median_of(summaries: list[dict], *path: str) -> float:
        values = []
        for summary in summaries:
            value = summary
            for key in path:
                value = value[key]
            values.append(value)
        return statistics.median(values)

    def latency_row(summaries: list[dict]) -> dict[str, float]:
        return {"requests_per_s": median_of(summaries, "throughput", "requests_per_s"),
                "p50_ms": median_of(summaries, "latency_ms", "p50"), "p99_ms": median_of(summaries, "latency_ms", "p99"),
                "mean_ms": median_of(summaries, "latency_ms", "mean")}

    table = {}
    for c in levels:
        row = {v: latency_row(samples[v][c]) for v in samples}
        row["decoupled_over_monolithic"] = {
            "throughput": row["decoupled"]["requests_per_s"] / row["monolithic"]["requests_per_s"],
            "p50": row["decoupled"]["p50_ms"] / row["monolithic"]["p50_ms"],
            "p99": row["decoupled"]["p99_ms"] / row["monolithic"]["p99_ms"],
        }
        row["reuse50_mean_latency_cut"] = 1 - row["decoupled_reuse50"]["mean_ms"] / row["decoupled"]["mean_ms"]
        row["cpu_ms_per_request"] = {
            variant: {name: statistics.median(s["cpu_ms_per_request"][name] for s in samples[variant][c])
                      for name in samples[variant][c][0].get("cpu_ms_per_request", {})}
            for variant in ("decoupled", "monolithic")}
        row["client_cpu_ms_per_request"] = statistics.median(s["client_cpu_ms_per_request"]
                                                             for s in samples["decoupled"][c])
        row["prefix_cache_tokens_per_request"] = {
            variant: {kind: statistics.median(s["prefix_cache_tokens_per_request"][kind] for s in samples[variant][c])
                      for kind in ("queried", "hit")}
            for variant in ("decoupled", "decoupled_reuse50")}
        table[c] = row

    stage_means, wire = wire_ms(samples["decoupled"][levels[0]])
    http_stage_means, http_wire = wire_ms(http_samples)
    latency_c1 = table[levels[0]]["decoupled"]["mean_ms"]
    http_row = latency_row(http_samples)
    payload = {
        "config": vars(args) | {"device": str(device)},
        "table": {str(c): row for c, row in table.items()},
        "stage_means_ms_at_lowest_concurrency": stage_means,
        "wire_overhead_ms_at_lowest_concurrency": wire,
        "wire_overhead_fraction_at_lowest_concurrency": wire / latency_c1,
        "over_http_at_lowest_concurrency": {
            **http_row, "stage_means_ms": http_stage_means, "wire_overhead_ms": http_wire,
            "wire_overhead_fraction": http_wire / http_row["mean_ms"], "samples": http_samples},
        "samples": {v: {str(c): s for c, s in per.items()} for v, per in samples.items()},
        "targets": {"wire_overhead_fraction_at_c1": "<= 0.05", "throughput_ratio_at_c16": ">= 0.9",
                    "reuse50_mean_latency_cut": ">= 0.30"},
    }
    path = write_result("e2e-compiled" if compile_steps else "e2e", payload, device)
    write_plot(table, path.with_suffix(".png"))
    print(f"\n{'c':>3} {'variant':<18} {'req/s':>7} {'p50 ms':>8} {'p99 ms':>8}")
    for c, row in table.items():
        for variant in samples:
            r = row[variant]
            print(f"{c:>3} {variant:<18} {r['requests_per_s']:>7.2f} {r['p50_ms']:>8.0f} {r['p99_ms']:>8.0f}")
        ratio = row["decoupled_over_monolithic"]
        print(f"    decoupled/monolithic: throughput {ratio['throughput']:.2f}x, p50 {ratio['p50']:.2f}x, "
              f"p99 {ratio['p99']:.2f}x; 50% reuse cuts mean latency by {100 * row['reuse50_mean_latency_cut']:.0f}%")
    print(f"wire + serialisation at c={levels[0]}: {wire:.1f} ms of {latency_c1:.0f} ms ({100 * wire / latency_c1:.1f}%); "
          f"over HTTP {http_wire:.1f} ms of {http_row['mean_ms']:.0f} ms\nwrote {path}")


def write_plot(table: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = list(table)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for variant, marker in (("decoupled", "o"), ("monolithic", "s"), ("decoupled_reuse50", "^")):
        left.plot(levels, [table[c][variant]["requests_per_s"] for c in levels], marker=marker, label=variant)
        right.plot(levels, [table[c][variant]["p99_ms"] for c in levels], marker=marker, label=variant)
    for axis, title in ((left, "throughput (requests/s)"), (right, "p99 latency (ms)")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("concurrency")
        axis.set_title(title)
        axis.grid(alpha=0.3)
    left.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
