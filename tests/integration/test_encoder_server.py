"""The encoder as a real process (issue 3's DONE criteria).

A seeded random checkpoint in tmp_path, ``step37-serve encoder --model DIR`` on a free
port, readiness polled on ``/ready``. (a) The native API's features equal an
in-process ``load_vision_model`` forward; (b) ``tritonclient.http`` gets the same
features to fp16 tolerance; (c) health, metadata, config, index and statistics work
through tritonclient; concurrent requests share forwards.
"""

from __future__ import annotations

import asyncio
import io
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import tritonclient.http as triton
from PIL import Image
from tritonclient.utils import InferenceServerException

import proto
from encoder_server.model import load_vision_model
from encoder_server.preprocess import preprocess_batch
from services.common.rpc import RpcClient, RpcFailed
from services.demo.checkpoint import random_checkpoint, read_token_ids

MAX_BATCH_SIZE = 4


def image_bytes(fmt: str, size: tuple[int, int], seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buffer, fmt)
    return buffer.getvalue()


IMAGES = [image_bytes("JPEG", (320, 240), 0), image_bytes("PNG", (97, 211), 1),
          image_bytes("WEBP", (224, 224), 2)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return random_checkpoint(tmp_path_factory.mktemp("encoder") / "step37-tiny-random", seed=7)


@pytest.fixture
def encoder(start_service, checkpoint: Path):
    # A long enough delay that concurrent requests reliably meet in one batch.
    return start_service("encoder", ["encoder", "--model", str(checkpoint),
                                     "--max-batch-size", str(MAX_BATCH_SIZE),
                                     "--max-queue-delay-ms", "100", "--preprocess-workers", "2"])


@pytest.fixture(scope="module")
def reference(checkpoint: Path) -> torch.Tensor:
    """The same checkpoint's features, computed in this process: [3, 16, 256] float32."""
    model = load_vision_model(checkpoint, dtype=torch.float32, device="cpu")
    with torch.inference_mode():
        return model(preprocess_batch(IMAGES, model.config.image_size))


def test_native_api_matches_the_in_process_model(encoder, checkpoint: Path, reference: torch.Tensor) -> None:
    files = [("images", (f"{i}", data, "application/octet-stream")) for i, data in enumerate(IMAGES)]
    with httpx.Client(base_url=encoder.url, timeout=60) as http:
        exact = http.post("/v1/encode", params={"dtype": "fp32"}, files=files)
        default = http.post("/v1/encode", content=IMAGES[1], headers={"content-type": "image/png"})
    for response in (exact, default):
        assert response.status_code == 200, response.text
    message = proto.decode(exact.content, expect=proto.EncodeResponse)
    image = message.image
    assert message.model == checkpoint.name
    assert image.insert_start_token == read_token_ids(checkpoint)["im_start_token_id"]
    assert image.rope_cu_seqlens.tolist() == [0, 256, 512, 768] and image.rope_max_seq_len == 256
    torch.testing.assert_close(image.image_features, reference, rtol=1e-4, atol=1e-5)
    single = proto.decode(default.content, expect=proto.EncodeResponse).image.image_features
    assert single.dtype == torch.bfloat16  # the wire default
    torch.testing.assert_close(single.float(), reference[1:2], rtol=1e-2, atol=1e-2)


def test_tritonclient_gets_the_same_features(encoder, reference: torch.Tensor) -> None:
    client = triton.InferenceServerClient(encoder.url.removeprefix("http://"), network_timeout=60)
    tensor = triton.InferInput("IMAGE", [3, 1], "BYTES")
    tensor.set_data_from_numpy(np.array(IMAGES, dtype=object).reshape(3, 1))
    result = client.infer(checkpoint_name(client), [tensor], request_id="triton-1",
                          request_compression_algorithm="gzip")
    features = result.as_numpy("IMAGE_FEATURES")
    assert features.dtype == np.float16 and features.shape == (3, 16, 256)
    np.testing.assert_allclose(features.astype(np.float32), reference.numpy(), rtol=2e-3, atol=2e-3)
    assert result.as_numpy("ROPE_CU_SEQLENS").tolist() == [0, 256, 512, 768]
    assert result.get_response()["id"] == "triton-1"

    fp32 = client.infer(checkpoint_name(client), [tensor], parameters={"output_dtype": "FP32"},
                        outputs=[triton.InferRequestedOutput("IMAGE_FEATURES", binary_data=True)])
    np.testing.assert_allclose(fp32.as_numpy("IMAGE_FEATURES"), reference.numpy(), rtol=1e-4, atol=1e-5)
    assert fp32.as_numpy("ROPE_CU_SEQLENS") is None  # not asked for
    client.close()


def checkpoint_name(client: triton.InferenceServerClient) -> str:
    return client.get_model_repository_index()[0]["name"]


def test_health_metadata_and_config_through_tritonclient(encoder, checkpoint: Path) -> None:
    client = triton.InferenceServerClient(encoder.url.removeprefix("http://"))
    name = checkpoint.name
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(name) and client.is_model_ready(name, "1")
    assert not client.is_model_ready("no-such-model")
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    metadata = client.get_model_metadata(name)
    assert metadata["name"] == name and metadata["versions"] == ["1"]
    assert {tensor["name"]: tensor["datatype"] for tensor in metadata["outputs"]} == {
        "IMAGE_FEATURES": "FP16", "ROPE_CU_SEQLENS": "INT32"}
    config = client.get_model_config(name, "1")
    assert config["max_batch_size"] == MAX_BATCH_SIZE
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] == 100_000
    assert client.get_model_repository_index() == [{"name": name, "version": "1", "state": "READY"}]
    with pytest.raises(InferenceServerException) as unknown:
        client.get_model_metadata(name, "3")
    assert unknown.value.status() == "404" and "unknown model" in unknown.value.message()
    client.close()


def test_concurrent_requests_share_forwards(encoder, checkpoint: Path) -> None:
    def send(data: bytes) -> int:
        with httpx.Client(base_url=encoder.url, timeout=60) as http:
            return http.post("/v1/encode", content=data, headers={"content-type": "image/jpeg"}).status_code

    with ThreadPoolExecutor(MAX_BATCH_SIZE) as pool:
        assert list(pool.map(send, [IMAGES[0]] * MAX_BATCH_SIZE)) == [200] * MAX_BATCH_SIZE
    client = triton.InferenceServerClient(encoder.url.removeprefix("http://"))
    stats = client.get_inference_statistics(checkpoint.name)["model_stats"][0]
    client.close()
    assert max(entry["batch_size"] for entry in stats["batch_stats"]) >= 2
    assert stats["inference_stats"]["success"]["count"] == MAX_BATCH_SIZE


def test_the_call_channel_gives_the_same_features_and_refuses_bad_images(encoder, reference: torch.Tensor) -> None:
    port = httpx.get(encoder.url + "/ready", timeout=10).json()["rpc_port"]

    async def scenario() -> None:
        client = RpcClient()
        try:
            request = proto.EncodeRequest(images=list(IMAGES), output_dtype="float32", request_id="rpc-1")
            message = proto.decode(await client.call(("127.0.0.1", port), "encode", proto.encode_chunks(request)),
                                   expect=proto.EncodeResponse)
            assert message.request_id == "rpc-1" and "total_ms" in message.timings
            torch.testing.assert_close(message.image.image_features, reference, rtol=1e-4, atol=1e-5)
            bad = proto.EncodeRequest(images=[IMAGES[0], b"not an image"])
            with pytest.raises(RpcFailed) as refused:
                await client.call(("127.0.0.1", port), "encode", proto.encode_chunks(bad))
            assert refused.value.status == 400
            assert json.loads(refused.value.body)["error"]["field"] == "images[1]"
        finally:
            await client.aclose()

    asyncio.run(scenario())
    metrics = httpx.get(encoder.url + "/metrics", timeout=10).text
    assert 'route="rpc:encode"' in metrics
