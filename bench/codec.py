"""Wire codec throughput: an ImageForInsert of 16 × 169 × 6144 bf16 features (the
full-size Step3.7 output for 16 images), encode and decode, as a ratio to a memcpy of
the same bytes measured in the same run; torch.save/torch.load into a buffer and a
JSON list of floats for comparison.

    python bench/codec.py [--images 16 --tokens 169 --dim 6144 --rounds 9]
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import proto
from bench.common import interleaved, write_result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=169)
    parser.add_argument("--dim", type=int, default=6144)
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()

    gen = torch.Generator().manual_seed(0)
    features = torch.randn(args.images, args.tokens, args.dim, generator=gen).bfloat16()
    counts = torch.full((args.images,), 52 * 52)
    cu = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]).to(torch.int32)
    item = proto.ImageForInsert(128000, image_features=features, rope_cu_seqlens=cu, rope_max_seq_len=52 * 52)
    nbytes = features.numel() * features.element_size()

    wire = proto.encode(item)
    decoded = proto.decode(wire)
    assert torch.equal(decoded.image_features.view(torch.int16), features.view(torch.int16)), "round trip not exact"
    src = features.view(torch.uint8).reshape(-1)
    dst = torch.empty_like(src)

    def torch_save() -> bytes:
        buffer = io.BytesIO()
        torch.save(features, buffer)
        return buffer.getvalue()

    saved = torch_save()

    def torch_load() -> torch.Tensor:
        return torch.load(io.BytesIO(saved), weights_only=True)

    timings = interleaved(
        {
            "memcpy": lambda: dst.copy_(src),
            "encode": lambda: proto.encode(item),
            "decode": lambda: proto.decode(wire),
            "torch_save": torch_save,
            "torch_load": torch_load,
        },
        rounds=args.rounds,
    )
    # JSON of a list of floats is orders of magnitude slower: time one image's worth
    # and report bytes/s so it compares with the rest.
    one = features[:1].float()
    one_bytes = one.numel() * 2
    json_text = json.dumps(one.tolist())
    json_timings = interleaved(
        {"json_encode": lambda: json.dumps(one.tolist()), "json_decode": lambda: torch.tensor(json.loads(json_text))},
        rounds=3,
        warmup=0,
    )

    def rate(name: str, size: int, table: dict) -> float:
        return size / table[name]["median_s"] / 1e9

    memcpy_gbps = rate("memcpy", nbytes, timings)
    results = {name: {**timings[name], "gbps": rate(name, nbytes, timings)} for name in timings}
    results.update({name: {**json_timings[name], "gbps": rate(name, one_bytes, json_timings)} for name in json_timings})
    for name in results:
        results[name]["ratio_to_memcpy"] = results[name]["gbps"] / memcpy_gbps
    payload = {
        "shape": [args.images, args.tokens, args.dim],
        "dtype": "bfloat16",
        "feature_bytes": nbytes,
        "message_bytes": len(wire),
        "overhead_bytes": len(wire) - nbytes,
        "round_trip_bit_exact": True,
        "results": results,
        "goal": "decode >= 0.5 x memcpy bandwidth",
        "goal_met": results["decode"]["ratio_to_memcpy"] >= 0.5,
    }
    path = write_result("codec", payload)
    print(f"{'variant':<12} {'GB/s':>9} {'x memcpy':>9}")
    for name, row in results.items():
        print(f"{name:<12} {row['gbps']:>9.2f} {row['ratio_to_memcpy']:>9.3f}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
