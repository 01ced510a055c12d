"""Image features by name: what the LM worker spends on a repeated image, sent whole or named.

The LM worker's own request preparation (``lm_worker.serving.RequestPreparer``: msgpack
decode, named features put back, validation with its finite-value scan, prefix-cache
digests, keeping) for a generate request with one Step3.7-sized image: 169 tokens of
6144 bf16 features (2.1 MB), the tiny model's tokenizer. Variants, interleaved:

- ``whole``: the features in the message, no name (a worker that keeps none);
- ``whole_named``: the features and a name the worker has not kept yet (it keeps a copy);
- ``named``: the name alone, the features kept from an earlier request.

Recorded: message bytes and the median milliseconds of one preparation. (Not here: the
wire itself, about 0.7 ms for 2 MB on a 25 Gb/s link, and the gateway's encoding.)

    python bench/feature_refs.py [--repeats 50 --rounds 7]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import proto
from bench.common import write_result
from lm_worker.feature_store import FeatureStore
from lm_worker.serving import RequestPreparer
from lm_worker.tokens import build_word_tokenizer
from lm_worker.validation import RequestValidator
from proto import GenerateRequest, ImageForInsert, SamplingParams
from services.demo.captions import CAPTION_VOCABULARY

TOKENS, WIDTH = 169, 6144  # one Step3.7 image (728 px): 169 tokens of 6144


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50, help="preparations per variant and round")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_word_tokenizer(list(CAPTION_VOCABULARY), Path(tmp) / "tokenizer.json")
    validator = RequestValidator(tokenizer, encoder_output_dim=WIDTH, vocab_size=tokenizer.vocab_size, max_seq_len=4096)
    limits = proto.WireLimits(max_message_bytes=64 * 2**20)
    store = FeatureStore(256 * 2**20)
    keeping = RequestPreparer(validator, limits, store, prefix_block_size=16)
    plain = RequestPreparer(validator, limits, None, prefix_block_size=16)

    start = tokenizer.ids.im_start
    features = torch.randn(1, TOKENS, WIDTH, generator=torch.Generator().manual_seed(0)).bfloat16()
    request = GenerateRequest(prompt="describe <image>", images=[ImageForInsert(start, image_features=features)],
                              sampling=SamplingParams(max_new_tokens=32))
    whole = proto.encode(request)
    whole_named = proto.encode(dataclasses.replace(request, feature_refs=["image-0"]))
    named = proto.encode(dataclasses.replace(request, images=[ImageForInsert(start)], feature_refs=["image-0"]))
    keys = keeping(whole_named)[1].prefix_keys

    def first_time() -> None:
        store.clear()
        keeping(whole_named)

    variants = {"whole": lambda: plain(whole), "whole_named": first_time, "named": lambda: keeping(named)}
    assert plain(whole)[1].prefix_keys == keys and keeping(named)[1].prefix_keys == keys  # the same prompt
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for round_index in range(args.rounds + 1):  # round 0 warms up
        order = list(variants) if round_index % 2 else list(reversed(variants))
        for name in order:
            started = time.perf_counter()
            for _ in range(args.repeats):
                variants[name]()
            if round_index:
                samples[name].append(1e3 * (time.perf_counter() - started) / args.repeats)

    sizes = {"whole": len(whole), "whole_named": len(whole_named), "named": len(named)}
    table = {name: {"message_bytes": sizes[name], "prepare_ms": statistics.median(values)}
             for name, values in samples.items()}
    for name, row in table.items():
        print(f"{name:12} {row['message_bytes']:>9} bytes  {row['prepare_ms']:6.3f} ms per preparation")
    path = write_result("feature_refs", device="cpu", payload={
        "config": vars(args) | {"image": [1, TOKENS, WIDTH], "dtype": "bfloat16"},
        "table": table,
        "ratios": {"prepare_whole_over_named": table["whole"]["prepare_ms"] / table["named"]["prepare_ms"],
                   "bytes_whole_over_named": sizes["whole"] / sizes["named"]},
        "same_prefix_keys": True,
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
