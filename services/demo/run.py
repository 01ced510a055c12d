"""``step37-serve demo``: the smallest real slice of the pipeline, in one process.

Vision features for a few images (from a seeded random vision output) are serialised
as an ``ImageForInsert`` msgpack message, decoded as the LM worker would, and
scatter-inserted into a prompt's embedding by ``ImageInsertEmbedding``; the fused
``[S, B, H]`` tensor and per-stage timings are printed. The full demo (encoder, LM
worker and gateway on the bundled model) replaces this once those services exist.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import proto
from lm_worker import ImageInsertEmbedding

IM_START, IM_PATCH, IM_END = 1, 2, 3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--tokens-per-image", type=int, default=169)
    parser.add_argument("--encoder-dim", type=int, default=6144)
    parser.add_argument("--hidden-size", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    gen = torch.Generator().manual_seed(args.seed)
    tokens = args.tokens_per_image
    features = torch.randn(args.images, tokens, args.encoder_dim, generator=gen).bfloat16()
    item = proto.ImageForInsert(IM_START, image_features=features)

    start = time.perf_counter()
    wire = proto.encode(item)
    encoded = time.perf_counter()
    received = proto.decode(wire, expect=proto.ImageForInsert)
    decoded = time.perf_counter()

    prompt = []
    for _ in range(args.images):
        prompt += [10, 11, IM_START] + [IM_PATCH] * tokens + [IM_END]
    input_ids = torch.tensor([prompt + [12]])  # [B=1, S]
    module = ImageInsertEmbedding(nn.Embedding(64, args.hidden_size), args.encoder_dim, args.hidden_size,
                                  placeholder_token_id=IM_PATCH)
    with torch.inference_mode():
        fused = module(input_ids, [received])  # [S, B, H]
    inserted = time.perf_counter()

    print(f"ImageForInsert: {args.images} images x {tokens} tokens x {args.encoder_dim} bf16 "
          f"-> {len(wire) / 1e6:.1f} MB msgpack")
    print(f"fused decoder_input: {list(fused.shape)} [S, B, H]")
    print(f"timings: encode {1e3 * (encoded - start):.1f} ms, decode {1e3 * (decoded - encoded):.1f} ms, "
          f"insert {1e3 * (inserted - decoded):.1f} ms")
    return 0
