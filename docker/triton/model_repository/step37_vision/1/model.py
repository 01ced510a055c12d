"""The Step3.7 vision tower as a Triton python-backend model.

Everything that computes is the project's own: ``encoder_server.serving.load_model``
loads the tower (and checks the insert token against the checkpoint),
``encoder_server.preprocess`` turns encoded images into pixels, the tower's forward
makes the features, ``rope_cu_seqlens`` the RoPE offsets. This file only converts
between Triton's request objects and tensors, so its answers equal the encoder
service's (``tests/unit/test_triton_model.py``).

Triton's dynamic batcher hands ``execute`` several requests at once; their images run
as one forward per image size and each request gets its own rows back. A request with
a bad image fails alone, with Triton's INVALID_ARG (HTTP 400).

Configuration (``config.pbtxt`` parameters, read once in ``initialize``):
``model_dir`` (empty: ``$STEP37_MODEL``, else the bundled ``models/step37-tiny``),
``insert_start_token`` (what the gateway reads from the config; must match the
checkpoint) and ``torch_threads`` (0: torch's default). The instance kind picks the
device: ``KIND_GPU`` runs on that GPU in bf16, ``KIND_CPU`` on the CPU in fp32.

One environment variable, ``STEP37_TRITON_PYTHONPATH`` (``os.pathsep``-separated),
is read when this module is imported, not in ``initialize``: the backend stub imports
numpy right after this module and before ``initialize`` runs, and its embedded Python
ignores ``PYTHONPATH``. It puts the project's environment on the import path, with a
numpy < 2 first (the stub's pybind11 reads NumPy 1 array layouts). ``step37-serve
triton`` sets it; a Triton image that has the project and numpy < 2 installed needs
none.
"""

from __future__ import annotations

import json
import logging
import os
import sys

PYTHONPATH_ENV = "STEP37_TRITON_PYTHONPATH"
sys.path[:0] = [entry for entry in os.environ.get(PYTHONPATH_ENV, "").split(os.pathsep) if entry]

import torch  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

from encoder_server.errors import BadImage, ClientError  # noqa: E402
from encoder_server.model import rope_cu_seqlens  # noqa: E402
from encoder_server.preprocess import check_pixels, preprocess_batch  # noqa: E402
from encoder_server.serving import EncoderSettings, load_model  # noqa: E402
from proto import to_device  # noqa: E402
from services.launcher import BUNDLED_MODEL  # noqa: E402

logger = logging.getLogger("step37_vision")


class TritonPythonModel:
    """``initialize`` loads and warms the tower; ``execute`` answers a batch of requests."""

    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        parameters = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        threads = int(parameters.get("torch_threads") or 0)
        if threads > 0:
            torch.set_num_threads(threads)
        device = "cpu"
        if args["model_instance_kind"] == "GPU" and torch.cuda.is_available():
            device = f"cuda:{args['model_instance_device_id']}"
        token = parameters.get("insert_start_token")
        settings = EncoderSettings(
            model=parameters.get("model_dir") or os.environ.get("STEP37_MODEL") or str(BUNDLED_MODEL),
            device=device, insert_start_token=int(token) if token else None)
        loaded = load_model(settings)  # dtype: fp32 on the CPU, bf16 on a GPU
        self.model = loaded.model
        self.config = loaded.model.config
        self.device = torch.device(device)
        self.image_limits = settings.image_limits()
        size = self.config.image_size
        with torch.inference_mode():  # first-call allocations, before Triton reports READY
            self.model(torch.zeros(1, 3, size, size, device=self.device))
        logger.info("step37_vision: %s from %s on %s (%s)", loaded.name, settings.model, device,
                    next(self.model.parameters()).dtype)

    def execute(self, requests: list) -> list:
        """One response per request, in order; one forward per distinct image size."""
        pixels: list[torch.Tensor | None] = []
        responses: list = [None] * len(requests)
        for index, request in enumerate(requests):
            try:
                pixels.append(self._pixels(request))  # [n, 3, H, W] float32
            except ClientError as exc:
                pixels.append(None)
                responses[index] = _error(str(exc), pb_utils.TritonError.INVALID_ARG)
            except Exception as exc:
                logger.exception("step37_vision: preparing a request's input failed")
                pixels.append(None)
                responses[index] = _error(f"preprocessing failed ({type(exc).__name__})",
                                          pb_utils.TritonError.INTERNAL)
        groups: dict[tuple[int, int], list[int]] = {}
        for index, tensor in enumerate(pixels):
            if tensor is not None:
                groups.setdefault((int(tensor.shape[2]), int(tensor.shape[3])), []).append(index)
        for size, members in groups.items():
            try:
                features = self._forward(torch.cat([pixels[index] for index in members]))  # [B, L, C]
            except Exception as exc:
                logger.exception("step37_vision: forward of %d requests failed", len(members))
                for index in members:
                    responses[index] = _error(f"forward failed ({type(exc).__name__})",
                                              pb_utils.TritonError.INTERNAL)
                continue
            rows = features.split([int(pixels[index].shape[0]) for index in members])
            for index, request_features in zip(members, rows, strict=True):
                responses[index] = self._response(request_features, size)
        return responses

    def finalize(self) -> None:
        del self.model
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ---- per request ----------------------------------------------------------------

    def _pixels(self, request) -> torch.Tensor:
        """The request's one input as CLIP-normalised float32 [n, 3, H, W]."""
        image = pb_utils.get_input_tensor_by_name(request, "IMAGE")
        given = pb_utils.get_input_tensor_by_name(request, "PIXELS")
        if (image is None) == (given is None):
            raise BadImage("inputs", "give exactly one of the inputs IMAGE, PIXELS")
        if image is not None:
            encoded = [bytes(item) for item in image.as_numpy().reshape(-1)]  # [n, 1] -> n files
            return preprocess_batch(encoded, self.config.image_size, field="IMAGE", limits=self.image_limits)
        pixels = torch.from_numpy(given.as_numpy())  # [n, 3, H, W]; Triton checked dtype and rank
        return check_pixels(pixels, self.config.patch_size, self.image_limits, field="PIXELS")

    def _forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] float32 -> [B, L, C] float16 on the CPU."""
        with torch.inference_mode():
            features = self.model(to_device(pixels, self.device))  # [B, L, C]
            return features.to(torch.float16).cpu()

    def _response(self, features: torch.Tensor, size: tuple[int, int]):
        count = int(features.shape[0])
        cu_seqlens, _ = rope_cu_seqlens([size] * count, self.config.patch_size)  # [n + 1] int32
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("IMAGE_FEATURES", features.contiguous().numpy()),  # [n, L, C]
            pb_utils.Tensor("ROPE_CU_SEQLENS", cu_seqlens.numpy()),
        ])


def _error(message: str, code: int):
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message, code))
