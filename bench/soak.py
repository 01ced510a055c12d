"""A bounded soak of the whole system: mixed valid and invalid traffic, every request
accounted for, each process's memory sampled.

    python bench/soak.py                                  # 10 minutes, concurrency 8
    python bench/soak.py --duration-s 60 --concurrency 4  # a quick look

It starts the system (encoder, LM worker, gateway on loopback, the bundled model),
then ``--concurrency`` clients send requests until ``--duration-s`` has passed:
captions of generated scenes with ``--reuse`` of them repeating an earlier image (the
feature cache's traffic), OpenAI chat completions (some streamed), and a share of
malformed requests that must each get a 4xx. The resident memory (RSS) of every
service process is read from ``/proc`` every ``--sample-s`` seconds.

Targets: no request lost (every one answered: no transport error, no timeout), no
5xx for a valid request, every invalid one a 4xx, and each process's RSS after the
warm-up no more than 10 % above its value at the end of the warm-up. The gateway's
feature cache is set small (``--cache-bytes``, 8 MiB) so that it is full by then. The JSON (to
``bench/results/soak-<device>.json``) holds every request and every memory sample.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import write_result
from services.demo.scenes import generate_scene
from services.launcher import BUNDLED_MODEL, Stack, StackConfig

RSS_GROWTH_LIMIT = 0.10
SCENE_SEED = 9_100_000
REUSE_POOL = 2000  # repeats are drawn from the most recent images (the client's memory stays bounded)


@dataclass
class SoakConfig:
    duration_s: float = 600.0
    concurrency: int = 8
    reuse: float = 0.5
    invalid_share: float = 0.2
    stream_share: float = 0.25
    max_tokens: int = 24
    warmup_s: float | None = None  # None: a fifth of the duration
    sample_s: float = 2.0
    request_timeout_s: float = 120.0
    # Small enough that the feature cache fills during the warm-up: growth after it is
    # then a leak, not the cache doing its job (and eviction is exercised throughout).
    cache_bytes: int = 8 << 20
    seed: int = 0
    model: str = str(BUNDLED_MODEL)

    @property
    def warmup(self) -> float:
        return self.duration_s / 5 if self.warmup_s is None else self.warmup_s


@dataclass
class Record:
    start_s: float
    kind: str  # "caption", "chat", "chat-stream" or "invalid:<case>"
    status: int  # HTTP status; 0 when no answer came (lost)
    latency_ms: float
    error: str = ""

    @property
    def valid(self) -> bool:
        return not self.kind.startswith("invalid:")

    @property
    def server_failure(self) -> bool:
        """A valid request the system failed: a 5xx, or a stream that broke after its 200."""
        return self.valid and (self.status >= 500 or (self.status == 200 and bool(self.error)))

    def to_list(self) -> list[object]:
        return [round(self.start_s, 3), self.kind, self.status, round(self.latency_ms, 1), self.error]


def _png(seed: int) -> bytes:
    buffer = io.BytesIO()
    generate_scene(seed).image.save(buffer, format="PNG")
    return buffer.getvalue()


def _data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def _chat(image_url: str, *, stream: bool, max_tokens: int, **extra: object) -> dict[str, object]:
    return {"model": "step37-tiny", "max_tokens": max_tokens, "stream": stream, **extra,
            "messages": [{"role": "user", "content": [
                {"type": "text", "text": "describe the image"},
                {"type": "image_url", "image_url": {"url": image_url}}]}]}


# Malformed requests, each of which must be refused with a 4xx: (name, method, path, kwargs).
def _invalid_cases(image: bytes, max_tokens: int) -> list[tuple[str, str, dict[str, object]]]:
    return [
        ("not-an-image", "/v1/captions", {"files": {"file": ("x.png", b"definitely not a png", "image/png")}}),
        ("truncated-png", "/v1/captions", {"files": {"file": ("x.png", image[: len(image) // 3], "image/png")}}),
        ("bad-data-url", "/v1/chat/completions", {"json": _chat("data:image/png;base64,@@@", stream=False,
                                                                 max_tokens=max_tokens)}),
        ("remote-url", "/v1/chat/completions", {"json": _chat("http://169.254.169.254/latest", stream=False,
                                                               max_tokens=max_tokens)}),
        ("max-tokens-over-cap", "/v1/chat/completions", {"json": _chat(_data_url(image), stream=False,
                                                                        max_tokens=10**6)}),
        ("unknown-model", "/v1/chat/completions", {"json": {**_chat(_data_url(image), stream=False,
                                                                    max_tokens=max_tokens), "model": "nope"}}),
        ("not-json", "/v1/chat/completions", {"content": b"{not json", "headers": {"content-type": "application/json"}}),
        ("no-messages", "/v1/chat/completions", {"json": {"model": "step37-tiny", "messages": []}}),
    ]


@dataclass
class Traffic:
    """What each client sends next: seeded, shared by the clients."""

    config: SoakConfig
    rng: random.Random = field(init=False)
    sent: list[bytes] = field(default_factory=list)  # the last REUSE_POOL images sent
    next_scene: int = SCENE_SEED

    def __post_init__(self) -> None:
        self.rng = random.Random(self.config.seed)

    def image(self) -> bytes:
        if self.sent and self.rng.random() < self.config.reuse:
            return self.rng.choice(self.sent)
        data = _png(self.next_scene)
        self.next_scene += 1
        self.sent.append(data)
        del self.sent[:-REUSE_POOL]
        return data

    def next_request(self) -> tuple[str, str, dict[str, object]]:
        draw = self.rng.random()
        if draw < self.config.invalid_share:
            name, path, kwargs = self.rng.choice(_invalid_cases(self.image(), self.config.max_tokens))
            return f"invalid:{name}", path, kwargs
        image = self.image()
        draw = self.rng.random()
        if draw < self.config.stream_share:
            return "chat-stream", "/v1/chat/completions", {"json": _chat(_data_url(image), stream=True,
                                                                         max_tokens=self.config.max_tokens)}
        if draw < 0.6:  # the rest: plain chat completions and captions in about equal shares
            return "chat", "/v1/chat/completions", {"json": _chat(_data_url(image), stream=False,
                                                                  max_tokens=self.config.max_tokens)}
        return "caption", "/v1/captions", {"files": {"file": ("scene.png", image, "image/png")},
                                           "data": {"max_tokens": str(self.config.max_tokens)}}


async def _send(client: httpx.AsyncClient, url: str, kind: str, path: str, kwargs: dict[str, object]) -> Record:
    start = time.perf_counter()
    try:
        if kind == "chat-stream":
            async with client.stream("POST", url + path, **kwargs) as response:
                body = b"".join([chunk async for chunk in response.aiter_bytes()])
        else:
            response = await client.post(url + path, **kwargs)
            body = response.content
        status = response.status_code
        error = "" if status == 200 else body[:200].decode("utf-8", "replace")
        if kind == "chat-stream" and status == 200 and (b"data: [DONE]" not in body or b'"error"' in body):
            # A stream that fails after its 200 carries an error event instead of [DONE].
            error = "stream ended with an error event: " + body[-200:].decode("utf-8", "replace")
        return Record(start, kind, status, 1e3 * (time.perf_counter() - start), error)
    except httpx.HTTPError as exc:
        return Record(start, kind, 0, 1e3 * (time.perf_counter() - start), f"{type(exc).__name__}: {exc}")


def _rss_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/statm") as statm:
            return int(statm.read().split()[1]) * 4096
    except (OSError, ValueError, IndexError):
        return None


async def _sample_memory(pids: dict[str, int], every_s: float, stop: asyncio.Event, origin: float,
                         samples: dict[str, list[list[float]]]) -> None:
    while not stop.is_set():
        now = time.perf_counter() - origin
        for name, pid in pids.items():
            rss = _rss_bytes(pid)
            if rss is not None:
                samples[name].append([round(now, 2), rss])
        try:
            await asyncio.wait_for(stop.wait(), every_s)
        except asyncio.TimeoutError:
            pass


async def soak(url: str, pids: dict[str, int], config: SoakConfig) -> dict[str, object]:
    """Drive ``url`` for ``config.duration_s`` seconds; the report (records, memory, verdicts)."""
    traffic = Traffic(config)
    records: list[Record] = []
    memory: dict[str, list[list[float]]] = {name: [] for name in pids}
    stop = asyncio.Event()
    origin = time.perf_counter()
    deadline = origin + config.duration_s
    limits = httpx.Limits(max_connections=config.concurrency * 2)
    async with httpx.AsyncClient(timeout=config.request_timeout_s, limits=limits) as client:

        async def worker() -> None:
            while time.perf_counter() < deadline:
                kind, path, kwargs = traffic.next_request()
                record = await _send(client, url, kind, path, kwargs)
                record.start_s -= origin
                records.append(record)

        sampler = asyncio.create_task(_sample_memory(pids, config.sample_s, stop, origin, memory))
        await asyncio.gather(*(worker() for _ in range(config.concurrency)))
        stop.set()
        await sampler
        cache = await _cache_state(client, url)
    return {**summarize(records, memory, config), "gateway_cache": cache}


async def _cache_state(client: httpx.AsyncClient, url: str) -> dict[str, float]:
    """The feature cache's counters at the end (it should be full and evicting)."""
    text = (await client.get(url + "/metrics")).text
    state = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name.startswith("step37_gateway_cache_"):
            state[name.removeprefix("step37_gateway_").removesuffix("_total")] = float(value)
    return state


def _growth(series: list[list[float]], warmup_s: float) -> dict[str, float | None]:
    after = [rss for t, rss in series if t >= warmup_s]
    if not after:
        return {"at_warmup_mb": None, "max_after_mb": None, "final_mb": None, "growth": None}
    baseline = after[0]
    return {"at_warmup_mb": round(baseline / 2**20, 1), "max_after_mb": round(max(after) / 2**20, 1),
            "final_mb": round(after[-1] / 2**20, 1), "growth": round(max(after) / baseline - 1, 4)}


def summarize(records: list[Record], memory: dict[str, list[list[float]]], config: SoakConfig) -> dict[str, object]:
    valid = [r for r in records if r.valid]
    invalid = [r for r in records if not r.valid]
    lost = [r for r in records if r.status == 0]
    server_errors_valid = [r for r in valid if r.server_failure]
    invalid_not_4xx = [r for r in invalid if not 400 <= r.status < 500]
    kinds: dict[str, dict[str, int]] = {}
    for record in records:
        by_status = kinds.setdefault(record.kind, {})
        by_status[str(record.status)] = by_status.get(str(record.status), 0) + 1
    growth = {name: _growth(series, config.warmup) for name, series in memory.items()}
    worst = max((g["growth"] for g in growth.values() if g["growth"] is not None), default=None)
    ok_latency = [r.latency_ms for r in valid if r.status == 200]
    return {
        "config": dict(vars(config)),
        "requests": len(records),
        "valid": len(valid),
        "invalid": len(invalid),
        "lost": len(lost),
        "valid_5xx": len(server_errors_valid),
        "valid_not_200": sum(1 for r in valid if r.status != 200),
        "invalid_not_4xx": len(invalid_not_4xx),
        "requests_per_s": round(len(records) / config.duration_s, 2),
        "valid_latency_ms": ({"p50": round(statistics.median(ok_latency), 1),
                              "p99": round(sorted(ok_latency)[int(0.99 * (len(ok_latency) - 1))], 1)}
                             if ok_latency else None),
        "by_kind": kinds,
        "rss": growth,
        "worst_rss_growth": worst,
        "targets": {
            "no_lost_requests": not lost,
            "no_5xx_for_valid_requests": not server_errors_valid,
            "every_invalid_request_4xx": not invalid_not_4xx,
            "rss_growth_at_most_10_percent": worst is not None and worst <= RSS_GROWTH_LIMIT,
        },
        "memory": memory,
        "records_columns": ["start_s", "kind", "status", "latency_ms", "error"],
        "records": [r.to_list() for r in records],
    }


def run_with_stack(config: SoakConfig, log_dir: str | None = None) -> dict[str, object]:
    """Start the system, soak it, stop it."""
    stack_config = StackConfig(model=config.model, device="auto", log_dir=log_dir,
                               gateway_args=["--cache-bytes", str(config.cache_bytes)])
    with Stack(stack_config) as stack:
        pids = {service.name: service.process.pid for service in stack.children if service.process is not None}
        return asyncio.run(soak(stack.url, pids, config))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration-s", type=float, default=600.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--reuse", type=float, default=0.5, help="share of images that repeat an earlier one")
    parser.add_argument("--invalid-share", type=float, default=0.2, help="share of malformed requests")
    parser.add_argument("--warmup-s", type=float, default=None, help="memory baseline time (default: duration/5)")
    parser.add_argument("--sample-s", type=float, default=2.0, help="seconds between memory samples")
    parser.add_argument("--cache-bytes", type=int, default=8 << 20, help="the gateway's feature cache")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-write", action="store_true", help="print the summary only")
    args = parser.parse_args(argv)
    config = SoakConfig(duration_s=args.duration_s, concurrency=args.concurrency, reuse=args.reuse,
                        invalid_share=args.invalid_share, warmup_s=args.warmup_s, sample_s=args.sample_s,
                        cache_bytes=args.cache_bytes, seed=args.seed)
    report = run_with_stack(config)
    brief = {k: v for k, v in report.items() if k not in ("records", "memory")}
    print(json.dumps(brief, indent=2))
    if not args.no_write:
        print(f"wrote {write_result('soak', report)}")
    return 0 if all(report["targets"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
