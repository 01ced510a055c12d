"""``step37-serve demo``: the whole system on the bundled model, end to end, on this machine.

Starts encoder, LM worker and gateway as local processes (``services.launcher``),
renders a handful of held-out scenes to PNG files a person can open, captions them
through the public HTTP API (``/v1/captions``, then one OpenAI-style chat completion),
and prints each true caption beside the model's with the per-stage timings the
gateway reports. Asking again for an image already seen shows the feature cache.
"""

from __future__ import annotations

import argparse
import base64
import sys
import time
from pathlib import Path

import httpx

from services.demo.scenes import generate_scene
from services.launcher import BUNDLED_MODEL, Stack, StackConfig

DEMO_SEED = 20261125


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=str(BUNDLED_MODEL), help="checkpoint directory")
    parser.add_argument("--images", type=int, default=6, help="how many scenes to caption")
    parser.add_argument("--seed", type=int, default=DEMO_SEED, help="scene seed (training never saw it)")
    parser.add_argument("--out", default="demo-output", help="where the scene PNGs are written")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")


def _stage_summary(timings: dict[str, float]) -> str:
    """The gateway's own stages; the services' sub-stages (``encoder.*``, ``lm.*``) are left out."""
    stages = [f"{name} {value:.0f}" for name, value in timings.items() if "." not in name]
    return "ms: " + "  ".join(stages)


def run(args: argparse.Namespace) -> int:
    model = Path(args.model)
    if not (model / "config.json").exists():
        print(f"no checkpoint at {model}; train one with `step37-serve train-demo --out {model}`", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scenes = []
    for index in range(args.images):
        scene = generate_scene(args.seed + index)
        path = out / f"scene-{index}.png"
        scene.image.save(path)
        scenes.append((path, scene))
    (out / "captions.txt").write_text("".join(f"{p.name}\t{s.caption}\n" for p, s in scenes))

    print(f"starting encoder, LM worker and gateway on {model} ...", flush=True)
    started = time.perf_counter()
    with Stack(StackConfig(model=str(model), device=args.device)) as stack, httpx.Client(timeout=120) as client:
        print(f"ready in {time.perf_counter() - started:.1f} s: gateway at {stack.url}\n")
        correct = 0
        for path, scene in scenes:
            with path.open("rb") as image:
                response = client.post(f"{stack.url}/v1/captions", files={"file": (path.name, image, "image/png")})
            response.raise_for_status()
            body = response.json()
            caption = body["captions"][0]
            correct += caption == scene.caption
            print(f"{path}\n  true:  {scene.caption}\n  model: {caption}  {'✓' if caption == scene.caption else '✗'}"
                  f"\n  {_stage_summary(body.get('timings', {}))}")
        print(f"\n{correct}/{len(scenes)} captions exactly right (scenes and true captions in {out}/)\n")

        path, scene = scenes[0]
        data_url = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
        chat = client.post(f"{stack.url}/v1/chat/completions", json={
            "model": "step37-tiny",
            "messages": [{"role": "user", "content": [
                {"type": "text", "text": "describe the image"},
                {"type": "image_url", "image_url": {"url": data_url}},
            ]}],
            "max_tokens": 48,
        })
        chat.raise_for_status()
        answer = chat.json()
        print("POST /v1/chat/completions (the same first image, now served from the feature cache):")
        print(f"  {answer['choices'][0]['message']['content']}")
        print(f"  usage {answer.get('usage')}   server-timing: {chat.headers.get('server-timing', '')}")
    return 0
