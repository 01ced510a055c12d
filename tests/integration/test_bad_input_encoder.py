"""Every malformed input the encoder can be sent, over a real socket to a real process.

One table per route family — ``/v1/encode`` (raw image body, multipart, msgpack
``EncodeRequest``) and KServe v2 ``infer`` — each row a bad request with the status and
the field its answer must name. After every row the same encoder must still answer a
valid request with the features it gave before the first. Unusual but valid images
(alpha, CMYK, 16-bit, animations, a wrong image Content-Type) are converted, as
``encoder_server.preprocess`` documents, not refused.
"""

from __future__ import annotations

import gzip
import json
import math
import struct
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import msgpack
import numpy as np
import pytest
import torch
import tritonclient.http as triton
from malformed import (
    BROKEN_IMAGES,
    CONVERTIBLE_IMAGES,
    JPEG,
    PNG,
    assert_call_refused,
    assert_refused,
    deeply_nested,
    jpeg_declaring,
    multipart,
    png_declaring,
    serving,
    wire_tensor,
)

import proto
from services.common.procs import ServiceProcess
from services.launcher import BUNDLED_MODEL

MAX_BATCH_SIZE = 4  # also the most images per request
MAX_BODY_BYTES = 1 << 20
MAX_IMAGE_PIXELS = 4_000_000
TOKENS, FEATURE_DIM = 16, 256  # the tiny tower at 224 px
MODEL = BUNDLED_MODEL.name
INFER = f"/v2/models/{MODEL}/infer"


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    with serving("encoder", "--max-batch-size", str(MAX_BATCH_SIZE), "--max-images-per-request",
                 str(MAX_BATCH_SIZE), "--max-body-bytes", str(MAX_BODY_BYTES), "--max-image-pixels",
                 str(MAX_IMAGE_PIXELS), "--max-queue-delay-ms", "1", log_dir=tmp_path_factory.mktemp("logs")) as service:
        yield service


@pytest.fixture(scope="module")
def http(encoder: ServiceProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=encoder.url, timeout=30) as client:
        yield client


def encode_jpeg(http: httpx.Client) -> torch.Tensor:
    response = http.post("/v1/encode", params={"dtype": "fp32"}, content=JPEG,
                         headers={"content-type": "image/jpeg"})
    assert response.status_code == 200, response.text
    return proto.decode(response.content, expect=proto.EncodeResponse).image.image_features


@pytest.fixture(scope="module")
def reference(http: httpx.Client) -> torch.Tensor:
    """The valid request's features before any bad input arrived: [1, 16, 256] fp32."""
    return encode_jpeg(http)


def assert_still_serving(http: httpx.Client, reference: torch.Tensor) -> None:
    """The next valid request gets the features the first one got."""
    torch.testing.assert_close(encode_jpeg(http), reference, rtol=1e-5, atol=1e-6)


def assert_kserve_still_serving(http: httpx.Client, reference: torch.Tensor) -> None:
    """The next valid KServe request gets them too (FP32 output, binary)."""
    body, header_length = triton.InferenceServerClient.generate_request_body(
        [image_input([JPEG])], parameters={"output_dtype": "FP32"})
    response = http.post(INFER, content=body, headers={"Inference-Header-Content-Length": str(header_length)})
    assert response.status_code == 200, response.text
    result = triton.InferenceServerClient.parse_response_body(
        response.content, header_length=int(response.headers["inference-header-content-length"]))
    np.testing.assert_allclose(result.as_numpy("IMAGE_FEATURES"), reference.numpy(), rtol=1e-5, atol=1e-6)


def image_input(images: list[bytes]) -> triton.InferInput:
    tensor = triton.InferInput("IMAGE", [len(images), 1], "BYTES")
    return tensor.set_data_from_numpy(np.array(images, dtype=object).reshape(len(images), 1))


# ---- /v1/encode -------------------------------------------------------------------------


@dataclass(frozen=True)
class Native:
    """A bad ``POST /v1/encode`` and the refusal it must get."""

    body: bytes
    headers: dict[str, str | bytes]
    status: int
    field: str
    fragment: str
    params: tuple[tuple[str, str], ...] = ()


RAW_PNG = {"content-type": "image/png"}
MSGPACK = {"content-type": proto.CONTENT_TYPE}


def packed(**fields) -> bytes:
    """An ``EncodeRequest`` envelope around whatever ``fields`` say, unchecked."""
    return msgpack.packb({"v": 1, "type": "EncodeRequest", **fields})


def pixels(shape: list[int], dtype: str = "float32", data: bytes | None = None, **extra) -> dict:
    return {**wire_tensor(shape, dtype, data), **extra}


def native_multipart(files, fields, status, field_name, fragment) -> Native:
    body, headers = multipart(files, fields)
    return Native(body, headers, status, field_name, fragment)


GRID = [1, 3, 14, 14]  # one image on the tiny tower's 14 px patch grid
NAN = struct.pack("<f", float("nan")) * math.prod(GRID)
INF = struct.pack("<f", float("inf")) * math.prod(GRID)

BROKEN_FRAGMENTS = {
    "not an image": "not a supported image",
    "truncated png": "truncated or corrupt PNG",
    "truncated jpeg": "truncated or corrupt JPEG",
    "png header only": "truncated or corrupt PNG header",
    "png header crc wrong": "truncated or corrupt PNG header",
    "png declaring 0x0": "truncated or corrupt PNG header",
    "tiff (format not allowed)": "not a supported image",
    "png text-chunk bomb": "too large",
}

NATIVE: dict[str, Native] = {
    # -- the image itself (raw body) --
    "empty body": Native(b"", RAW_PNG, 400, "body", "empty"),
    **{f"raw {name}": Native(data, RAW_PNG, 400, "images[0]", BROKEN_FRAGMENTS[name])
       for name, data in BROKEN_IMAGES.items()},
    "decompression bomb png header": Native(png_declaring(100_000, 100_000), RAW_PNG, 413, "images[0]",
                                            "decompression bomb"),
    "decompression bomb jpeg header": Native(jpeg_declaring(60_000, 60_000), RAW_PNG, 413, "images[0]",
                                             "decompression bomb"),
    "png over the pixel limit": Native(png_declaring(3000, 2000), RAW_PNG, 413, "images[0]", "pixel limit"),
    "png with a side over 16384 px": Native(png_declaring(20_000, 100), RAW_PNG, 413, "images[0]",
                                            "side over 16384"),
    # -- HTTP framing --
    "content type text/plain": Native(JPEG, {"content-type": "text/plain"}, 415, "content-type", "not accepted"),
    "content type application/json": Native(JPEG, {"content-type": "application/json"}, 415, "content-type",
                                            "not accepted"),
    "content type image/tiff": Native(JPEG, {"content-type": "image/tiff"}, 415, "content-type", "not accepted"),
    "no content type": Native(JPEG, {"content-type": ""}, 415, "content-type", "not accepted"),
    "body over max-body-bytes": Native(b"\0" * (MAX_BODY_BYTES + 1), RAW_PNG, 413, "body", "exceeds the limit"),
    "gzip that is not gzip": Native(b"\x1f\x8bnope", {**RAW_PNG, "content-encoding": "gzip"}, 400,
                                    "content-encoding", "not valid gzip"),
    "gzip inflating past the limit": Native(gzip.compress(b"\0" * (2 * MAX_BODY_BYTES)),
                                            {**RAW_PNG, "content-encoding": "gzip"}, 413, "body", "inflated"),
    "unknown content encoding": Native(JPEG, {**RAW_PNG, "content-encoding": "br"}, 400, "content-encoding",
                                       "unsupported"),
    "dtype not a feature dtype": Native(JPEG, RAW_PNG, 400, "dtype", "must be one of", (("dtype", "int8"),)),
    "x-request-id too long": Native(JPEG, {**RAW_PNG, "x-request-id": "r" * 300}, 400, "x-request-id",
                                    "at most 128"),
    "x-request-id with a control character": Native(JPEG, {**RAW_PNG, "x-request-id": "a\tb"}, 400,
                                                    "x-request-id", "printable"),
    # -- multipart --
    "multipart without files": native_multipart([], {"output_dtype": "fp16"}, 400, "images", "no files"),
    "multipart unknown field": native_multipart([("file", PNG)], {"colour": "red"}, 400, "colour",
                                                "unknown form field"),
    "multipart bad output_dtype": native_multipart([("file", PNG)], {"output_dtype": "int8"}, 400,
                                                   "output_dtype", "must be one of"),
    "multipart second file broken": native_multipart([("a", PNG), ("b", b"GIF89a?")], None, 400, "images[1]",
                                                     "truncated or corrupt GIF header"),
    "multipart empty file": native_multipart([("file", b"")], None, 400, "images[0]", "empty image data"),
    "multipart too many files": native_multipart([("file", PNG)] * (MAX_BATCH_SIZE + 1), None, 413, "images",
                                                 f"the limit is {MAX_BATCH_SIZE}"),
    "multipart without boundary": Native(b"--x\r\n", {"content-type": "multipart/form-data"}, 400, "body",
                                         "boundary"),
    "multipart garbage": Native(b"garbage", {"content-type": "multipart/form-data; boundary=xyz"}, 400, "body",
                                "malformed multipart"),
    # -- msgpack envelope --
    "msgpack random bytes": Native(np.random.default_rng(2).bytes(64), MSGPACK, 400, "message",
                                   "Invalid msgpack format"),
    "msgpack trailing bytes": Native(packed(images=[PNG]) + b"\0", MSGPACK, 400, "message", "extra data"),
    "msgpack not a map": Native(msgpack.packb([1, 2, 3]), MSGPACK, 400, "message", "expected a msgpack map"),
    "msgpack nested 5000 deep": Native(deeply_nested("EncodeRequest"), MSGPACK, 400, "message", "Too nested"),
    "msgpack map of 100 keys": Native(msgpack.packb({f"k{i}": i for i in range(100)}), MSGPACK, 400, "message",
                                      "exceeds max_map_len"),
    "msgpack array header of 4G items": Native(b"\xdd\xff\xff\xff\xff", MSGPACK, 400, "message",
                                               "exceeds max_array_len"),
    "msgpack str header of 4 GB": Native(b"\x81\xa1v\xdb\xff\xff\xff\xff", MSGPACK, 400, "message",
                                         "incomplete input"),
    "msgpack extension type": Native(packed(images=[msgpack.ExtType(5, b"ab")]), MSGPACK, 400, "message",
                                     "extension types"),
    "msgpack integer map keys": Native(msgpack.packb({1: 1, "v": 1}), MSGPACK, 400, "message", "map key"),
    "missing version": Native(msgpack.packb({"type": "EncodeRequest", "images": [PNG]}), MSGPACK, 400, "v",
                              "missing version"),
    "unknown version": Native(msgpack.packb({"v": 2, "type": "EncodeRequest", "images": [PNG]}), MSGPACK, 400,
                              "v", "version not supported"),
    "version as a string": Native(msgpack.packb({"v": "1", "type": "EncodeRequest", "images": [PNG]}), MSGPACK,
                                  400, "v", "version not supported"),
    "unknown message type": Native(msgpack.packb({"v": 1, "type": "Nope"}), MSGPACK, 400, "type",
                                   "unknown message type"),
    "another message type": Native(msgpack.packb({"v": 1, "type": "GenerateRequest", "prompt": "x"}), MSGPACK,
                                   400, "type", "takes EncodeRequest"),
    # -- EncodeRequest fields --
    "no images": Native(packed(), MSGPACK, 400, "images", "at least one image"),
    "images not a list": Native(packed(images="abc"), MSGPACK, 400, "images", "expected a list"),
    "image as a string": Native(packed(images=["abc"]), MSGPACK, 400, "images[0]", "expected bin"),
    "empty image": Native(packed(images=[b""]), MSGPACK, 400, "images[0]", "empty image data"),
    "second image broken": Native(packed(images=[PNG, BROKEN_IMAGES["truncated png"]]), MSGPACK, 400,
                                  "images[1]", "truncated or corrupt PNG"),
    "too many images": Native(packed(images=[PNG] * (MAX_BATCH_SIZE + 1)), MSGPACK, 413, "images",
                              f"exceeds the limit of {MAX_BATCH_SIZE}"),
    "images and pixels": Native(packed(images=[PNG], pixels=pixels(GRID)), MSGPACK, 400, "pixels", "not both"),
    "output_dtype not allowed": Native(packed(images=[PNG], output_dtype="int8"), MSGPACK, 400, "output_dtype",
                                       "must be one of"),
    "output_dtype not a string": Native(packed(images=[PNG], output_dtype=3), MSGPACK, 400, "output_dtype",
                                        "expected a string"),
    "request_id with a space": Native(packed(images=[PNG], request_id="a b"), MSGPACK, 400, "request_id",
                                      "printable ASCII"),
    "request_id too long": Native(packed(images=[PNG], request_id="r" * 500), MSGPACK, 413, "request_id",
                                  "exceeds the limit of 128"),
    # -- pixels tensor --
    "pixels dtype not allowed": Native(packed(pixels=pixels(GRID, "complex64")), MSGPACK, 400, "pixels.dtype",
                                       "dtype not allowed"),
    "pixels of integers": Native(packed(pixels=pixels(GRID, "int32")), MSGPACK, 400, "pixels",
                                 "CLIP-normalised floats"),
    "pixels data shorter than the shape": Native(packed(pixels=pixels(GRID, data=b"\0" * 10)), MSGPACK, 400,
                                                 "pixels.data", "does not match shape"),
    "pixels negative dimension": Native(packed(pixels=pixels([1, 3, -14, 14])), MSGPACK, 400, "pixels.shape",
                                        "negative dimension"),
    "pixels enormous dimension": Native(packed(pixels=pixels([1, 3, 2**40, 14], data=b"")), MSGPACK, 413,
                                        "pixels.shape", "exceeds the limit"),
    "pixels dimension past int64": Native(packed(pixels=pixels([1, 3, 2**64 - 1, 14], data=b"")), MSGPACK, 413,
                                          "pixels.shape", "exceeds the limit"),
    "pixels element count over the limit": Native(packed(pixels=pixels([65_536, 3, 65_536, 14], data=b"")),
                                                  MSGPACK, 413, "pixels.shape", "element count"),
    "pixels rank 5": Native(packed(pixels=pixels([1, 1, 3, 14, 14])), MSGPACK, 400, "pixels.shape", "rank 5"),
    "pixels rank 2": Native(packed(pixels=pixels([3, 14])), MSGPACK, 400, "pixels", "expected [N, 3, H, W]"),
    "pixels two channels": Native(packed(pixels=pixels([1, 2, 14, 14])), MSGPACK, 400, "pixels",
                                  "expected [N, 3, H, W]"),
    "pixels of no image": Native(packed(pixels=pixels([0, 3, 14, 14])), MSGPACK, 400, "pixels", "N >= 1"),
    "pixels off the patch grid": Native(packed(pixels=pixels([1, 3, 10, 10])), MSGPACK, 400, "pixels",
                                        "multiples of patch_size"),
    "pixels holding NaN": Native(packed(pixels=pixels(GRID, data=NAN)), MSGPACK, 400, "pixels", "NaN"),
    "pixels holding Inf": Native(packed(pixels=pixels(GRID, data=INF)), MSGPACK, 400, "pixels", "infinite"),
    "pixels shape not a list": Native(packed(pixels=pixels(GRID) | {"shape": "1x3x14x14"}), MSGPACK, 400,
                                      "pixels.shape", "expected a list"),
    "pixels shape of floats": Native(packed(pixels=pixels(GRID) | {"shape": [1.0, 3, 14, 14]}), MSGPACK, 400,
                                     "pixels.shape", "non-negative ints"),
    "pixels data as a string": Native(packed(pixels=pixels(GRID) | {"data": "zeros"}), MSGPACK, 400,
                                      "pixels.data", "expected bin"),
    "pixels unexpected key": Native(packed(pixels=pixels(GRID, scale=2)), MSGPACK, 400, "pixels",
                                    "unexpected keys"),
    "pixels without data": Native(packed(pixels={"dtype": "float32", "shape": GRID}), MSGPACK, 400,
                                  "pixels.data", "required field is missing"),
    "pixels not a map": Native(packed(pixels=[1, 2]), MSGPACK, 400, "pixels", "expected a tensor map"),
}


@pytest.mark.parametrize("case", list(NATIVE))
def test_bad_native_request_is_a_named_4xx_and_the_encoder_keeps_serving(
        http: httpx.Client, reference: torch.Tensor, case: str) -> None:
    bad = NATIVE[case]
    response = http.post("/v1/encode", content=bad.body, headers=bad.headers, params=dict(bad.params))
    assert_refused(response, bad.status, bad.field, bad.fragment)
    assert_still_serving(http, reference)


OVER_THE_CALL_CHANNEL = [case for case, bad in NATIVE.items() if bad.headers == MSGPACK and not bad.params]


@pytest.mark.parametrize("case", OVER_THE_CALL_CHANNEL)
def test_bad_encode_call_is_the_same_named_4xx_and_the_encoder_keeps_serving(
        encoder: ServiceProcess, http: httpx.Client, reference: torch.Tensor, case: str) -> None:
    bad = NATIVE[case]
    assert_call_refused(encoder.url, "encode", bad.body, bad.status, bad.field, bad.fragment)
    assert_still_serving(http, reference)


ACCEPTED = {
    **{name: (data, "image/png") for name, data in CONVERTIBLE_IMAGES.items()},
    "jpeg declared as image/png (the bytes decide)": (JPEG, "image/png"),
    "png declared as image/gif (the bytes decide)": (PNG, "image/gif"),
}


@pytest.mark.parametrize("case", list(ACCEPTED))
def test_unusual_but_valid_images_are_converted(http: httpx.Client, reference: torch.Tensor, case: str) -> None:
    data, content_type = ACCEPTED[case]
    response = http.post("/v1/encode", content=data, headers={"content-type": content_type})
    assert response.status_code == 200, response.text
    features = proto.decode(response.content, expect=proto.EncodeResponse).image.image_features
    assert list(features.shape) == [1, TOKENS, FEATURE_DIM] and bool(torch.isfinite(features).all())
    assert_still_serving(http, reference)


# ---- KServe v2 infer --------------------------------------------------------------------


@dataclass(frozen=True)
class Infer:
    """A bad KServe infer request; Triton's error shape ``{"error": "<field>: <message>"}``."""

    body: bytes
    headers: dict[str, str | bytes]
    field: str
    fragment: str
    status: int = 400


HEADER_LENGTH = "Inference-Header-Content-Length"
ONE_JPEG = struct.pack("<I", len(JPEG)) + JPEG  # Triton's BYTES layout: uint32 length, then the bytes


def infer(document: dict | list | bytes, binary: bytes, field: str, fragment: str, *,
          header_length: str | bytes | None = None, status: int = 400) -> Infer:
    """A JSON inference header followed by ``binary`` (the inputs' ``binary_data_size`` bytes)."""
    header = document if isinstance(document, bytes) else json.dumps(document).encode()
    length = str(len(header)) if header_length is None else header_length
    return Infer(header + binary, {HEADER_LENGTH: length}, field, fragment, status)


def image_spec(size: object = len(ONE_JPEG), shape: object = None, datatype: str = "BYTES") -> dict:
    return {"name": "IMAGE", "datatype": datatype, "shape": [1] if shape is None else shape,
            "parameters": {"binary_data_size": size}}


def one_image(field: str, fragment: str, *, spec: dict | None = None, binary: bytes = ONE_JPEG,
              header_length: str | bytes | None = None, **document) -> Infer:
    """One JPEG as ``IMAGE`` (or ``spec`` instead), ``document`` beside ``inputs``."""
    return infer({"inputs": [spec or image_spec()], **document}, binary, field, fragment,
                 header_length=header_length)


def json_input(name: str, data: object, field: str, fragment: str) -> Infer:
    spec = {"name": name, "datatype": "BYTES" if name == "IMAGE" else "FP32",
            "shape": [1] if name == "IMAGE" else GRID, "data": data}
    return infer({"inputs": [spec]}, b"", field, fragment)


def binary_pixels(shape: list[int], size: int, binary: bytes, field: str, fragment: str) -> Infer:
    spec = {"name": "PIXELS", "datatype": "FP32", "shape": shape, "parameters": {"binary_data_size": size}}
    return infer({"inputs": [spec]}, binary, field, fragment)


NOT_JSON = "the inference header is not valid JSON"
BINARY_DATA_SIZE = "IMAGE.parameters.binary_data_size"
NAN_PIXELS = (b'{"inputs": [{"name": "PIXELS", "datatype": "FP32", "shape": [1, 3, 14, 14], "data": ['
              + b", ".join([b"NaN"] * math.prod(GRID)) + b"]}]}")

KSERVE: dict[str, Infer] = {
    # -- Inference-Header-Content-Length --
    "header length negative": one_image(HEADER_LENGTH, "non-negative integer", header_length="-5"),
    "header length not a number": one_image(HEADER_LENGTH, "non-negative integer", header_length="ten"),
    "header length a unicode digit": one_image(HEADER_LENGTH, "non-negative integer", header_length=b"\xb2"),
    "header length beyond the body": one_image(HEADER_LENGTH, "beyond the end", header_length=str(10**30)),
    "header length cutting the json": one_image("header", NOT_JSON, header_length="10"),
    "header length zero": one_image("header", NOT_JSON, header_length="0"),
    # -- the JSON header --
    "header not json": infer(b"{nope", b"", "header", NOT_JSON),
    "header not an object": infer([1, 2], b"", "header", "must be a JSON object"),
    "header nested 100000 deep": infer(b"[" * 100_000 + b"]" * 100_000, b"", "header", NOT_JSON),
    "header not utf-8": infer(b'{"inputs": "\xff"}', b"", "header", NOT_JSON),
    "empty body": Infer(b"", {}, "header", NOT_JSON),
    "no inputs": infer({}, b"", "inputs", "non-empty list"),
    "inputs not a list": infer({"inputs": "IMAGE"}, b"", "inputs", "non-empty list"),
    "two inputs": infer({"inputs": [image_spec(), image_spec()]}, ONE_JPEG * 2, "inputs", "exactly one"),
    "input not an object": infer({"inputs": [5]}, b"", "inputs", "unexpected inference input 5"),
    "unknown input name": one_image("inputs", "unexpected inference input 'TEXT'",
                                    spec={"name": "TEXT", "datatype": "BYTES", "shape": [1], "data": ["x"]}),
    "input name a list": one_image("inputs", "unexpected inference input ['IMAGE']",
                                   spec={"name": ["IMAGE"], "datatype": "BYTES", "shape": [1]}),
    "wrong datatype": one_image("IMAGE.datatype", "data-type is 'FP32'", spec=image_spec(datatype="FP32")),
    "no datatype": one_image("IMAGE.datatype", "data-type is None",
                             spec={k: v for k, v in image_spec().items() if k != "datatype"}),
    "wrong shape": one_image("IMAGE.shape", "expects [N] or [N, 1]", spec=image_spec(shape=[1, 2])),
    "shape empty": one_image("IMAGE.shape", "expects [N] or [N, 1]", spec=image_spec(shape=[])),
    "shape negative": one_image("IMAGE.shape", "non-negative integers", spec=image_spec(shape=[-1])),
    "shape of floats": one_image("IMAGE.shape", "non-negative integers", spec=image_spec(shape=[1.0])),
    "shape a string": one_image("IMAGE.shape", "non-negative integers", spec=image_spec(shape="1")),
    "shape enormous": one_image("IMAGE.shape", "batch-size", spec=image_spec(shape=[2**62])),
    "shape zero images": one_image("IMAGE.shape", "batch-size", spec=image_spec(shape=[0])),
    "batch over max_batch_size": one_image("IMAGE.shape", "batch-size", binary=ONE_JPEG * 5,
                                           spec=image_spec(5 * len(ONE_JPEG), shape=[5])),
    "input parameters not an object": one_image("IMAGE.parameters", "must be a JSON object", spec={
        "name": "IMAGE", "datatype": "BYTES", "shape": [1], "parameters": [1]}),
    # -- binary_data_size --
    "binary_data_size negative": one_image(BINARY_DATA_SIZE, "non-negative integer", spec=image_spec(-1)),
    "binary_data_size a string": one_image(BINARY_DATA_SIZE, "non-negative integer", spec=image_spec("10")),
    "binary_data_size a float": one_image(BINARY_DATA_SIZE, "non-negative integer", spec=image_spec(1.5)),
    "binary_data_size true": one_image(BINARY_DATA_SIZE, "non-negative integer", spec=image_spec(True)),
    "binary_data_size beyond the body": one_image(BINARY_DATA_SIZE, "but only", spec=image_spec(2**70)),
    "binary_data_size short of the data": one_image(BINARY_DATA_SIZE, "remain",
                                                    spec=image_spec(len(ONE_JPEG) - 10)),
    "bytes after the tensors": one_image("body", "disagree", binary=ONE_JPEG + b"xx"),
    "bytes element without its length": one_image(BINARY_DATA_SIZE, "no 4-byte length prefix", binary=b"ab",
                                                  spec=image_spec(2)),
    "bytes element longer than the data": one_image(BINARY_DATA_SIZE, "declares 1000 bytes", spec=image_spec(8),
                                                    binary=struct.pack("<I", 1000) + b"abcd"),
    "no data and no binary_data_size": one_image("IMAGE.data", "neither 'data' nor", binary=b"",
                                                 spec={"name": "IMAGE", "datatype": "BYTES", "shape": [1]}),
    # -- the image and the pixels --
    "empty image": one_image("images[0]", "empty image data", spec=image_spec(4), binary=struct.pack("<I", 0)),
    "image not an image": one_image("images[0]", "not a supported image", spec=image_spec(8),
                                    binary=struct.pack("<I", 4) + b"nope"),
    "image truncated": one_image("images[0]", "truncated or corrupt JPEG", spec=image_spec(4 + len(JPEG) // 2),
                                 binary=struct.pack("<I", len(JPEG) // 2) + JPEG[: len(JPEG) // 2]),
    "json image data not strings": json_input("IMAGE", [5], "IMAGE.data", "must hold 1 strings"),
    "json pixels of strings": json_input("PIXELS", ["a"] * math.prod(GRID), "PIXELS.data", "must be numbers"),
    "json pixels ragged": json_input("PIXELS", [[1, 2], [3]], "PIXELS.data", "must be numbers"),
    "json pixels an object": json_input("PIXELS", {"a": 1}, "PIXELS.data", "must be numbers"),
    "json pixels null": json_input("PIXELS", None, "PIXELS.data", "needs 588"),
    "json pixels an integer past float range": json_input("PIXELS", [10**400] * math.prod(GRID), "PIXELS.data",
                                                          "must be numbers"),
    "json pixels too large for float32": json_input("PIXELS", [1e300] * math.prod(GRID), "pixels",
                                                    "NaN or infinite"),
    "json pixels holding NaN": infer(NAN_PIXELS, b"", "pixels", "NaN or infinite"),
    "pixels size mismatch": binary_pixels(GRID, 12, b"\0" * 12, "PIXELS.parameters.binary_data_size", "needs"),
    "pixels enormous shape": binary_pixels([1, 3, 2**40, 2**40], 0, b"", "PIXELS.parameters.binary_data_size",
                                           "needs"),
    "pixels off the patch grid": binary_pixels([1, 3, 10, 10], 1200, b"\0" * 1200, "pixels",
                                               "multiples of patch_size"),
    # -- outputs and parameters --
    "outputs not a list": one_image("outputs", "must be a list", outputs="IMAGE_FEATURES"),
    "unknown output": one_image("outputs", "unexpected inference output 'LOGITS'", outputs=[{"name": "LOGITS"}]),
    "output parameters not an object": one_image("outputs.IMAGE_FEATURES.parameters", "must be a JSON object",
                                                 outputs=[{"name": "IMAGE_FEATURES", "parameters": 5}]),
    "parameters not an object": one_image("parameters", "must be a JSON object", parameters=5),
    "bf16 output": one_image("parameters.output_dtype", "'FP16' or 'FP32'", parameters={"output_dtype": "BF16"}),
    "output_dtype a list": one_image("parameters.output_dtype", "'FP16' or 'FP32'",
                                     parameters={"output_dtype": ["FP16"]}),
    "timeout negative": one_image("parameters.timeout", "positive integer", parameters={"timeout": -1}),
    "timeout a string": one_image("parameters.timeout", "positive integer", parameters={"timeout": "1"}),
    # -- HTTP framing --
    "gzip that is not gzip": Infer(b"\x1f\x8bnope", {"content-encoding": "gzip"}, "content-encoding",
                                   "not valid gzip"),
    "body over max-body-bytes": Infer(b" " * (MAX_BODY_BYTES + 1), {}, "body", "exceeds the limit", 413),
}


@pytest.mark.parametrize("case", list(KSERVE))
def test_bad_kserve_infer_is_a_triton_4xx_and_the_encoder_keeps_serving(
        http: httpx.Client, reference: torch.Tensor, case: str) -> None:
    bad = KSERVE[case]
    response = http.post(INFER, content=bad.body, headers=bad.headers)
    assert response.status_code == bad.status, response.text
    error = response.json()["error"]
    assert isinstance(error, str) and error.startswith(f"{bad.field}: ") and bad.fragment in error, error
    assert_kserve_still_serving(http, reference)


def test_unknown_model_version_and_path_are_404s(http: httpx.Client, reference: torch.Tensor) -> None:
    body, header_length = triton.InferenceServerClient.generate_request_body([image_input([JPEG])])
    headers = {HEADER_LENGTH: str(header_length)}
    for path in ("/v2/models/other/infer", f"/v2/models/{MODEL}/versions/2/infer", "/v2/models/other/config",
                 "/v2/no/such/path"):
        response = http.post(path, content=body, headers=headers) if path.endswith("infer") else http.get(path)
        assert response.status_code == 404 and isinstance(response.json()["error"], str), response.text
    assert_kserve_still_serving(http, reference)
