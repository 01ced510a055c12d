"""One decode step of the LM worker's backend: milliseconds and operator calls per step.

A decode step of a small decoder is hundreds of tiny kernels, so its time is their
count times the per-call cost (Python, dispatcher, kernel launch), not arithmetic.
This times ``LocalDecoderBackend.decode`` on the bundled model at several batch sizes
(every row a running sequence with a 40-position prompt) and counts the aten operators
one step calls (``torch.profiler``: a figure that does not move with machine noise).
It runs twice in the same process: eager steps, and on a GPU steps replayed from CUDA
graphs (the LM worker's default there), on the CPU steps compiled by Inductor (the LM
worker's ``--compile-steps on``; the compile itself is timed too). Each batch's prefill
(one call, ``batch`` prompts of 40 positions) is timed as well.

    python bench/decode_step.py [--batch-sizes 1,4,16,64 --steps 50 --device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import sync, write_result
from lm_worker.model.backend import LocalDecoderBackend
from services.demo.pipeline import InProcessCaptioner

PROMPT = 40


def measure(backend: LocalDecoderBackend, batch: int, steps: int, rounds: int) -> dict[str, float]:
    hidden = backend.embed_tokens.weight.shape[1]
    device = backend.embed_tokens.weight.device
    generator = torch.Generator().manual_seed(batch)
    times, prefill_times = [], []
    for _ in range(rounds):
        slots = [backend.allocate() for _ in range(batch)]
        prompts = [0.1 * torch.randn(PROMPT, hidden, generator=generator).to(device) for _ in slots]
        sync()
        start = time.perf_counter()
        backend.prefill(slots, prompts)
        sync()
        prefill_times.append(time.perf_counter() - start)
        tokens = torch.randint(0, backend.embed_tokens.num_embeddings, (batch,), generator=generator)
        for _ in range(3):
            backend.decode(slots, tokens)
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            backend.decode(slots, tokens).argmax(-1).tolist()  # the scheduler reads every step
        times.append((time.perf_counter() - start) / steps)
        for slot in slots:
            backend.free(slot)
    slots = [backend.allocate() for _ in range(batch)]
    backend.prefill(slots, [torch.zeros(PROMPT, hidden, device=device) for _ in slots])
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        backend.decode(slots, tokens).argmax(-1).tolist()
    operators = sum(event.count for event in prof.key_averages() if event.key.startswith("aten::"))
    for slot in slots:
        backend.free(slot)
    return {"ms_per_step": 1e3 * statistics.median(times), "aten_calls_per_step": operators,
            "prefill_ms": 1e3 * statistics.median(prefill_times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(Path(__file__).resolve().parent.parent / "models" / "step37-tiny"))
    parser.add_argument("--batch-sizes", default="1,4,16,64")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on the CPU (the worker's default)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sizes = [int(size) for size in args.batch_sizes.split(",")]
    decoder = InProcessCaptioner.from_pretrained(args.model, device=args.device).decoder
    fast = ("cuda_graphs", {"cuda_graphs": True}) if decoder.embed_tokens.weight.is_cuda else \
        ("compiled", {"compile_steps": True})
    variants = {"eager": {"cuda_graphs": False}, fast[0]: fast[1]}
    results: dict[str, dict[str, dict[str, float]]] = {}
    build_s = {}
    for variant, options in variants.items():
        started = time.perf_counter()
        backend = LocalDecoderBackend(decoder, max_batch_size=max(sizes), max_seq_len=PROMPT + 4 + args.steps,
                                      **options)
        build_s[variant] = time.perf_counter() - started
        if variant == "compiled" and backend.compiled is None:
            raise RuntimeError("compiling the decode step failed (see the log above)")
        results[variant] = {}
        for batch in sizes:
            results[variant][str(batch)] = row = measure(backend, batch, args.steps, args.rounds)
            print(f"{variant:<11} batch {batch:>3}: {row['ms_per_step']:.3f} ms per step, "
                  f"{row['aten_calls_per_step']} aten calls; prefill of {batch} x {PROMPT} positions "
                  f"{row['prefill_ms']:.2f} ms")
    speedup = {str(batch): results["eager"][str(batch)]["ms_per_step"] / results[fast[0]][str(batch)]["ms_per_step"]
               for batch in sizes}
    path = write_result("decode_step", {"config": vars(args), "device": str(decoder.embed_tokens.weight.device),
                                        "variants": results, f"{fast[0]}_speedup": speedup,
                                        "backend_build_s": build_s}, device=args.device)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
