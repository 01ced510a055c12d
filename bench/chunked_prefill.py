"""Chunked prefill: how long running streams wait while a long image prompt is prefilled.

Two in-process LM worker services from the same seeded ``step37-tiny`` weights differ
only in ``max_prefill_tokens``: ``whole`` (4096: the long prompt in one step) and
``chunked`` (``--chunk``: the long prompt over several steps, a decode step of the
running batch after each). Per round, ``--streams`` greedy streams start decoding;
once each has ten tokens, a request with one image of ``--image-rows`` feature rows
arrives. Recorded per variant (median of interleaved rounds):

- the longest gap between two tokens of a running stream while the long prompt is
  prefilled (from its arrival to its first token), and the median gap outside it;
- the long request's time to first token.

Correctness first: every stream and the long request must produce the same token ids
in both variants (checked each round).

    python bench/chunked_prefill.py [--streams 8 --image-rows 440 --chunk 64 --rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import proto
from bench.common import write_result
from lm_worker.sequence import SequenceRequest
from lm_worker.serving import LMWorkerService
from lm_worker.settings import LMWorkerSettings
from lm_worker.tokens import build_word_tokenizer
from proto import GenerateRequest, ImageForInsert, SamplingParams
from services.demo.captions import CAPTION_VOCABULARY

WARM_TOKENS = 10  # tokens each stream has before the long prompt arrives


def request(service: LMWorkerService, request_id: str, rows: int, max_new_tokens: int, seed: int) -> SequenceRequest:
    """A validated request with one image of ``rows`` feature rows (the HTTP path's decode and checks)."""
    features = torch.randn(1, rows, service.model.config.encoder_output_dim, generator=torch.Generator().manual_seed(seed))
    message = GenerateRequest(request_id=request_id, prompt="describe <image>",
                              images=[ImageForInsert(service.model.tokenizer.ids.im_start,
                                                     image_features=features.bfloat16())],
                              sampling=SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True))
    sequence = service.prepare(proto.encode(message))[1]
    sequence.stream = True
    return sequence


async def one_round(service: LMWorkerService, args: argparse.Namespace, seed: int) -> dict:
    streams = [request(service, f"s{i}", 16, args.stream_tokens, seed + i) for i in range(args.streams)]
    stamps: dict[str, list[float]] = {s.request_id: [] for s in streams}
    tokens: dict[str, list[int]] = {}
    warm = asyncio.Event()

    async def read(sequence: SequenceRequest) -> None:
        sequence.arrival_s = time.perf_counter()
        got: list[int] = []
        async for event in service.submit(sequence):
            now = time.perf_counter()
            stamps.setdefault(sequence.request_id, []).extend([now] * len(event.token_ids))
            got += event.token_ids
            if all(len(s) >= WARM_TOKENS for s in (stamps[x.request_id] for x in streams)):
                warm.set()
        tokens[sequence.request_id] = got

    readers = [asyncio.ensure_future(read(s)) for s in streams]
    await warm.wait()
    long = request(service, "long", args.image_rows, 8, seed + 1000)
    arrived = time.perf_counter()
    await read(long)
    first_token = stamps["long"][0]
    await asyncio.gather(*readers)

    during, outside = [], []
    for sequence in streams:
        times = stamps[sequence.request_id]
        for before, after in itertools.pairwise(times):
            if before == after:
                continue  # tokens of one event
            (during if after > arrived and before < first_token else outside).append(after - before)
    return {"tokens": tokens, "max_gap_during_ms": 1e3 * max(during),
            "median_gap_outside_ms": 1e3 * statistics.median(outside), "long_ttft_ms": 1e3 * (first_token - arrived)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--stream-tokens", type=int, default=120)
    parser.add_argument("--image-rows", type=int, default=440, help="feature rows of the long prompt's image")
    parser.add_argument("--chunk", type=int, default=64, help="max_prefill_tokens of the chunked variant")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads, as a service gets here")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer_path = Path(tmp) / "tokenizer.json"
        build_word_tokenizer(list(CAPTION_VOCABULARY), tokenizer_path)
        services = {name: LMWorkerService.from_settings(LMWorkerSettings(
            preset="step37-tiny", tokenizer=str(tokenizer_path), seed=0, device=args.device,
            max_batch_size=args.streams + 1, max_prefill_tokens=budget, prefix_cache_mb=0))
            for name, budget in (("whole", 4096), ("chunked", args.chunk))}
    for service in services.values():
        service.start()
    samples: dict[str, list[dict]] = {name: [] for name in services}
    try:
        for round_index in range(args.rounds + 1):  # round 0 warms up
            order = list(services) if round_index % 2 else list(reversed(services))
            for name in order:
                result = asyncio.run(one_round(services[name], args, seed=100 * round_index))
                if round_index:
                    samples[name].append(result)
            if samples["whole"] and samples["whole"][-1]["tokens"] != samples["chunked"][-1]["tokens"]:
                raise AssertionError(f"round {round_index}: chunked prefill changed the tokens")
    finally:
        for service in services.values():
            service.stop()

    table = {name: {key: statistics.median(r[key] for r in results)
                    for key in ("max_gap_during_ms", "median_gap_outside_ms", "long_ttft_ms")}
             for name, results in samples.items()}
    for name, row in table.items():
        print(f"{name:8} longest gap while prefilling {row['max_gap_during_ms']:6.1f} ms   "
              f"median gap otherwise {row['median_gap_outside_ms']:5.1f} ms   long TTFT {row['long_ttft_ms']:6.1f} ms")
    prompt_positions = len(request(next(iter(services.values())), "probe", args.image_rows, 8, 0).prompt_ids)
    path = write_result("chunked_prefill", device=args.device, payload={
        "config": vars(args) | {"preset": "step37-tiny", "long_prompt_positions": prompt_positions},
        "table": table,
        "ratios": {"max_gap_whole_over_chunked": table["whole"]["max_gap_during_ms"]
                   / table["chunked"]["max_gap_during_ms"],
                   "long_ttft_chunked_over_whole": table["chunked"]["long_ttft_ms"] / table["whole"]["long_ttft_ms"]},
        "outputs_identical": True,
        "rounds": {name: [{k: v for k, v in r.items() if k != "tokens"} for r in results]
                   for name, results in samples.items()},
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
