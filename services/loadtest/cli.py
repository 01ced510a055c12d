"""``step37-serve loadtest`` (or ``python -m services.loadtest``): load-test an
OpenAI-compatible chat endpoint (this gateway, vLLM, SGLang…) or ``/v1/captions``.

Examples::

    # closed-loop sweep, streamed, half the images repeated (exercises the feature cache)
    step37-serve loadtest --url http://127.0.0.1:8000 --concurrency 1,4,16 --requests 200 \\
        --stream --reuse 0.5 --out results/sweep

    # Poisson arrivals at 2 and 4 requests/s for 60 s each, native captions endpoint
    step37-serve loadtest --endpoint captions --rate 2,4 --duration 60 --images-per-request 2

Writes ``report.json`` (every request's record and the summaries), ``latency_cdf.png``
and ``load_curves.png`` to ``--out``, and prints the summary table. Exit status: 0 when
every load point had successful requests, 1 when one had none or the run was
interrupted (the partial report is still written), 2 for an impossible setting.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import random
import sys
from collections.abc import Callable
from pathlib import Path

import httpx

from services.common.settings import add_setting
from services.loadtest.client import discover_model
from services.loadtest.errors import ConfigError, ResponseError
from services.loadtest.images import IMAGE_FORMATS, DirectoryImages, GeneratedImages, ImageSource
from services.loadtest.report import build_report, format_table, write_json
from services.loadtest.runner import LoadPoint, LoadTester, RunSettings
from services.loadtest.workload import CAPTIONS_BODIES, ENDPOINTS, Workload, WorkloadConfig

__all__ = ["add_arguments", "main", "run"]

DEFAULT_PATHS = {"chat": "/v1/chat/completions", "captions": "/v1/captions"}


def _list_of(kind: Callable[[str], float]) -> Callable[[str], list]:
    def parse(text: str) -> list:
        try:
            values = [kind(part) for part in text.split(",") if part.strip()]
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from exc
        if not values:
            raise argparse.ArgumentTypeError("expected at least one value")
        return values
    return parse


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    target = parser.add_argument_group("target")
    target.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (default: %(default)s)")
    target.add_argument("--endpoint", choices=ENDPOINTS, default="chat",
                        help="chat: OpenAI /v1/chat/completions; captions: native /v1/captions")
    target.add_argument("--path", help="request path, if not the endpoint's usual one")
    target.add_argument("--model", help="model name for chat requests (default: the first of GET /v1/models)")
    add_setting(target, "--api-key", default=None, help="sent as 'Authorization: Bearer KEY'")

    load = parser.add_argument_group("load (one sweep; each value is a load point)")
    modes = load.add_mutually_exclusive_group()
    modes.add_argument("--concurrency", type=_list_of(int), help="closed loop: e.g. 1,4,16,64 (default: 1)")
    modes.add_argument("--rate", type=_list_of(float), help="open loop, Poisson arrivals, requests/s (inf: burst)")
    load.add_argument("--max-concurrency", type=int, help="rate mode: cap on requests in flight")
    amount = load.add_mutually_exclusive_group()
    amount.add_argument("--requests", type=int, help="measured requests per load point (default: 100)")
    amount.add_argument("--duration", type=float, help="seconds of measured load per load point")
    load.add_argument("--warmup", type=int, default=2,
                      help="uncounted requests before each point (default: %(default)s)")
    load.add_argument("--timeout-s", type=float, default=60.0,
                      help="per-request budget, whole response (default: %(default)s)")
    load.add_argument("--max-run-s", type=float, default=3600.0,
                      help="hard deadline per load point, warm-up included (default: %(default)s)")
    load.add_argument("--seed", type=int,
                      help="seed for images, reuse and arrivals (default: a new one each run, saved in the report: "
                           "a repeated seed repeats the images, and a server's cache remembers them)")

    work = parser.add_argument_group("workload")
    work.add_argument("--images-dir", help="send these image files as they are (default: generated images); "
                                           "note a server's cache remembers them from the previous run")
    work.add_argument("--image-kind", choices=GeneratedImages.KINDS, default="scenes",
                      help="generated images: demo scenes or random noise (default: %(default)s)")
    work.add_argument("--image-size", type=int, default=224, help="generated image side, pixels (default: %(default)s)")
    work.add_argument("--image-format", choices=tuple(IMAGE_FORMATS), default="png", help="(default: %(default)s)")
    work.add_argument("--images-per-request", type=int, default=1, help="(default: %(default)s)")
    work.add_argument("--reuse", type=float, default=0.0,
                      help="probability that an image repeats an earlier one, e.g. 0.5 (default: %(default)s)")
    work.add_argument("--reuse-window", type=int, default=256,
                      help="a repeat is drawn from the last N new images (default: %(default)s)")
    work.add_argument("--prompt", default="Describe the image.", help="(default: %(default)r)")
    work.add_argument("--max-tokens", type=int, default=48, help="(default: %(default)s)")
    work.add_argument("--temperature", type=float, default=0.0, help="(default: %(default)s)")
    work.add_argument("--stream", action="store_true", help="stream chat responses (measures time to first token)")
    work.add_argument("--extra-body", type=_json_object, default={},
                      help='JSON merged into chat requests, e.g. \'{"ignore_eos": true}\' for vLLM')
    work.add_argument("--captions-body", choices=CAPTIONS_BODIES, default="multipart",
                      help="how /v1/captions receives images (default: %(default)s)")
    work.add_argument("--prefetch", type=int, default=256, help="request bodies built ahead (default: %(default)s)")

    output = parser.add_argument_group("output")
    output.add_argument("--out", default="loadtest-results", help="report directory (default: %(default)s)")
    output.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    output.add_argument("--no-progress", action="store_true", help="no progress bar")


def _image_source(args: argparse.Namespace) -> ImageSource:
    if args.images_dir:
        return DirectoryImages(args.images_dir)
    return GeneratedImages(args.image_kind, args.image_size, args.image_format, args.seed)


def _points(args: argparse.Namespace) -> list[LoadPoint]:
    if args.rate:
        return [LoadPoint(rate_per_s=rate, max_concurrency=args.max_concurrency) for rate in args.rate]
    if args.max_concurrency is not None:
        raise ConfigError("max_concurrency", args.max_concurrency, "applies to --rate only")
    return [LoadPoint(concurrency=concurrency) for concurrency in args.concurrency or [1]]


async def _discover(base_url: str, api_key: str | None, transport: httpx.AsyncBaseTransport | None) -> str | None:
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(transport=transport, headers=headers, timeout=10.0) as client:
        try:
            return await discover_model(client, base_url)
        except (httpx.HTTPError, ResponseError) as exc:
            print(f"could not list models ({type(exc).__name__}: {exc}); sending chat requests without "
                  "a model field (pass --model if the server needs one)", file=sys.stderr)
            return None


def run(args: argparse.Namespace, *, transport: httpx.AsyncBaseTransport | None = None) -> int:
    """Run the sweep described by ``args``; ``transport`` lets tests serve it in-process."""
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(2**31)
    try:
        points = _points(args)
        settings = RunSettings(
            url=args.url.rstrip("/") + (args.path or DEFAULT_PATHS[args.endpoint]), endpoint=args.endpoint,
            requests=None if args.duration is not None else (100 if args.requests is None else args.requests),
            duration_s=args.duration,
            warmup_requests=args.warmup, timeout_s=args.timeout_s, max_run_s=args.max_run_s,
            api_key=args.api_key, seed=args.seed, prefetch=args.prefetch, progress=not args.no_progress)
        source = _image_source(args)
        config = WorkloadConfig(
            endpoint=args.endpoint, images_per_request=args.images_per_request, reuse=args.reuse,
            reuse_window=args.reuse_window, prompt=args.prompt, max_tokens=args.max_tokens,
            temperature=args.temperature, stream=args.stream, model=args.model, extra_body=args.extra_body,
            captions_body=args.captions_body, seed=args.seed)
    except ConfigError as exc:
        print(f"step37-serve loadtest: {exc}", file=sys.stderr)
        return 2

    if config.model is None and config.endpoint == "chat":
        config = dataclasses.replace(config, model=asyncio.run(_discover(args.url, args.api_key, transport)))
    model = config.model
    workload = Workload(config, source)
    tester = LoadTester(settings, workload, transport=transport)
    interrupted = False
    try:
        asyncio.run(tester.run(points))
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted: writing the report of what ran", file=sys.stderr)

    report = build_report(tester.results, settings, workload, model=model, interrupted=interrupted)
    out = Path(args.out)
    written = [write_json(report, out / "report.json")]
    if not args.no_plots:
        # plots imports matplotlib only when it draws, so a missing one shows up here.
        from services.loadtest.plots import write_plots

        try:
            written += write_plots(report, out)
        except ImportError as exc:
            print(f"no plots: {exc} (pip install matplotlib, or pass --no-plots)", file=sys.stderr)
    print(format_table(report))
    print("\nwrote " + ", ".join(str(path) for path in written))
    without_success = [point for point in report["points"] if point["summary"]["requests"]["ok"] == 0]
    return 1 if interrupted or without_success or not report["points"] else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.loadtest", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
