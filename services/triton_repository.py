"""The Triton model repository of the vision tower: its ``config.pbtxt`` and where ``model.py`` lives.

One model, ``step37_vision``, on Triton's python backend. Its ``1/model.py`` is the
file shipped in ``docker/triton/model_repository``; its ``config.pbtxt`` is rendered
here from a `TritonModelConfig`, so the shipped file (the defaults: ``KIND_GPU``) and
the copy ``step37-serve triton`` writes (its flags: device, batching, model directory)
come from one description. A unit test keeps the shipped file equal to the render.

The tensors are those of the encoder service's KServe route
(``encoder_server/kserve_metadata.py``), so the gateway's KServe transport talks to
either unchanged. Two differences come from Triton's batching rules and are explained
in the rendered file itself: ``IMAGE`` travels as ``[N, 1]``, and ``ROPE_CU_SEQLENS``
is declared per image but answered per request (``[N + 1]``).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "MODEL_NAME",
    "PROJECT_ROOT",
    "SHIPPED_REPOSITORY",
    "TritonModelConfig",
    "render_config",
    "write_repository",
]

MODEL_NAME = "step37_vision"
PROJECT_ROOT = Path(__file__).resolve().parent.parent
SHIPPED_REPOSITORY = PROJECT_ROOT / "docker" / "triton" / "model_repository"
INSTANCE_KINDS = ("KIND_GPU", "KIND_CPU")
# im_start_token_id of the bundled models/step37-tiny: what the shipped file publishes.
BUNDLED_INSERT_START_TOKEN = 4


@dataclass(frozen=True)
class TritonModelConfig:
    """What ``config.pbtxt`` says; the defaults are the shipped file."""

    max_batch_size: int = 8
    max_queue_delay_ms: float = 5.0
    instance_kind: str = "KIND_GPU"
    instance_count: int = 1
    # Empty: model.py falls back to $STEP37_MODEL, then to the bundled model.
    model_dir: str = ""
    insert_start_token: int = BUNDLED_INSERT_START_TOKEN
    torch_threads: int = 0  # 0: torch's default

    def __post_init__(self) -> None:
        if self.instance_kind not in INSTANCE_KINDS:
            raise ValueError(f"instance_kind must be one of {', '.join(INSTANCE_KINDS)}, got {self.instance_kind!r}")
        for name in ("max_batch_size", "instance_count"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_queue_delay_ms < 0 or self.torch_threads < 0:
            raise ValueError("max_queue_delay_ms and torch_threads must be >= 0")
        if '"' in self.model_dir or "\\" in self.model_dir:
            raise ValueError(f"model_dir must not contain quotes or backslashes, got {self.model_dir!r}")


def _parameter(key: str, value: object) -> str:
    return f'  {{ key: "{key}", value: {{ string_value: "{value}" }} }}'


def render_config(config: TritonModelConfig) -> str:
    """``config.pbtxt`` in protobuf text format."""
    parameters = ",\n".join([
        _parameter("model_dir", config.model_dir),
        _parameter("insert_start_token", config.insert_start_token),
        _parameter("torch_threads", config.torch_threads),
    ])
    return f"""\
# The Step3.7 vision tower on Triton's python backend (1/model.py runs the project's own
# preprocessing and tower). Rendered by services/triton_repository.py: `step37-serve triton`
# writes a copy with its flags; edit the renderer, not this file.
name: "{MODEL_NAME}"
backend: "python"
max_batch_size: {config.max_batch_size}
dynamic_batching {{
  max_queue_delay_microseconds: {round(config.max_queue_delay_ms * 1000)}
}}
instance_group [
  {{ kind: {config.instance_kind}, count: {config.instance_count} }}
]
# Exactly one of the two inputs, as on the encoder service's KServe route. With
# max_batch_size > 0 Triton prepends the batch dimension and refuses a request without
# it, so IMAGE travels as [N, 1] (the encoder service takes [N] and [N, 1]; the gateway
# sends [N, 1] to both).
input [
  {{ name: "IMAGE", data_type: TYPE_STRING, dims: [ 1 ], optional: true }},
  {{ name: "PIXELS", data_type: TYPE_FP32, dims: [ 3, -1, -1 ], optional: true }}
]
# IMAGE_FEATURES: [N, L, C] float16 (tritonclient misreads BF16); L and C are the tower's.
# ROPE_CU_SEQLENS belongs to a request, not to an image: [N + 1] int32 cumulative patch
# counts, starting at 0. Triton's batch dimension cannot express that, so it is declared
# [-1] (metadata: [-1, -1]); the python backend answers each request with its own
# tensors without checking them against these dims, so clients get the [N + 1] the
# encoder service sends.
output [
  {{ name: "IMAGE_FEATURES", data_type: TYPE_FP16, dims: [ -1, -1 ] }},
  {{ name: "ROPE_CU_SEQLENS", data_type: TYPE_INT32, dims: [ -1 ] }}
]
# insert_start_token is published for the gateway (KServe answers carry no token);
# model.py refuses to start when it disagrees with the checkpoint's im_start_token_id.
parameters [
{parameters}
]
"""


def write_repository(destination: Path, config: TritonModelConfig,
                     template: Path = SHIPPED_REPOSITORY) -> Path:
    """A model repository at ``destination``: the template's ``model.py``, a rendered config."""
    source = template / MODEL_NAME / "1" / "model.py"
    if not source.is_file():
        raise FileNotFoundError(f"{source}: the Triton model file is missing (pass the shipped "
                                "docker/triton/model_repository as the template)")
    version = destination / MODEL_NAME / "1"
    version.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, version / "model.py")
    (destination / MODEL_NAME / "config.pbtxt").write_text(render_config(config))
    return destination
