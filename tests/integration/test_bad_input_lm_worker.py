"""Every malformed ``GenerateRequest`` the LM worker can be sent, over a real socket.

One table: HTTP framing, the msgpack envelope, each ``GenerateRequest`` field, the
``ImageForInsert`` tensors (dtype, shape, length, NaN/Inf, RoPE metadata) and the
sampling parameters, each row with the status and the field its answer must name.
After every row the same worker must still answer a valid request with the tokens it
gave before the first (greedy decoding is deterministic).
"""

from __future__ import annotations

import gzip
import struct
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import msgpack
import numpy as np
import pytest
import torch
from malformed import assert_call_refused, assert_refused, deeply_nested, serving
from malformed import wire_tensor as tensor

import proto
from proto import GenerateRequest, GenerateResponse, ImageForInsert, SamplingParams
from services.common.procs import ServiceProcess
from services.demo.checkpoint import read_token_ids
from services.launcher import BUNDLED_MODEL

MAX_BODY_BYTES = 1 << 20
TOKENS, FEATURE_DIM = 16, 256  # what the bundled tiny tower sends per image
IDS = read_token_ids(BUNDLED_MODEL)
IM_START, PATCH_START = IDS["im_start_token_id"], IDS["patch_start_token_id"]
IM_PATCH, IM_END = IDS["image_token_id"], IDS["im_end_token_id"]
FEATURES = torch.randn(1, TOKENS, FEATURE_DIM, generator=torch.Generator().manual_seed(0))
MSGPACK = {"content-type": proto.CONTENT_TYPE}


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    with serving("lm-worker", "--max-batch-size", "2", "--max-body-bytes", str(MAX_BODY_BYTES),
                 log_dir=tmp_path_factory.mktemp("logs")) as service:
        yield service


@pytest.fixture(scope="module")
def http(worker: ServiceProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=worker.url, timeout=30) as client:
        yield client


VALID = GenerateRequest(prompt="<image> describe", images=[ImageForInsert(IM_START, image_features=FEATURES)],
                        sampling=SamplingParams(max_new_tokens=4, ignore_eos=True), request_id="valid")


def generate(http: httpx.Client) -> GenerateResponse:
    response = http.post("/v1/generate", content=proto.encode(VALID), headers=MSGPACK)
    assert response.status_code == 200, response.text
    return proto.decode(response.content, expect=GenerateResponse)


@pytest.fixture(scope="module")
def reference(http: httpx.Client) -> list[int]:
    """The valid request's tokens before any bad input arrived."""
    tokens = generate(http).token_ids
    assert len(tokens) == VALID.sampling.max_new_tokens
    return tokens


def assert_still_serving(http: httpx.Client, reference: list[int]) -> None:
    assert generate(http).token_ids == reference


# ---- the table ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Bad:
    """A bad ``POST /v1/generate`` and the refusal it must get."""

    body: bytes
    status: int
    field: str
    fragment: str
    headers: tuple[tuple[str, str], ...] = tuple(MSGPACK.items())


def image(**fields) -> dict:
    """``VALID``'s ``ImageForInsert`` as a wire map, with ``fields`` replaced."""
    return {**ImageForInsert(IM_START, image_features=FEATURES).to_wire(), **fields}


def request(**fields) -> bytes:
    """``VALID`` as a raw msgpack map with ``fields`` replaced: nothing checks them here."""
    return msgpack.packb({"v": 1, "type": "GenerateRequest", "prompt": "<image> describe", "images": [image()],
                          "sampling": {"max_new_tokens": 4, "ignore_eos": True}, **fields})


def sampling(**fields) -> bytes:
    return request(sampling={"max_new_tokens": 4, "ignore_eos": True, **fields})


def features(value: object) -> bytes:
    return request(images=[image(image_features=value)])


FLOAT_NAN = struct.pack("<f", float("nan")) * (TOKENS * FEATURE_DIM)
BF16_INF = b"\x80\x7f" * (TOKENS * FEATURE_DIM)
BLOCK = [IM_START, *[IM_PATCH] * TOKENS, IM_END]


def rope(*values: int, dtype: str = "int32") -> dict:
    return tensor([len(values)], dtype, struct.pack(f"<{len(values)}{'i' if dtype == 'int32' else 'q'}", *values))


BAD: dict[str, Bad] = {
    # -- HTTP framing --
    **{f"content type {kind or '(none)'}": Bad(proto.encode(VALID), 415, "content-type", "x-msgpack",
                                              (("content-type", kind),))
       for kind in ("application/json", "text/plain", "")},
    "empty body": Bad(b"", 400, "message", "empty body"),
    "body over max-body-bytes": Bad(request(prompt="<image> " + "a" * MAX_BODY_BYTES), 413, "body",
                                    "exceeds the limit"),
    "gzip that is not gzip": Bad(b"\x1f\x8bnope", 400, "content-encoding", "not valid gzip",
                                 (*MSGPACK.items(), ("content-encoding", "gzip"))),
    "gzip inflating past the limit": Bad(gzip.compress(b"\0" * (2 * MAX_BODY_BYTES)), 413, "body", "inflated",
                                         (*MSGPACK.items(), ("content-encoding", "gzip"))),
    # -- msgpack envelope --
    "random bytes": Bad(np.random.default_rng(2).bytes(64), 400, "message", "Invalid msgpack format"),
    "trailing bytes": Bad(proto.encode(VALID) + b"\0", 400, "message", "extra data"),
    "not a map": Bad(msgpack.packb(["GenerateRequest"]), 400, "message", "expected a msgpack map"),
    "nested 5000 deep": Bad(deeply_nested("GenerateRequest"), 400, "message", "Too nested"),
    "map of 100 keys": Bad(msgpack.packb({f"k{i}": i for i in range(100)}), 400, "message", "max_map_len"),
    "extension type": Bad(request(prompt=msgpack.ExtType(1, b"x")), 400, "message", "extension types"),
    "missing version": Bad(msgpack.packb({"type": "GenerateRequest", "prompt": "x"}), 400, "v", "missing version"),
    "unknown version": Bad(request(v=99), 400, "v", "version not supported"),
    "missing type": Bad(msgpack.packb({"v": 1, "prompt": "x"}), 400, "type", "unknown message type"),
    "another message type": Bad(proto.encode(proto.EncodeRequest(images=[b"png"])), 400, "type",
                                "takes GenerateRequest"),
    # -- GenerateRequest fields --
    "prompt an int": Bad(request(prompt=5), 400, "prompt", "expected a string"),
    "prompt and input_ids": Bad(request(input_ids=[1, 2]), 400, "prompt", "exactly one"),
    "neither prompt nor input_ids": Bad(request(prompt=None), 400, "prompt", "exactly one"),
    "prompt with a special token": Bad(request(prompt="<image> <im_patch>"), 400, "prompt", "special tokens"),
    "more placeholders than images": Bad(request(prompt="<image> and <image>"), 400, "prompt",
                                         "2 <image> placeholder(s) but 1 image(s)"),
    "prompt past the context": Bad(request(prompt="<image> " + "describe " * 600), 400, "prompt",
                                   "leave no room"),
    "input_ids of strings": Bad(request(prompt=None, input_ids=["a"]), 400, "input_ids[0]", "expected an int"),
    "input_ids negative": Bad(request(prompt=None, input_ids=[-1]), 400, "input_ids[0]", ">= 0"),
    "input_ids past uint64": Bad(request(prompt=None, input_ids=[2**64 - 1]), 400, "input_ids[0]",
                                 "not in the vocabulary"),
    "input_ids empty": Bad(request(prompt=None, input_ids=[], images=[]), 400, "input_ids", "non-empty"),
    "input_ids image span past the end": Bad(request(prompt=None, input_ids=[IM_START, IM_PATCH]), 400,
                                             "input_ids[2]", "expected 16"),
    "input_ids stray placeholder": Bad(request(prompt=None, input_ids=[*BLOCK, IM_PATCH]), 400,
                                       f"input_ids[{len(BLOCK)}]", "outside an image block"),
    "stream not a bool": Bad(request(stream="yes"), 400, "stream", "expected a bool"),
    "timings not a map": Bad(request(timings=5), 400, "timings", "expected a map"),
    "timings value a string": Bad(request(timings={"queue": "slow"}), 400, "timings.queue", "expected a number"),
    "request_id with a newline": Bad(request(request_id="a\nb"), 400, "request_id", "printable ASCII"),
    "request_id too long": Bad(request(request_id="r" * 500), 413, "request_id", "exceeds the limit of 128"),
    "images not a list": Bad(request(images="x"), 400, "images", "expected a list"),
    "image not a map": Bad(request(images=[5]), 400, "images[0]", "expected a map"),
    "257 images": Bad(request(images=[{"insert_start_token": IM_START}] * 257), 413, "images",
                      "exceeds the limit of 256"),
    # -- ImageForInsert --
    "features missing": Bad(features(None), 400, "images[0].image_features", "run the vision tower first"),
    "pixels instead of features": Bad(request(images=[image(image_features=None, images=tensor([1, 3, 14, 14]))]),
                                      400, "images[0].image_features", "run the vision tower first"),
    "features of integers": Bad(features(tensor([1, TOKENS, FEATURE_DIM], "int32")), 400,
                                "images[0].image_features", "floating point"),
    "features dtype not allowed": Bad(features(tensor([1, TOKENS, FEATURE_DIM], "float64")), 400,
                                      "images[0].image_features.dtype", "dtype not allowed"),
    "features data shorter than the shape": Bad(features(tensor([1, TOKENS, FEATURE_DIM], data=b"\0" * 10)), 400,
                                                "images[0].image_features.data", "does not match shape"),
    "features negative dimension": Bad(features(tensor([1, -TOKENS, FEATURE_DIM])), 400,
                                       "images[0].image_features.shape", "negative dimension"),
    "features enormous dimension": Bad(features(tensor([1, 2**40, FEATURE_DIM], data=b"")), 413,
                                       "images[0].image_features.shape", "exceeds the limit"),
    "features element count over the limit": Bad(features(tensor([2**20, 2**20, FEATURE_DIM], data=b"")), 413,
                                                 "images[0].image_features.shape", "element count"),
    "features of zero tokens": Bad(features(tensor([1, 0, FEATURE_DIM])), 400, "images[0].image_features",
                                   "at least one feature token"),
    "features rank 1": Bad(features(tensor([FEATURE_DIM])), 400, "images[0].image_features", "expected [N, L, C]"),
    "features rank 4": Bad(features(tensor([1, 1, TOKENS, FEATURE_DIM])), 400, "images[0].image_features",
                           "expected [N, L, C]"),
    "features holding NaN": Bad(features(tensor([1, TOKENS, FEATURE_DIM], data=FLOAT_NAN)), 400,
                                "images[0].image_features", "NaN or Inf"),
    "bf16 features holding Inf": Bad(features(tensor([1, TOKENS, FEATURE_DIM], "bfloat16", BF16_INF)), 400,
                                     "images[0].image_features", "NaN or Inf"),
    "features an empty list": Bad(features([]), 400, "images[0].image_features", "non-empty list"),
    "feature blocks of different widths": Bad(
        request(prompt="<image> <image>", images=[image(image_features=[
            tensor([TOKENS, FEATURE_DIM]), tensor([TOKENS, 128])])]),
        400, "images[0].image_features[1]", "differs from the first block's"),
    "feature block not a tensor": Bad(features([5]), 400, "images[0].image_features[0]", "expected a tensor map"),
    "features a string": Bad(features("abc"), 400, "images[0].image_features", "expected a tensor map"),
    "feature width not the projector's": Bad(features(tensor([1, TOKENS, 128])), 400, "images[0].image_features",
                                             "projector's input dim 256"),
    "insert token negative": Bad(request(images=[image(insert_start_token=-1)]), 400,
                                 "images[0].insert_start_token", ">= 0"),
    "insert token not a start token": Bad(request(images=[image(insert_start_token=3)]), 400,
                                          "images[0].insert_start_token", "must be <im_start>"),
    "insert token missing": Bad(request(images=[{"image_features": image()["image_features"]}]), 400,
                                "images[0].insert_start_token", "required field is missing"),
    "patches with a prompt": Bad(request(images=[image(), image(insert_start_token=PATCH_START)]), 400, "images",
                                 "multicrop patches"),
    "rope_cu_seqlens int64": Bad(request(images=[image(rope_cu_seqlens=rope(0, 256, dtype="int64"))]), 400,
                                 "images[0].rope_cu_seqlens", "expected int32 [N+1]"),
    "rope_cu_seqlens decreasing": Bad(request(images=[image(rope_cu_seqlens=rope(0, -5))]), 400,
                                      "images[0].rope_cu_seqlens", "non-decreasing"),
    "rope_cu_seqlens not from 0": Bad(request(images=[image(rope_cu_seqlens=rope(3, 5))]), 400,
                                      "images[0].rope_cu_seqlens", "must start at 0"),
    "rope_cu_seqlens one too many": Bad(request(images=[image(rope_cu_seqlens=rope(0, 5, 9))]), 400,
                                        "images[0].rope_cu_seqlens", "expected 2 entries for 1 images"),
    "rope_max_seq_len not the largest step": Bad(
        request(images=[image(rope_cu_seqlens=rope(0, 256), rope_max_seq_len=7)]), 400,
        "images[0].rope_max_seq_len", "largest per-image patch count 256"),
    "rope_max_seq_len alone": Bad(request(images=[image(rope_max_seq_len=7)]), 400, "images[0].rope_max_seq_len",
                                  "without rope_cu_seqlens"),
    # -- sampling --
    "sampling not a map": Bad(request(sampling=5), 400, "sampling", "expected a map"),
    "max_new_tokens a string": Bad(sampling(max_new_tokens="4"), 400, "sampling.max_new_tokens", "expected an int"),
    "max_new_tokens a float": Bad(sampling(max_new_tokens=4.0), 400, "sampling.max_new_tokens", "expected an int"),
    "max_new_tokens zero": Bad(sampling(max_new_tokens=0), 400, "sampling.max_new_tokens", ">= 1"),
    "max_new_tokens past the context": Bad(sampling(max_new_tokens=2**63), 400, "sampling.max_new_tokens",
                                           "exceed the context length"),
    "temperature NaN": Bad(sampling(temperature=float("nan")), 400, "sampling.temperature", "finite"),
    "temperature Inf": Bad(sampling(temperature=float("inf")), 400, "sampling.temperature", "finite"),
    "temperature negative": Bad(sampling(temperature=-0.5), 400, "sampling.temperature", "[0, 100]"),
    "temperature a string": Bad(sampling(temperature="hot"), 400, "sampling.temperature", "expected a number"),
    "top_p zero": Bad(sampling(top_p=0.0), 400, "sampling.top_p", "(0, 1]"),
    "top_p above one": Bad(sampling(top_p=1.5), 400, "sampling.top_p", "(0, 1]"),
    "top_k negative": Bad(sampling(top_k=-1), 400, "sampling.top_k", ">= 0"),
    "seed negative": Bad(sampling(seed=-1), 400, "sampling.seed", ">= 0"),
    "seed past int64": Bad(sampling(seed=2**64 - 1), 400, "sampling.seed", "<= 9223372036854775807"),
    "stop not a list": Bad(sampling(stop="x"), 400, "sampling.stop", "expected a list"),
    "17 stop strings": Bad(sampling(stop=["x"] * 17), 413, "sampling.stop", "exceeds the limit of 16"),
    "empty stop string": Bad(sampling(stop=[""]), 400, "sampling.stop[0]", "empty"),
    "stop string too long": Bad(sampling(stop=["x" * 1000]), 400, "sampling.stop[0]", "longer than 256"),
    "stop token negative": Bad(sampling(stop_token_ids=[-1]), 400, "sampling.stop_token_ids[0]", ">= 0"),
    "stop token past the vocabulary": Bad(sampling(stop_token_ids=[10_000]), 400, "sampling.stop_token_ids[0]",
                                          "vocabulary"),
    "ignore_eos an int": Bad(sampling(ignore_eos=1), 400, "sampling.ignore_eos", "expected a bool"),
    # -- streamed: refused before the stream opens, as JSON --
    "streamed with NaN features": Bad(request(stream=True, images=[image(image_features=tensor(
        [1, TOKENS, FEATURE_DIM], data=FLOAT_NAN))]), 400, "images[0].image_features", "NaN or Inf"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_generate_request_is_a_named_4xx_and_the_worker_keeps_serving(
        http: httpx.Client, reference: list[int], case: str) -> None:
    bad = BAD[case]
    response = http.post("/v1/generate", content=bad.body, headers=dict(bad.headers))
    assert_refused(response, bad.status, bad.field, bad.fragment)
    assert_still_serving(http, reference)


@pytest.mark.parametrize("case", [case for case, bad in BAD.items() if dict(bad.headers) == MSGPACK])
def test_bad_generate_call_is_the_same_named_4xx_and_the_worker_keeps_serving(
        worker: ServiceProcess, http: httpx.Client, reference: list[int], case: str) -> None:
    bad = BAD[case]
    assert_call_refused(worker.url, "generate", bad.body, bad.status, bad.field, bad.fragment)
    assert_still_serving(http, reference)
