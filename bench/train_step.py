"""Where a `train-demo` step's time goes: drawing scenes, the tower, the decoder, backward.

Builds the step37-tiny models and batches as `step37-serve train-demo` does (one eager
process, mean loss) and times each phase of a training step separately (median over steps, after warm-up).
The tower's forward rate is set against a dense fp32 matmul measured in the same run,
which tells whether a step is bound by arithmetic (a faster step needs fewer FLOPs)
or by overhead.

    python bench/train_step.py [--batch-size 48 --steps 12 --threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import write_result
from bench.encoder import matmul_flops
from encoder_server.model import VisionConfig, flops_per_image
from services.demo import train

PHASES = ("data", "vision_forward", "fusion_and_decoder_forward", "backward", "optimizer")


def time_steps(args: argparse.Namespace, out: Path) -> dict[str, float]:
    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    settings = parser.parse_args(["--out", str(out), "--batch-size", str(args.batch_size)])
    torch.manual_seed(0)
    vision, decoder, fusion, tokenizer, _ = train.build_models(settings, out)
    optimizer = train.make_optimizer(vision, decoder, fusion, settings)
    params = [*vision.parameters(), *decoder.parameters(), *fusion.parameters()]
    examples = train.Examples(tokenizer, vision.config.image_size, vision.config.tokens_per_image, 0)
    samples: dict[str, list[float]] = {phase: [] for phase in PHASES}
    for step in range(args.warmup + args.steps):
        marks = [time.perf_counter()]
        pixels, input_ids, labels = examples.batch(args.batch_size)
        marks.append(time.perf_counter())
        features = vision(pixels)  # [B, L, C]
        marks.append(time.perf_counter())
        loss = train.caption_loss(fusion, decoder, tokenizer.ids.im_start, features, input_ids, labels)
        marks.append(time.perf_counter())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        marks.append(time.perf_counter())
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        marks.append(time.perf_counter())
        if step >= args.warmup:
            for phase, start, end in zip(PHASES, marks[:-1], marks[1:], strict=True):
                samples[phase].append(end - start)
    medians = {phase: statistics.median(values) for phase, values in samples.items()}
    medians["step"] = statistics.median(map(sum, zip(*samples.values(), strict=True)))
    return medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=48)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    peak = matmul_flops(torch.device("cpu"), torch.float32)
    with tempfile.TemporaryDirectory() as tmp:
        medians = {key: round(value, 4) for key, value in time_steps(args, Path(tmp)).items()}
    tower_flops = flops_per_image(VisionConfig.preset("step37-tiny")) * args.batch_size
    payload = {
        "config": vars(args),
        "seconds_per_phase": medians,
        "data_share_of_step": medians["data"] / medians["step"],
        "matmul_flops_per_s": peak,
        "tower_forward_flops_per_batch": tower_flops,
        "tower_forward_share_of_matmul_rate": tower_flops / medians["vision_forward"] / peak,
    }
    path = write_result("train_step", payload)
    print("  ".join(f"{phase} {1e3 * medians[phase]:.0f} ms" for phase in (*PHASES, "step")))
    print(f"tower forward: {tower_flops / medians['vision_forward'] / 1e9:.1f} GFLOP/s against a dense fp32 "
          f"matmul's {peak / 1e9:.1f} ({100 * payload['tower_forward_share_of_matmul_rate']:.0f} %)\nwrote {path}")


if __name__ == "__main__":
    main()
