"""The encoder app in-process: native /v1/encode, KServe v2 routes, health, metrics, bad input.

Every bad input of issue 3 §4 is a test that checks the 4xx, that the JSON error names
the problem, and that the next valid request is still answered correctly.
"""

from __future__ import annotations

import gzip
import io
import json
import struct
import zlib
from collections.abc import Iterator

import anyio
import httpx
import msgpack
import numpy as np
import pytest
import torch
import tritonclient.http as triton
from fastapi.testclient import TestClient
from PIL import Image

import proto
from encoder_server.app import create_app
from encoder_server.model import VisionConfig, init_random
from encoder_server.preprocess import preprocess_batch
from encoder_server.serving import EncoderService, EncoderSettings

MODEL = "tiny"
SETTINGS = EncoderSettings(model_name=MODEL, max_batch_size=4, max_queue_delay_ms=1.0,
                           max_images_per_request=3, max_body_bytes=256 * 1024,
                           max_image_pixels=4_000_000, preprocess_workers=1)
INFER = f"/v2/models/{MODEL}/infer"


def image_bytes(fmt: str = "JPEG", size: tuple[int, int] = (64, 48), seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, fmt)
    return buffer.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A PNG header claiming a width x height canvas, with a few bytes of pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


JPEG = image_bytes("JPEG")
PNG = image_bytes("PNG", (40, 90), seed=1)


@pytest.fixture(scope="module")
def service() -> EncoderService:
    model = init_random(VisionConfig.preset("step37-tiny"), seed=3, dtype=torch.float32, device="cpu")
    return EncoderService(model, name=MODEL, insert_start_token=4242, settings=SETTINGS)


@pytest.fixture(scope="module")
def client(service: EncoderService) -> Iterator[TestClient]:
    with TestClient(create_app(service)) as test_client:  # runs the lifespan: batcher + warm-up
        yield test_client


def reference(service: EncoderService, images: list[bytes]) -> torch.Tensor:
    with torch.inference_mode():
        return service.model(preprocess_batch(images, service.config.image_size))  # [N, L, C]


def decode_response(response: httpx.Response) -> proto.EncodeResponse:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == proto.CONTENT_TYPE
    return proto.decode(response.content, expect=proto.EncodeResponse)


def assert_still_serving(client: TestClient, service: EncoderService) -> None:
    message = decode_response(client.post("/v1/encode?dtype=fp32", content=JPEG,
                                          headers={"content-type": "image/jpeg"}))
    torch.testing.assert_close(message.image.image_features, reference(service, [JPEG]),
                               rtol=1e-4, atol=1e-5)


# ---- native API -------------------------------------------------------------------------


def test_raw_image_body_gives_an_image_for_insert(client: TestClient, service: EncoderService) -> None:
    response = client.post("/v1/encode", content=JPEG,
                           headers={"content-type": "image/jpeg", "x-request-id": "req-1"})
    message = decode_response(response)
    assert response.headers["x-request-id"] == "req-1" == message.request_id
    assert message.model == MODEL
    image = message.image
    assert image.insert_start_token == 4242
    assert image.image_features.shape == (1, 16, 256) and image.image_features.dtype == torch.bfloat16
    assert image.rope_cu_seqlens.tolist() == [0, 256] and image.rope_max_seq_len == 256
    assert set(message.timings) >= {"queue_ms", "preprocess_ms", "forward_ms", "serialize_ms"}
    torch.testing.assert_close(image.image_features.float(), reference(service, [JPEG]),
                               rtol=2e-2, atol=2e-2)


def test_multipart_files_keep_their_order(client: TestClient, service: EncoderService) -> None:
    files = [("images", ("a.jpg", JPEG, "image/jpeg")), ("images", ("b.png", PNG, "image/png"))]
    message = decode_response(client.post("/v1/encode", files=files, data={"output_dtype": "fp32"}))
    assert message.image.image_features.dtype == torch.float32
    assert message.image.rope_cu_seqlens.tolist() == [0, 256, 512]
    torch.testing.assert_close(message.image.image_features, reference(service, [JPEG, PNG]),
                               rtol=1e-4, atol=1e-5)


def test_msgpack_request_with_pixels_and_dtype(client: TestClient, service: EncoderService) -> None:
    pixels = preprocess_batch([PNG], 112)  # another resolution: 8x8 patches -> 2x2 tokens
    body = proto.encode(proto.EncodeRequest(pixels=pixels, output_dtype="float16", request_id="px"))
    message = decode_response(client.post("/v1/encode", content=body,
                                          headers={"content-type": proto.CONTENT_TYPE}))
    assert message.request_id == "px" and message.image.image_features.dtype == torch.float16
    assert message.image.rope_cu_seqlens.tolist() == [0, 64]
    with torch.inference_mode():
        expected = service.model(pixels)
    torch.testing.assert_close(message.image.image_features.float(), expected, rtol=1e-2, atol=1e-2)


def test_health_ready_and_metrics(client: TestClient) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").json() == {"status": "ready", "model": MODEL}
    client.post("/v1/encode", content=b"not an image", headers={"content-type": "image/png"})
    text = client.get("/metrics").text
    for series in ('step37_encoder_requests_total{code="200",route="/v1/encode"}',
                   'step37_encoder_errors_total{kind="bad_image"}',
                   "step37_encoder_queue_depth", "step37_encoder_batch_size_bucket",
                   'step37_encoder_stage_seconds_bucket{le="0.001",stage="forward"}',
                   "step37_encoder_images_total"):
        assert series in text, series


def test_ready_is_503_before_the_service_starts(service: EncoderService) -> None:
    idle = EncoderService(service.model, name="idle", insert_start_token=1, settings=SETTINGS)
    transport = httpx.ASGITransport(app=create_app(idle))  # no lifespan: never started

    async def probe() -> httpx.Response:
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            return await http.get("/ready")

    response = anyio.run(probe)
    assert response.status_code == 503
    assert response.json()["error"]["type"] == "not_ready"


BAD_NATIVE = {
    "empty body": ({"content-type": "image/jpeg"}, b"", 400, "body", "empty"),
    "not an image": ({"content-type": "image/png"}, b"hello, world", 400, "images[0]",
                     "not a supported image"),
    "truncated jpeg": ({"content-type": "image/jpeg"}, JPEG[: len(JPEG) // 2], 400, "images[0]",
                       "truncated"),
    "decompression bomb": ({"content-type": "image/png"}, png_declaring(200_000, 200_000), 413,
                           "images[0]", ""),
    "over the pixel limit": ({"content-type": "image/png"}, png_declaring(4000, 3000), 413,
                             "images[0]", "pixel limit"),
    "body too large": ({"content-type": "image/jpeg"}, b"\xff" * (300 * 1024), 413, "body",
                       "exceeds the limit"),
    "wrong content type": ({"content-type": "text/plain"}, JPEG, 415, "content-type",
                           "not accepted"),
    "no content type": ({}, JPEG, 415, "content-type", "not accepted"),
    "garbage msgpack": ({"content-type": proto.CONTENT_TYPE}, b"\xc1\xc1\xc1", 400, "message",
                        "msgpack"),
    "pixels without a shape": ({"content-type": proto.CONTENT_TYPE},
                               proto.encode(proto.EncodeRequest(pixels=torch.zeros(()))), 400,
                               "pixels", "expected [N, 3, H, W]"),
    "pixels off the patch grid": ({"content-type": proto.CONTENT_TYPE},
                                  proto.encode(proto.EncodeRequest(pixels=torch.zeros(1, 3, 50, 50))),
                                  400, "pixels", "multiples of patch_size"),
    "gzip inflating past the limit": ({"content-type": "image/jpeg", "content-encoding": "gzip"},
                                      gzip.compress(b"\0" * (1024 * 1024)), 413, "body", "inflated"),
}


@pytest.mark.parametrize("case", list(BAD_NATIVE))
def test_bad_native_input_is_a_named_4xx(client: TestClient, service: EncoderService, case: str) -> None:
    headers, body, status, field, text = BAD_NATIVE[case]
    response = client.post("/v1/encode", content=body, headers=headers)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["field"] == field and text in error["message"], error
    assert_still_serving(client, service)


def test_too_many_images_is_413_in_every_form(client: TestClient, service: EncoderService) -> None:
    files = [("images", (f"{i}.jpg", JPEG, "image/jpeg")) for i in range(4)]
    response = client.post("/v1/encode", files=files)
    assert response.status_code == 413
    assert response.json()["error"]["type"] == "too_many_images"
    packed = proto.encode(proto.EncodeRequest(images=[JPEG] * 4))
    response = client.post("/v1/encode", content=packed, headers={"content-type": proto.CONTENT_TYPE})
    assert response.status_code == 413 and response.json()["error"]["field"] == "images"
    assert_still_serving(client, service)


def test_bad_dtype_and_request_id_are_400(client: TestClient, service: EncoderService) -> None:
    response = client.post("/v1/encode?dtype=int8", content=JPEG, headers={"content-type": "image/jpeg"})
    assert response.status_code == 400 and response.json()["error"]["field"] == "dtype"
    response = client.post("/v1/encode", content=JPEG,
                           headers={"content-type": "image/jpeg", "x-request-id": "x" * 200})
    assert response.status_code == 400 and response.json()["error"]["field"] == "x-request-id"
    wrong = msgpack.packb({"v": 1, "type": "EncodeRequest", "images": "not a list"})
    response = client.post("/v1/encode", content=wrong, headers={"content-type": proto.CONTENT_TYPE})
    assert response.status_code == 400 and response.json()["error"]["field"] == "images"
    assert_still_serving(client, service)


# ---- KServe v2 --------------------------------------------------------------------------


def triton_request(inputs: list[triton.InferInput], **options) -> tuple[bytes, dict[str, str]]:
    """The exact body and headers tritonclient.http would send."""
    body, header_length = triton.InferenceServerClient.generate_request_body(inputs, **options)
    headers = {"content-type": "application/octet-stream"}
    if header_length is not None:
        headers["Inference-Header-Content-Length"] = str(header_length)
    return body, headers


def image_input(images: list[bytes], shape: list[int] | None = None) -> triton.InferInput:
    array = np.array(images, dtype=object).reshape(shape or [len(images), 1])
    tensor = triton.InferInput("IMAGE", list(array.shape), "BYTES")
    return tensor.set_data_from_numpy(array)


def parse_result(response: httpx.Response) -> triton.InferResult:
    assert response.status_code == 200, response.text
    length = response.headers.get("inference-header-content-length")
    return triton.InferenceServerClient.parse_response_body(
        response.content, header_length=int(length) if length else None)


def test_kserve_binary_infer_matches_the_model(client: TestClient, service: EncoderService) -> None:
    body, headers = triton_request([image_input([JPEG, PNG])], request_id="k1")
    result = parse_result(client.post(INFER, content=body, headers=headers))
    features = result.as_numpy("IMAGE_FEATURES")
    assert features.dtype == np.float16 and features.shape == (2, 16, 256)
    assert result.as_numpy("ROPE_CU_SEQLENS").tolist() == [0, 256, 512]
    assert result.get_response()["id"] == "k1"
    np.testing.assert_allclose(features.astype(np.float32), reference(service, [JPEG, PNG]).numpy(),
                               rtol=1e-2, atol=1e-2)


def test_kserve_json_pixels_fp32_gzip_and_version(client: TestClient, service: EncoderService) -> None:
    pixels = preprocess_batch([JPEG], 56)
    request = {"inputs": [{"name": "PIXELS", "datatype": "FP32", "shape": list(pixels.shape),
                           "data": pixels.flatten().tolist()}],
               "outputs": [{"name": "IMAGE_FEATURES"}], "parameters": {"output_dtype": "FP32"}}
    response = client.post(f"/v2/models/{MODEL}/versions/1/infer",
                           content=gzip.compress(json.dumps(request).encode()),
                           headers={"content-encoding": "gzip"})
    result = parse_result(response)
    assert [output["name"] for output in result.get_response()["outputs"]] == ["IMAGE_FEATURES"]
    with torch.inference_mode():
        expected = service.model(pixels)
    np.testing.assert_allclose(result.as_numpy("IMAGE_FEATURES"), expected.numpy(), rtol=1e-4, atol=1e-5)


def test_kserve_metadata_config_index_and_stats(client: TestClient) -> None:
    assert client.get("/v2/health/live").status_code == 200
    assert client.get("/v2/health/ready").status_code == 200
    assert "binary_tensor_data" in client.get("/v2").json()["extensions"]
    metadata = client.get(f"/v2/models/{MODEL}").json()
    assert metadata["versions"] == ["1"] and {t["name"] for t in metadata["inputs"]} == {"IMAGE", "PIXELS"}
    config = client.get(f"/v2/models/{MODEL}/versions/1/config").json()
    assert config["max_batch_size"] == 4
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] == 1000
    assert client.post("/v2/repository/index").json() == [{"name": MODEL, "version": "1", "state": "READY"}]
    stats = client.get(f"/v2/models/{MODEL}/stats").json()["model_stats"][0]
    assert stats["inference_count"] >= 1 and stats["execution_count"] >= 1
    assert client.get(f"/v2/models/{MODEL}/ready").json() == {"name": MODEL, "ready": True}


def _header_only(inputs: list[dict], binary: bytes = b"", **extra) -> tuple[bytes, dict[str, str]]:
    header = json.dumps({"inputs": inputs, **extra}).encode()
    return header + binary, {"Inference-Header-Content-Length": str(len(header))}


def _image_spec(size: int, shape: list[int] | None = None, datatype: str = "BYTES") -> dict:
    return {"name": "IMAGE", "datatype": datatype, "shape": shape or [1],
            "parameters": {"binary_data_size": size}}


ONE_JPEG = struct.pack("<I", len(JPEG)) + JPEG
BAD_KSERVE = {
    "wrong datatype": (_header_only([_image_spec(len(ONE_JPEG), datatype="FP32")], ONE_JPEG),
                       400, "data-type"),
    "wrong shape": (_header_only([_image_spec(len(ONE_JPEG), shape=[1, 2])], ONE_JPEG), 400, "shape"),
    "batch over max_batch_size": (_header_only([_image_spec(5 * len(ONE_JPEG), shape=[5])],
                                               ONE_JPEG * 5), 400, "batch-size"),
    "binary_data_size beyond the body": (_header_only([_image_spec(len(ONE_JPEG) + 10)], ONE_JPEG),
                                         400, "binary_data_size"),
    "binary_data_size short of the data": (_header_only([_image_spec(len(ONE_JPEG) - 10)], ONE_JPEG),
                                           400, "declares"),
    "bytes after the tensors": (_header_only([_image_spec(len(ONE_JPEG))], ONE_JPEG + b"xx"),
                                400, "disagree"),
    "pixels size mismatch": (_header_only([{"name": "PIXELS", "datatype": "FP32", "shape": [1, 3, 56, 56],
                                            "parameters": {"binary_data_size": 12}}], b"\0" * 12),
                             400, "needs"),
    "header length beyond the body": ((b'{"inputs": []}', {"Inference-Header-Content-Length": "99999"}),
                                      400, "beyond the end"),
    "header length not a number": ((b"{}", {"Inference-Header-Content-Length": "ten"}), 400,
                                   "Inference-Header-Content-Length"),
    "header not json": ((b"{nope", {}), 400, "not valid JSON"),
    "unknown input": (_header_only([{"name": "TEXT", "datatype": "BYTES", "shape": [1], "data": ["x"]}]),
                      400, "unexpected inference input"),
    "unknown output": (_header_only([_image_spec(len(ONE_JPEG))], ONE_JPEG,
                                    outputs=[{"name": "LOGITS"}]), 400, "unexpected inference output"),
    "bf16 output": (_header_only([_image_spec(len(ONE_JPEG))], ONE_JPEG,
                                 parameters={"output_dtype": "BF16"}), 400, "BF16"),
    "not an image": (_header_only([_image_spec(8)], struct.pack("<I", 4) + b"nope"), 400,
                     "not a supported image"),
}


@pytest.mark.parametrize("case", list(BAD_KSERVE))
def test_bad_kserve_request_is_a_triton_error(client: TestClient, service: EncoderService, case: str) -> None:
    (body, headers), status, text = BAD_KSERVE[case]
    response = client.post(INFER, content=body, headers=headers)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert isinstance(error, str) and text in error, error
    body, headers = triton_request([image_input([JPEG])])
    assert parse_result(client.post(INFER, content=body, headers=headers)).as_numpy("IMAGE_FEATURES").shape == (1, 16, 256)
    assert_still_serving(client, service)


@pytest.mark.parametrize("path", ["/v2/models/other/infer", f"/v2/models/{MODEL}/versions/2/infer",
                                  "/v2/models/other/config", f"/v2/models/{MODEL}/versions/7"])
def test_unknown_model_or_version_is_404(client: TestClient, path: str) -> None:
    body, headers = triton_request([image_input([JPEG])])
    response = client.post(path, content=body, headers=headers) if path.endswith("infer") else client.get(path)
    assert response.status_code == 404
    assert "unknown model" in response.json()["error"]


def test_unknown_v2_path_is_a_triton_404(client: TestClient) -> None:
    response = client.get("/v2/nothing/here")
    assert response.status_code == 404 and "Not Found" in response.json()["error"]
