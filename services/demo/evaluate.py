"""``step37-serve eval-demo``: caption accuracy of the bundled model through the public API.

Generates ``--scenes`` fresh scenes from a seed the trainer never draws from, captions
them through a running gateway's ``/v1/captions`` (or starts the system itself when no
``--url`` is given), scores exact match and per-attribute accuracy, and — with
``--compare-in-process`` — captions the same images with the monolithic pipeline to
count the captions the decoupled path changed (under greedy decoding: none).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import random
import time
from contextlib import nullcontext
from pathlib import Path

import httpx
import torch

from encoder_server.model import resolve_device
from services.demo.captions import score_captions
from services.demo.scenes import generate_scene
from services.launcher import BUNDLED_MODEL, Stack, StackConfig

EVAL_SEED = 1_000_003


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=None, help="a running gateway (default: start one on --model)")
    parser.add_argument("--model", default=str(BUNDLED_MODEL), help="checkpoint, when starting the system")
    parser.add_argument("--scenes", type=int, default=500)
    parser.add_argument("--seed", type=int, default=EVAL_SEED, help="held-out scene seed")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--compare-in-process", action="store_true",
                        help="also caption in-process and count captions that differ")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (both paths use it)")
    parser.add_argument("--out", default=None, help="write the scores as JSON here")


def _png(scene) -> bytes:
    buffer = io.BytesIO()
    scene.image.save(buffer, format="PNG")
    return buffer.getvalue()


async def _caption_all(url: str, images: list[bytes], concurrency: int) -> list[str]:
    gate = asyncio.Semaphore(concurrency)

    async def one(client: httpx.AsyncClient, data: bytes) -> str:
        async with gate:
            response = await client.post(f"{url}/v1/captions", files={"file": ("scene.png", data, "image/png")})
            response.raise_for_status()
            return response.json()["captions"][0]

    async with httpx.AsyncClient(timeout=300) as client:
        return list(await asyncio.gather(*(one(client, data) for data in images)))


def run(args: argparse.Namespace) -> int:
    rng = random.Random(args.seed)
    scenes = [generate_scene(rng.getrandbits(63)) for _ in range(args.scenes)]
    images = [_png(scene) for scene in scenes]
    system = nullcontext(None) if args.url else Stack(StackConfig(model=args.model, device=args.device))
    started = time.perf_counter()
    with system as stack:
        url = args.url or stack.url
        served = asyncio.run(_caption_all(url, images, args.concurrency))
    used = resolve_device(None if args.device == "auto" else args.device)
    report: dict = {"url": args.url or "started on " + args.model,
                    "device": None if args.url else str(used),  # a running system's device is its own
                    "cuda": torch.cuda.get_device_name(used) if used.type == "cuda" else None,
                    "scenes": args.scenes, "seed": args.seed,
                    "seconds": round(time.perf_counter() - started, 1),
                    "decoupled": score_captions(served, scenes)}
    if args.compare_in_process:
        from services.demo.pipeline import InProcessCaptioner

        local = InProcessCaptioner.from_pretrained(args.model, device=str(used)).caption(images)
        report["in_process"] = score_captions(local, scenes)
        report["captions_differing"] = sum(a != b for a, b in zip(served, local, strict=True))
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0
