"""The Triton python-backend model (docker/triton/.../1/model.py) driven in-process.

``triton_python_backend_utils`` exists only inside Triton's backend stub, so a small
stand-in with the same names plays it here. The answers must be the encoder's own
computation: the bundled tower's forward on ``preprocess_batch`` pixels, cast to fp16.
The real server runs the same file in tests/integration/test_triton.py.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from encoder_server.model import load_vision_model
from encoder_server.preprocess import preprocess_batch
from services import triton_install
from services.demo.scenes import generate_scene
from services.launcher import BUNDLED_MODEL
from services.triton import ServerPorts, add_arguments, model_config_from_args, server_command
from services.triton_repository import (
    MODEL_NAME,
    PROJECT_ROOT,
    SHIPPED_REPOSITORY,
    TritonModelConfig,
    render_config,
    write_repository,
)

MODEL_FILE = SHIPPED_REPOSITORY / MODEL_NAME / "1" / "model.py"


class TritonError(Exception):
    INVALID_ARG, INTERNAL = 3, 13

    def __init__(self, message: str, code: int = INTERNAL) -> None:
        super().__init__(message)
        self.code = code


class Tensor:
    def __init__(self, name: str, array: np.ndarray) -> None:
        self._name, self._array = name, array

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self._array


class InferenceResponse:
    def __init__(self, output_tensors: list[Tensor], error: TritonError | None = None) -> None:
        self.outputs = {tensor.name(): tensor.as_numpy() for tensor in output_tensors}
        self.error = error


class Request:
    def __init__(self, **inputs: np.ndarray) -> None:
        self.inputs = {name: Tensor(name, array) for name, array in inputs.items()}


def stand_in_utils() -> types.ModuleType:
    module = types.ModuleType("triton_python_backend_utils")
    module.Tensor, module.InferenceResponse, module.TritonError = Tensor, InferenceResponse, TritonError
    module.get_input_tensor_by_name = lambda request, name: request.inputs.get(name)
    return module


@pytest.fixture(scope="module")
def model_module() -> types.ModuleType:
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "triton_python_backend_utils", stand_in_utils())
        patch.delenv("STEP37_TRITON_PYTHONPATH", raising=False)
        spec = importlib.util.spec_from_file_location("step37_vision_model", MODEL_FILE)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)  # binds the stand-in as the module's pb_utils
    return module


def initialize(model_module: types.ModuleType, **parameters: str):
    config = TritonModelConfig(instance_kind="KIND_CPU", model_dir=str(BUNDLED_MODEL))
    values = {"model_dir": config.model_dir, "insert_start_token": str(config.insert_start_token),
              "torch_threads": "0", **parameters}  # 0: leave this process's threads alone
    model = model_module.TritonPythonModel()
    model.initialize({"model_config": json.dumps({"name": MODEL_NAME, "max_batch_size": 8, "parameters": {
        key: {"string_value": value} for key, value in values.items()}}),
        "model_instance_kind": "CPU", "model_instance_device_id": "0"})
    return model


@pytest.fixture(scope="module")
def triton_model(model_module: types.ModuleType):
    return initialize(model_module)


@pytest.fixture(scope="module")
def tower():
    return load_vision_model(BUNDLED_MODEL, dtype=torch.float32, device="cpu")


def scene_png(seed: int) -> bytes:
    buffer = io.BytesIO()
    generate_scene(seed).image.save(buffer, format="PNG")
    return buffer.getvalue()


def image_input(images: list[bytes]) -> np.ndarray:
    return np.array(images, dtype=np.object_).reshape(-1, 1)  # [n, 1], as Triton hands BYTES over


def test_a_batch_of_requests_runs_as_one_forward_and_equals_the_encoder(triton_model, tower) -> None:
    images = [scene_png(7_700_000 + i) for i in range(3)]
    pixels = torch.linspace(-1.5, 1.5, 3 * 56 * 70).reshape(1, 3, 56, 70)
    forwards: list[list[int]] = []
    original = triton_model.model
    triton_model.model = lambda x: (forwards.append(list(x.shape)), original(x))[1]
    try:
        responses = triton_model.execute([
            Request(IMAGE=image_input(images[:2])),
            Request(IMAGE=image_input([b"not an image"])),
            Request(IMAGE=image_input(images[2:])),
            Request(PIXELS=pixels.numpy()),
        ])
    finally:
        triton_model.model = original
    assert forwards == [[3, 3, 224, 224], [1, 3, 56, 70]]  # the two IMAGE requests share one
    with torch.inference_mode():
        expected = tower(preprocess_batch(images, tower.config.image_size)).half().numpy()  # [3, 16, 256]
        expected_pixels = tower(pixels).half().numpy()  # [1, 2, 256]
    first, bad, third, given = responses
    assert first.error is None and third.error is None and given.error is None
    np.testing.assert_array_equal(first.outputs["IMAGE_FEATURES"], expected[:2])
    np.testing.assert_array_equal(third.outputs["IMAGE_FEATURES"], expected[2:])
    np.testing.assert_array_equal(given.outputs["IMAGE_FEATURES"], expected_pixels)
    assert first.outputs["ROPE_CU_SEQLENS"].tolist() == [0, 256, 512]  # [n + 1] per request
    assert first.outputs["ROPE_CU_SEQLENS"].dtype == np.int32
    assert third.outputs["ROPE_CU_SEQLENS"].tolist() == [0, 256]
    assert given.outputs["ROPE_CU_SEQLENS"].tolist() == [0, 20]  # a 4x5 patch grid
    assert bad.outputs == {} and bad.error.code == TritonError.INVALID_ARG
    assert str(bad.error).startswith("IMAGE[0]: not a supported image")


@pytest.mark.parametrize(("inputs", "message"), [
    ({}, "exactly one of the inputs IMAGE, PIXELS"),
    ({"PIXELS": np.zeros((1, 3, 50, 70), np.float32)}, "multiples of patch_size 14"),
    ({"PIXELS": np.full((1, 3, 14, 14), np.nan, np.float32)}, "NaN"),
])
def test_a_bad_request_fails_alone_with_invalid_arg(triton_model, inputs, message) -> None:
    bad, good = triton_model.execute([Request(**inputs), Request(IMAGE=image_input([scene_png(1)]))])
    assert bad.error.code == TritonError.INVALID_ARG and message in str(bad.error)
    assert good.error is None and good.outputs["IMAGE_FEATURES"].shape == (1, 16, 256)


def test_an_insert_token_that_disagrees_with_the_checkpoint_stops_the_load(model_module) -> None:
    with pytest.raises(ValueError, match="disagrees with im_start_token_id"):
        initialize(model_module, insert_start_token="999")


def test_the_shipped_config_is_the_rendered_default(tmp_path: Path) -> None:
    shipped = (SHIPPED_REPOSITORY / MODEL_NAME / "config.pbtxt").read_text()
    assert shipped == render_config(TritonModelConfig())
    assert "kind: KIND_GPU" in shipped and 'key: "insert_start_token", value: { string_value: "4" }' in shipped

    config = TritonModelConfig(instance_kind="KIND_CPU", max_batch_size=4, max_queue_delay_ms=2.5,
                               model_dir="/models/x", insert_start_token=9)
    repository = write_repository(tmp_path / "repository", config)
    written = (repository / MODEL_NAME / "config.pbtxt").read_text()
    assert "kind: KIND_CPU" in written and "max_batch_size: 4\n" in written
    assert "max_queue_delay_microseconds: 2500\n" in written and 'string_value: "/models/x"' in written
    assert (repository / MODEL_NAME / "1" / "model.py").read_bytes() == MODEL_FILE.read_bytes()
    with pytest.raises(ValueError, match="instance_kind"):
        TritonModelConfig(instance_kind="KIND_TPU")


# ---- the launcher's pieces (the real server: tests/integration/test_triton.py) ----------

def test_the_launcher_finds_the_wheel_or_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(triton_install.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(triton_install.TritonNotInstalled, match=r"pip install --no-deps nvidia-pytriton==0\.7\.0"):
        triton_install.find_triton()


def test_the_stub_import_path_puts_numpy_1_first(model_module, monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: Path) -> None:
    assert model_module.PYTHONPATH_ENV == triton_install.PYTHONPATH_ENV  # declared on both sides
    numpy_1 = tmp_path / "numpy-1"
    (numpy_1 / "numpy-1.26.4.dist-info").mkdir(parents=True)
    (numpy_1 / "numpy-1.26.4.dist-info" / "METADATA").write_text("Name: numpy\nVersion: 1.26.4\n")
    monkeypatch.setattr(triton_install.importlib.metadata, "version", lambda name: "2.1.0")
    with pytest.raises(triton_install.StubNumpyMissing, match="numpy < 2"):
        triton_install.stub_python_path([])
    path = triton_install.stub_python_path([str(numpy_1)])
    assert path[:2] == [str(numpy_1), str(PROJECT_ROOT)]


def test_the_server_command_binds_every_endpoint_to_the_host() -> None:
    install = triton_install.TritonInstall(Path("/t/bin/tritonserver"), Path("/t/python"), Path("/t/stub"),
                                           Path("/t/libs"))
    command = server_command(install, Path("/w/model_repository"), Path("/w/backends"),
                             ServerPorts("127.0.0.1", 8001, 8005, 8006), gpu=False, exit_timeout_s=5,
                             log_verbose=0)
    assert command[0] == "/t/bin/tritonserver" and "--model-repository=/w/model_repository" in command
    assert {"--http-address=127.0.0.1", "--grpc-address=127.0.0.1", "--metrics-address=127.0.0.1",
            "--http-port=8001", "--grpc-port=8005", "--metrics-port=8006"} <= set(command)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = model_config_from_args(parser.parse_args(["--device", "cpu", "--max-batch-size", "4"]))
    assert config == TritonModelConfig(max_batch_size=4, instance_kind="KIND_CPU", model_dir=str(BUNDLED_MODEL),
                                       insert_start_token=4)
