"""The wire contract: round trips, validation before allocation, errors naming fields."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import proto
from proto import (
    BadTensor,
    EncodeRequest,
    EncodeResponse,
    GenerateRequest,
    GenerateResponse,
    ImageForInsert,
    InvalidValue,
    LimitExceeded,
    MalformedMessage,
    MissingField,
    ProtocolError,
    SamplingParams,
    UnknownMessageType,
    UnsupportedVersion,
    WireLimits,
    WrongType,
)


def bits(t: torch.Tensor) -> torch.Tensor:
    """A bitwise view, so NaNs and -0.0 compare exactly."""
    return t.contiguous().view(torch.uint8)


def make_item(n=2, length=3, dim=8, dtype=torch.bfloat16) -> ImageForInsert:
    return ImageForInsert(
        insert_start_token=128000,
        image_features=torch.randn(n, length, dim).to(dtype),
        rope_cu_seqlens=torch.arange(0, (n + 1) * 9, 9, dtype=torch.int32),
        rope_max_seq_len=9,
    )


@pytest.mark.parametrize("dtype", list(proto.WIRE_DTYPES.values()))
def test_tensor_round_trip_is_bit_exact(dtype):
    source = (torch.randn(3, 4, 5) * 100)
    tensor = source.to(dtype) if dtype != torch.bool else source > 0
    wire = msgpack.unpackb(msgpack.packb(proto.tensor_to_wire(tensor)))
    back = proto.tensor_from_wire(wire, "t")
    assert back.dtype == dtype and back.shape == tensor.shape
    assert torch.equal(bits(back), bits(tensor))


def test_bfloat16_special_values_survive():
    values = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-40, 3.0e38]).bfloat16()
    back = proto.decode(proto.encode(ImageForInsert(1, image_features=values.reshape(1, 2, 3))))
    assert torch.equal(bits(back.image_features), bits(values.reshape(1, 2, 3)))


def test_non_contiguous_and_empty_tensors():
    t = torch.randn(4, 6).t()[:, 1:3]
    back = proto.tensor_from_wire(msgpack.unpackb(msgpack.packb(proto.tensor_to_wire(t))), "t")
    assert torch.equal(back, t)
    empty = proto.tensor_from_wire(msgpack.unpackb(msgpack.packb(proto.tensor_to_wire(torch.zeros(0, 5)))), "t")
    assert empty.shape == (0, 5)


def test_decoded_tensor_is_a_view_of_the_received_bytes():
    data = torch.randn(16, 32).bfloat16()
    wire = proto.tensor_to_wire(data)
    raw = bytes(wire["data"])
    back = proto.tensor_from_wire({**wire, "data": raw}, "t")
    assert back.data_ptr() == np.frombuffer(raw, dtype=np.uint8).ctypes.data


@pytest.mark.parametrize(
    "msg",
    [
        make_item(),
        ImageForInsert(7, image_features=[torch.randn(5, 8).bfloat16(), torch.randn(2, 3, 8).bfloat16()],
                       rope_cu_seqlens=torch.tensor([0, 4, 8, 12], dtype=torch.int32), rope_max_seq_len=4),
        ImageForInsert(7, images=torch.randn(2, 3, 28, 28)),
        EncodeRequest(images=[b"\x89PNG...", b"jpeg"], output_dtype="float16", request_id="r1"),
        EncodeRequest(pixels=torch.randn(1, 3, 14, 14)),
        EncodeResponse(image=make_item(), model="step37-tiny", request_id="r2", timings={"queue_ms": 1.5}),
        GenerateRequest(prompt="describe <image>", images=[make_item()],
                        sampling=SamplingParams(max_new_tokens=9, temperature=0.7, top_p=0.9, top_k=5, seed=3,
                                                stop_token_ids=[2], stop=["."]),
                        stream=True, request_id="r3", timings={"encode_ms": 3.0}, cache_salt="tenant-a",
                        feature_refs=["f00d"]),
        GenerateRequest(prompt="again <image>", images=[ImageForInsert(4)], feature_refs=["f00d"]),
        GenerateRequest(input_ids=[1, 2, 3]),
        GenerateResponse(token_ids=[4, 5], text="a red circle", finish_reason="length", prompt_tokens=20, cached_tokens=16,
                         request_id="r4", timings={"prefill_ms": 2.0, "decode_ms": 5.0}),
    ],
    ids=lambda m: type(m).__name__,
)
def test_messages_round_trip(msg):
    back = proto.decode(proto.encode(msg))
    assert type(back) is type(msg)
    assert_same(back, msg)


def assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(bits(a), bits(b))
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    elif hasattr(a, "__dataclass_fields__"):
        for name in a.__dataclass_fields__:
            assert_same(getattr(a, name), getattr(b, name))
    else:
        assert a == b


def test_an_unsalted_generate_request_sends_no_cache_salt():
    # A worker that predates the field reads the message unchanged.
    assert not {"cache_salt", "feature_refs"} & set(GenerateRequest(prompt="x").to_wire())
    assert proto.decode(proto.encode(GenerateRequest(prompt="x"))).cache_salt is None


def test_feature_lengths_and_counts():
    item = ImageForInsert(1, image_features=[torch.zeros(5, 4), torch.zeros(2, 3, 4)])
    assert item.feature_lengths() == [5, 3, 3] and item.num_images == 3 and item.feature_dim == 4


def test_expect_restricts_type():
    data = proto.encode(GenerateRequest(prompt="x"))
    with pytest.raises(UnknownMessageType, match="takes EncodeRequest"):
        proto.decode(data, expect=EncodeRequest)


def envelope(**fields):
    return msgpack.packb({"v": 1, "type": "ImageForInsert", **fields}, use_bin_type=True)


def tensor_map(dtype="float32", shape=(1, 2, 4), data=None):
    if data is None:
        data = bytes(int(np.prod(shape)) * getattr(torch, dtype).itemsize)
    return {"dtype": dtype, "shape": list(shape), "data": data}


@pytest.mark.parametrize(
    ("payload", "error", "field", "text"),
    [
        (b"", MalformedMessage, "message", "empty"),
        (b"\xc1\x00", MalformedMessage, "message", "not a valid msgpack"),
        (msgpack.packb({"v": 1, "type": "ImageForInsert", "insert_start_token": 1}) + b"x", MalformedMessage, "message", "ExtraData"),
        (msgpack.packb([1, 2]), WrongType, "message", "msgpack map"),
        (msgpack.packb({"type": "ImageForInsert"}), UnsupportedVersion, "v", "missing version"),
        (msgpack.packb({"v": 99, "type": "ImageForInsert"}), UnsupportedVersion, "v", "not supported"),
        (msgpack.packb({"v": [1], "type": "ImageForInsert"}), UnsupportedVersion, "v", "not supported"),
        (msgpack.packb({"v": 1, "type": "Pickle"}), UnknownMessageType, "type", "unknown message type"),
        (envelope(), MissingField, "insert_start_token", "missing"),
        (envelope(insert_start_token="5"), WrongType, "insert_start_token", "expected an int"),
        (envelope(insert_start_token=True), WrongType, "insert_start_token", "expected an int"),
        (envelope(insert_start_token=-1), InvalidValue, "insert_start_token", ">= 0"),
        (envelope(insert_start_token=1, image_features=tensor_map(dtype="complex64")), BadTensor, "image_features.dtype", "not allowed"),
        (envelope(insert_start_token=1, image_features=tensor_map(data=b"\x00" * 7)), BadTensor, "image_features.data", "does not match"),
        (envelope(insert_start_token=1, image_features=tensor_map(shape=(1, -2, 4), data=b"")), BadTensor, "image_features.shape", "negative"),
        (envelope(insert_start_token=1, image_features=tensor_map(shape=(1, 1, 1, 1, 1), data=b"\x00" * 4)), BadTensor, "image_features.shape", "rank"),
        (envelope(insert_start_token=1, image_features=tensor_map(shape=(2**20, 2**20, 2**10), data=b"")), LimitExceeded, "image_features.shape", "element count"),
        (envelope(insert_start_token=1, image_features={"dtype": "float32", "shape": [1]}), MissingField, "image_features.data", "missing"),
        (envelope(insert_start_token=1, image_features=tensor_map(shape=(0, 2**62, 2**62), data=b"")), LimitExceeded, "image_features.shape", "dimension"),
        (envelope(insert_start_token=1, rope_cu_seqlens=tensor_map("int32", (100_000,))), LimitExceeded, "rope_cu_seqlens", "entries"),
        (msgpack.packb({"v": 1, "type": "GenerateRequest", "prompt": "x", "request_id": "caf\u00e9"}), InvalidValue, "request_id", "printable ASCII"),
        (msgpack.packb({"v": 1, "type": "GenerateRequest", "prompt": "x", "request_id": "a\nb"}), InvalidValue, "request_id", "printable ASCII"),
        (envelope(insert_start_token=1, image_features=tensor_map(shape=(2, 4))), BadTensor, "image_features", "[N, L, C]"),
        (envelope(insert_start_token=1, image_features=tensor_map(dtype="int32")), BadTensor, "image_features", "floating point"),
        (envelope(insert_start_token=1, image_features=[tensor_map(shape=(2, 4)), tensor_map(shape=(2, 5))]), BadTensor, "image_features[1]", "differs"),
        (envelope(insert_start_token=1, image_features=tensor_map(), rope_cu_seqlens=tensor_map("int64", (2,))), BadTensor, "rope_cu_seqlens", "int32"),
        (envelope(insert_start_token=1, image_features=tensor_map(), rope_cu_seqlens=tensor_map("int32", (3,))), BadTensor, "rope_cu_seqlens", "2 entries"),
        (envelope(insert_start_token=1, image_features=tensor_map(), rope_cu_seqlens={"dtype": "int32", "shape": [2], "data": np.array([3, 9], np.int32).tobytes()}), InvalidValue, "rope_cu_seqlens", "start at 0"),
        (envelope(insert_start_token=1, image_features=tensor_map(shape=(2, 2, 4)), rope_cu_seqlens={"dtype": "int32", "shape": [3], "data": np.array([0, 9, 4], np.int32).tobytes()}), InvalidValue, "rope_cu_seqlens", "non-decreasing"),
        (envelope(insert_start_token=1, image_features=tensor_map(), rope_cu_seqlens={"dtype": "int32", "shape": [2], "data": np.array([0, 9], np.int32).tobytes()}, rope_max_seq_len=8), InvalidValue, "rope_max_seq_len", "largest"),
        (msgpack.packb({"v": 1, "type": "GenerateRequest"}), InvalidValue, "prompt", "exactly one"),
        (msgpack.packb({"v": 1, "type": "GenerateRequest", "prompt": "x", "cache_salt": ""}), InvalidValue, "cache_salt", "non-empty"),
        (msgpack.packb({"v": 1, "type": "GenerateRequest", "prompt": "x", "cache_salt": "s" * 257}), LimitExceeded, "cache_salt", "limit of 256"),
        (msgpack.packb({"v": 1, "type": "GenerateRequest", "prompt": "x", "cache_salt": 7}), WrongType, "cache_salt", "string"),
        (msgpack.packb({"v": 1, "type": "GenerateRequest", "prompt": "x", "feature_refs": ["a"]}), InvalidValue, "feature_refs", "one name per item"),
        (msgpack.packb({"v": 1, "type": "GenerateRequest", "prompt": "x", "images": [{"insert_start_token": 4}], "feature_refs": ["a b"]}), InvalidValue, "feature_refs[0]", "printable"),
        (msgpack.packb({"v": 1, "type": "GenerateRequest", "prompt": "x", "images": [{"insert_start_token": 4}], "feature_refs": ["a" * 129]}), LimitExceeded, "feature_refs[0]", "limit of 128"),
        (msgpack.packb({"v": 1, "type": "GenerateRequest", "prompt": "x", "sampling": {"top_p": 0}}), InvalidValue, "sampling.top_p", "(0, 1]"),
        (msgpack.packb({"v": 1, "type": "GenerateRequest", "prompt": "x", "sampling": {"temperature": -1}}), InvalidValue, "sampling.temperature", "[0, 100]"),
        (msgpack.packb({"v": 1, "type": "GenerateRequest", "prompt": "x", "images": [{"insert_start_token": 1, "image_features": 3}]}), WrongType, "images[0].image_features", "tensor map"),
        (msgpack.packb({"v": 1, "type": "EncodeRequest", "images": ["not bytes"]}, use_bin_type=True), WrongType, "images[0]", "bin"),
        (msgpack.packb({"v": 1, "type": "EncodeRequest", "images": []}), InvalidValue, "images", "at least one"),
        (msgpack.packb({"v": 1, "type": "EncodeRequest", "images": [b"x"], "output_dtype": "float64"}, use_bin_type=True), InvalidValue, "output_dtype", "one of"),
        (msgpack.packb({"v": 1, "type": "GenerateResponse", "timings": {"a": "slow"}}), WrongType, "timings.a", "number"),
        (b"\x91" * 5000, MalformedMessage, "message", "not a valid msgpack"),
        (msgpack.packb({"v": 1, "type": "ImageForInsert", "x": msgpack.ExtType(1, b"")}), MalformedMessage, "message", "not a valid"),
    ],
)
def test_bad_messages_name_the_field(payload, error, field, text):
    with pytest.raises(error) as info:
        proto.decode(payload)
    assert info.value.field == field
    assert text in str(info.value)
    body = info.value.to_dict()
    assert body["field"] == field and body["type"] == error.kind


def test_many_small_containers_are_bounded():
    # 60k empty lists nested in 20 lists: tiny on the wire, millions of objects decoded.
    inner = b"\xdc" + (60000).to_bytes(2, "big") + b"\x90" * 60000
    payload = b"\x81\xa1x" + b"\xdc" + (20).to_bytes(2, "big") + inner * 20
    with pytest.raises(LimitExceeded, match="decoded object count"):
        proto.decode(payload)


def test_message_limits_apply():
    limits = WireLimits(max_message_bytes=100)
    with pytest.raises(LimitExceeded, match="size in bytes"):
        proto.decode(proto.encode(make_item(n=4, length=8, dim=8)), limits=limits)
    small = WireLimits(max_message_elements=50)
    with pytest.raises(LimitExceeded, match="elements in message"):
        proto.decode(proto.encode(make_item(n=4, length=8, dim=8)), limits=small)
    few = WireLimits(max_images=2)
    with pytest.raises(LimitExceeded, match="image count"):
        proto.decode(proto.encode(make_item(n=3, length=1, dim=2)), limits=few)


def test_validate_finite_and_required_features():
    item = make_item(dtype=torch.float32)
    item.image_features[0, 1, 2] = float("nan")
    item.validate()
    with pytest.raises(BadTensor, match="NaN or Inf"):
        item.validate(check_finite=True)
    with pytest.raises(InvalidValue, match="required"):
        ImageForInsert(3, images=torch.zeros(1, 3, 14, 14)).validate(require_features=True)


def test_errors_are_value_errors_and_protocol_errors():
    for cls in (MalformedMessage, UnsupportedVersion, MissingField, WrongType, BadTensor, LimitExceeded):
        assert issubclass(cls, ProtocolError) and issubclass(cls, ValueError)
    assert LimitExceeded.http_status == 413 and BadTensor.http_status == 400


# ---- property tests ------------------------------------------------------------------
feature_shapes = st.tuples(st.integers(1, 3), st.integers(0, 5), st.integers(1, 6))


@settings(max_examples=60, deadline=None)
@given(shape=feature_shapes, dtype=st.sampled_from(["bfloat16", "float16", "float32"]),
       token=st.integers(0, 2**31), seed=st.integers(0, 2**16))
def test_property_round_trip(shape, dtype, token, seed):
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(*shape, generator=gen).to(proto.WIRE_DTYPES[dtype])
    counts = torch.randint(0, 50, (shape[0],), generator=gen)
    cu = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]).to(torch.int32)
    item = ImageForInsert(token, image_features=features, rope_cu_seqlens=cu, rope_max_seq_len=int(counts.max()))
    assert_same(proto.decode(proto.encode(item)), item)


VALID = proto.encode(GenerateRequest(prompt="a <image>", images=[make_item(n=1, length=2, dim=4)],
                                     sampling=SamplingParams(stop=["x"])))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_property_mutations_decode_or_raise_protocol_error(data):
    payload = bytearray(VALID)
    for _ in range(data.draw(st.integers(1, 4))):
        kind = data.draw(st.sampled_from(["flip", "truncate", "insert"]))
        pos = data.draw(st.integers(0, max(len(payload) - 1, 0)))
        if kind == "flip" and payload:
            payload[pos] = data.draw(st.integers(0, 255))
        elif kind == "truncate":
            del payload[pos:]
        else:
            payload[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
    try:
        msg = proto.decode(bytes(payload))
    except ProtocolError:
        return
    assert type(msg) in proto.MESSAGE_TYPES.values()


def test_the_bfloat16_finite_check_agrees_with_torch_isfinite_on_every_bit_pattern():
    from proto.image_for_insert import all_finite

    every = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    finite = torch.isfinite(every)
    assert int((~finite).sum()) == 2 * 128  # exponent all ones: ±Inf and the NaNs, either sign
    for value, expected in zip(every.tolist(), finite.tolist(), strict=True):  # one value at a time, in a block
        block = torch.zeros(2, 3, dtype=torch.bfloat16)
        block[1, 2] = value
        assert all_finite(block) is expected
    assert all_finite(every[finite]) and not all_finite(every)
    assert all_finite(torch.randn(4, 8)) and not all_finite(torch.tensor([1.0, float("nan")]))


def test_encode_chunks_keeps_tensor_payloads_apart_and_packs_the_rest_together():
    features = torch.randn(2, 16, 256).to(torch.bfloat16)  # 16 KiB: large enough to pass through uncopied
    request = GenerateRequest(request_id="r", prompt="<image> and <image> describe",
                              images=[ImageForInsert(4, image_features=features)],
                              sampling=SamplingParams(max_new_tokens=8))
    chunks = proto.encode_chunks(request)
    assert [type(chunk) for chunk in chunks] == [bytes, memoryview, bytes]
    assert chunks[1].nbytes == features.numel() * 2
    assert proto.decode(b"".join(chunks), expect=GenerateRequest).images[0].image_features.equal(features)
