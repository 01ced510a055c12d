"""ImageInsertEmbedding.forward versus the per-image loop the seed describes.

Realistic layout scaled to this machine: B rows of S tokens, 16 images of 169 tokens
spread over the rows, hidden H, encoder dim C. Three variants, interleaved:

- ``fast``: the module (one projection per ImageForInsert, one index_copy_);
- ``loop``: embed, then per image: find its start token, project, slice-assign;
- ``loop_batched_projection``: one projection, then the per-image slice loop — it does
  the same arithmetic as ``fast``, so its output must be bit-identical;
- ``floor``: the embedding lookup and the projection alone, no insert — the work every
  variant must do, so ``fast - floor`` is what the scatter costs.

    python bench/insert.py [--seq 4096 --batch 4 --hidden 1024 --enc-dim 1536 --images 16]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import interleaved, write_result
from lm_worker import ImageForInsert, ImageInsertEmbedding

IM_START, IM_PATCH, IM_END = 1, 2, 3


def build_ids(batch: int, seq: int, images: int, tokens: int, gen: torch.Generator) -> torch.Tensor:
    ids = torch.randint(10, 1000, (batch, seq), generator=gen)
    per_row = [images // batch + (1 if r < images % batch else 0) for r in range(batch)]
    for row, count in enumerate(per_row):
        stride = seq // max(count, 1)
        assert stride >= tokens + 2, "sequence too short for the images"
        for k in range(count):
            pos = k * stride
            ids[row, pos] = IM_START
            ids[row, pos + 1 : pos + 1 + tokens] = IM_PATCH
            ids[row, pos + 1 + tokens] = IM_END
    return ids


def loop_forward(module: ImageInsertEmbedding, ids: torch.Tensor, item: ImageForInsert, batched: bool) -> torch.Tensor:
    emb = module.language_embedding(ids.to(module.align_projector.weight.device).t())  # [S, B, H]
    feats = item.image_features
    positions = (ids == item.insert_start_token).nonzero().tolist()
    if batched:
        projected = module.align_projector(feats.reshape(-1, feats.shape[-1]).to(emb.device, emb.dtype)).view(
            feats.shape[0], feats.shape[1], -1)
    for i, (b, s) in enumerate(positions):
        rows = projected[i] if batched else module.align_projector(feats[i].to(emb.device, emb.dtype))
        end = min(s + 1 + rows.shape[0], emb.shape[0])
        emb[s + 1 : end, b] = rows[: end - s - 1]
    return emb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--enc-dim", type=int, default=1536)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=169)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)
    embedding = nn.Embedding(args.vocab, args.hidden).to(device, dtype)
    module = ImageInsertEmbedding(embedding, args.enc_dim, args.hidden, placeholder_token_id=IM_PATCH).to(device, dtype)
    ids = build_ids(args.batch, args.seq, args.images, args.tokens, gen)
    features = torch.randn(args.images, args.tokens, args.enc_dim, generator=gen).bfloat16()  # as off the wire
    item = ImageForInsert(IM_START, image_features=features)

    with torch.inference_mode():
        fast = module(ids, [item])
        same_arithmetic = loop_forward(module, ids, item, batched=True)
        seed_loop = loop_forward(module, ids, item, batched=False)
        bit_identical = torch.equal(fast, same_arithmetic)
        max_abs_diff_seed_loop = (fast.float() - seed_loop.float()).abs().max().item()
        assert bit_identical, "fast path differs from the loop with the same projection"
        timings = interleaved(
            {
                "fast": lambda: module(ids, [item]),
                "loop": lambda: loop_forward(module, ids, item, batched=False),
                "loop_batched_projection": lambda: loop_forward(module, ids, item, batched=True),
                "floor": lambda: (embedding(ids.to(device).t()),
                                  module.align_projector(features.reshape(-1, args.enc_dim).to(device, dtype))),
            },
            rounds=args.rounds,
        )
    speedup = timings["loop"]["median_s"] / timings["fast"]["median_s"]
    payload = {
        "config": vars(args) | {"device": str(device)},
        "results": timings,
        "speedup_vs_loop": speedup,
        "speedup_vs_loop_batched_projection": timings["loop_batched_projection"]["median_s"] / timings["fast"]["median_s"],
        "bit_identical_to_loop_batched_projection": bit_identical,
        "scatter_ms_fast": 1e3 * (timings["fast"]["median_s"] - timings["floor"]["median_s"]),
        "scatter_ms_loop": 1e3 * (timings["loop"]["median_s"] - timings["floor"]["median_s"]),
        "max_abs_diff_vs_per_image_projection": max_abs_diff_seed_loop,
        "goal": ">= 1.5x faster than the per-image loop with bit-identical results",
        "goal_met": speedup >= 1.5 and bit_identical,
    }
    path = write_result("insert", payload)
    for name, row in timings.items():
        print(f"{name:<26} {row['median_s'] * 1e3:9.2f} ms")
    print(f"speedup vs loop: {speedup:.2f}x  bit-identical (same projection): {bit_identical}  "
          f"max |diff| vs per-image projection: {max_abs_diff_seed_loop:.2e}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
