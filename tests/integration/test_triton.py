"""The encoder tier on a real Triton Inference Server: ``step37-serve triton`` (python backend).

Skipped only where the nvidia-pytriton wheel, which carries Triton, is not installed
(``make install`` installs it). The server runs the bundled model on the CPU on free
loopback ports, polled on ``/v2/health/ready``. (a) ``tritonclient`` gets the tower's
own features for generated scenes, and concurrent requests share forwards through
Triton's dynamic batcher; (b) the gateway with ``--encoder-protocol kserve`` in front
of it and a real LM worker captions through HTTP exactly as the in-process pipeline
does on fp16 features.
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException

from encoder_server.model import load_vision_model
from encoder_server.preprocess import preprocess_batch
from services.common.procs import ServiceProcess
from services.demo.captions import score_captions
from services.demo.pipeline import InProcessCaptioner
from services.demo.scenes import generate_scene
from services.launcher import BUNDLED_MODEL
from services.triton_install import TritonNotInstalled, find_triton
from services.triton_repository import MODEL_NAME

HELD_OUT_SEED = 7_700_000  # scene seeds the trainer never draws from
MAX_BATCH_SIZE = 4
SINGLE_THREADED = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def png_bytes(seed: int) -> bytes:
    buffer = io.BytesIO()
    generate_scene(seed).image.save(buffer, format="PNG")
    return buffer.getvalue()


def wait_group_gone(service: ServiceProcess, timeout_s: float = 10.0) -> None:
    """The service's process group (launcher, tritonserver, backend stubs) has no member left."""
    assert service.process is not None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(service.process.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    raise AssertionError(f"processes of {service.name} outlived its stop")


@pytest.fixture(scope="module")
def triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    try:
        find_triton()
    except TritonNotInstalled as exc:
        pytest.skip(str(exc))
    directory = tmp_path_factory.mktemp("triton")
    # A long enough queue delay that concurrent requests reliably meet in one batch.
    service = ServiceProcess("triton", [
        "triton", "--device", "cpu", "--torch-threads", "1", "--max-batch-size", str(MAX_BATCH_SIZE),
        "--max-queue-delay-ms", "100", "--work-dir", str(directory / "work")],
        env=SINGLE_THREADED, log_path=str(directory / "triton.log"))
    try:
        service.start().wait_ready(180.0, path="/v2/health/ready")
        yield service
    finally:
        service.stop()
        wait_group_gone(service)


@pytest.fixture(scope="module")
def tower() -> torch.nn.Module:
    return load_vision_model(BUNDLED_MODEL, dtype=torch.float32, device="cpu")


def client_for(service: ServiceProcess) -> triton_http.InferenceServerClient:
    return triton_http.InferenceServerClient(service.url.removeprefix("http://"), network_timeout=60)


def image_input(images: list[bytes]) -> triton_http.InferInput:
    tensor = triton_http.InferInput("IMAGE", [len(images), 1], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=np.object_).reshape(-1, 1))
    return tensor


def test_tritonclient_gets_the_towers_features(triton: ServiceProcess, tower: torch.nn.Module) -> None:
    images = [png_bytes(HELD_OUT_SEED + i) for i in range(3)]
    with torch.inference_mode():
        expected = tower(preprocess_batch(images, tower.config.image_size)).numpy()  # [3, 16, 256]
    client = client_for(triton)
    result = client.infer(MODEL_NAME, [image_input(images)], request_id="triton-1")
    features = result.as_numpy("IMAGE_FEATURES")
    assert features.dtype == np.float16 and features.shape == (3, 16, 256)
    np.testing.assert_allclose(features.astype(np.float32), expected, rtol=2e-3, atol=2e-3)  # fp16 rounding
    assert result.as_numpy("ROPE_CU_SEQLENS").tolist() == [0, 256, 512, 768]
    assert result.get_response()["id"] == "triton-1"

    config = client.get_model_config(MODEL_NAME)
    assert config["parameters"]["insert_start_token"]["string_value"] == "4"
    assert config["instance_group"][0]["kind"] == "KIND_CPU" and config["max_batch_size"] == MAX_BATCH_SIZE
    with pytest.raises(InferenceServerException) as refused:
        client.infer(MODEL_NAME, [image_input([b"not an image"])])
    assert refused.value.status() == "400" and "IMAGE[0]: not a supported image" in refused.value.message()
    client.close()


def test_concurrent_requests_share_forwards(triton: ServiceProcess, tower: torch.nn.Module) -> None:
    images = [png_bytes(HELD_OUT_SEED + 10 + i) for i in range(MAX_BATCH_SIZE)]
    with torch.inference_mode():
        expected = tower(preprocess_batch(images, tower.config.image_size)).numpy()

    def infer_one(data: bytes) -> np.ndarray:
        client = client_for(triton)
        try:
            return client.infer(MODEL_NAME, [image_input([data])]).as_numpy("IMAGE_FEATURES")[0]
        finally:
            client.close()

    with ThreadPoolExecutor(MAX_BATCH_SIZE) as pool:
        features = np.stack(list(pool.map(infer_one, images)))
    np.testing.assert_allclose(features.astype(np.float32), expected, rtol=2e-3, atol=2e-3)
    client = client_for(triton)
    stats = client.get_inference_statistics(MODEL_NAME)["model_stats"][0]
    client.close()
    assert max(int(entry["batch_size"]) for entry in stats["batch_stats"]) >= 2


@pytest.fixture(scope="module")
def gateway(triton: ServiceProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    logs = tmp_path_factory.mktemp("triton-gateway")
    lm = ServiceProcess("lm-worker", ["lm-worker", "--model", str(BUNDLED_MODEL), "--device", "cpu",
                                      "--torch-threads", "1"], env=SINGLE_THREADED,
                        log_path=str(logs / "lm-worker.log"))
    started = [lm]
    try:
        lm.start().wait_ready(120.0)
        gateway = ServiceProcess("gateway", ["gateway", "--encoder-url", triton.url, "--lm-url", lm.url,
                                             "--encoder-protocol", "kserve", "--encoder-model", MODEL_NAME],
                                 log_path=str(logs / "gateway.log"))
        started.append(gateway)
        gateway.start().wait_ready(60.0)  # its /ready probes Triton's model and the LM worker
        yield gateway
    finally:
        for service in reversed(started):
            service.stop()


def test_the_gateway_captions_through_triton(gateway: ServiceProcess) -> None:
    seeds = [HELD_OUT_SEED + 200 + i for i in range(4)]
    images = [png_bytes(seed) for seed in seeds]
    # The KServe path ships fp16 features: rounding to fp16 makes the pipeline exact.
    reference = InProcessCaptioner.from_pretrained(BUNDLED_MODEL, device="cpu", wire_dtype=torch.float16)
    expected = reference.caption(images)
    with httpx.Client(base_url=gateway.url, timeout=120) as client:
        answers = [client.post("/v1/captions", files={"file": ("scene.png", data, "image/png")})
                   for data in images]
    assert all(answer.status_code == 200 for answer in answers), [answer.text for answer in answers]
    served = [answer.json()["captions"][0] for answer in answers]
    assert served == expected  # greedy decoding: Triton and the wire change no caption
    scores = score_captions(served, [generate_scene(seed) for seed in seeds])
    assert scores["exact_match"] >= 0.75, (served, scores)  # the bundled model: ~97 %
