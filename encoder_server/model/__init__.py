"""The Step3.7 vision tower: config, model, geometry helpers and checkpoint I/O.

Model code only: tensors and dataclasses in, tensors out; nothing here knows about HTTP.
"""

from encoder_server.model.config import VisionConfig
from encoder_server.model.geometry import (
    downsampled_side,
    flops_per_image,
    patch_grid,
    rope_cu_seqlens,
)
from encoder_server.model.loading import (
    CheckpointError,
    init_random,
    load_vision_config,
    load_vision_model,
    resolve_device,
    resolve_dtype,
    save_pretrained,
)
from encoder_server.model.rope2d import Rope2D
from encoder_server.model.vision import Step37VisionModel

__all__ = [
    "CheckpointError",
    "Rope2D",
    "Step37VisionModel",
    "VisionConfig",
    "downsampled_side",
    "flops_per_image",
    "init_random",
    "load_vision_config",
    "load_vision_model",
    "patch_grid",
    "resolve_device",
    "resolve_dtype",
    "rope_cu_seqlens",
    "save_pretrained",
]
