"""Build, save and load the vision tower from HF-layout checkpoint directories.

A checkpoint directory holds `config.json` (the tower's settings under
`vision_config`) and `model.safetensors`, or shards listed by
`model.safetensors.index.json`. The tower's tensors carry the `vision_model.` prefix;
other prefixes in the same files (`language_model.*`, `vit_large_projector.*`) belong
to the LM worker and are skipped without being read. Weights are only ever read with
safetensors, never unpickled.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from encoder_server.model.config import VisionConfig
from encoder_server.model.vision import LayerScale, Step37VisionModel, VisionAttention

__all__ = [
    "CheckpointError",
    "init_random",
    "load_vision_config",
    "load_vision_model",
    "resolve_device",
    "resolve_dtype",
    "save_pretrained",
]

VISION_PREFIX = "vision_model."
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

_DTYPES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
}


class CheckpointError(ValueError):
    """A checkpoint directory that does not hold this tower; lists every problem at once."""


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`None` means the first GPU when there is one, else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """A torch dtype from a name (bf16/fp16/fp32) or dtype; `None` picks per device.

    The default is float32 on CPU, where bf16 matmuls are orders of magnitude slower,
    and bfloat16, the released weights' dtype, on accelerators.
    """
    if dtype is None:
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise ValueError(f"dtype must be one of bf16, fp16, fp32, got {dtype!r}")


def _empty_model(config: VisionConfig) -> Step37VisionModel:
    # Shapes without storage: nothing is allocated or randomly initialised twice.
    with torch.device("meta"):
        return Step37VisionModel(config)


def init_random(
    config: VisionConfig,
    seed: int = 0,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> Step37VisionModel:
    """A randomly initialised tower in eval mode, reproducible from `seed` on any device.

    Weights are drawn on the CPU in float32 from a private generator (the global RNG
    is untouched), then moved, so a seed means the same weights everywhere. Matrices
    use std = fan_in^-0.5 so activations keep their scale through the 47 layers and
    the downsamplers; LayerNorms start at identity, LayerScale at `ls_init_value`.
    """
    target = resolve_device(device)
    model = _empty_model(config).to_empty(device="cpu")
    generator = torch.Generator().manual_seed(seed)
    initialised: set[int] = set()

    def normal(param: nn.Parameter, std: float) -> None:
        param.data.normal_(0.0, std, generator=generator)
        initialised.add(id(param))

    def fill(param: nn.Parameter | None, value: float) -> None:
        if param is not None:
            param.data.fill_(value)
            initialised.add(id(param))

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                normal(module.weight, module.weight[0].numel() ** -0.5)
                fill(module.bias, 0.0)
            elif isinstance(module, nn.LayerNorm):
                fill(module.weight, 1.0)
                fill(module.bias, 0.0)
            elif isinstance(module, VisionAttention):
                normal(module.in_proj_weight, module.in_proj_weight.shape[1] ** -0.5)
                fill(module.in_proj_bias, 0.0)
            elif isinstance(module, LayerScale):
                fill(module.gamma, float(config.ls_init_value or 0.0))
        for name in ("positional_embedding", "class_embedding"):
            if hasattr(model, name):
                normal(getattr(model, name), config.width**-0.5)
    missed = [name for name, param in model.named_parameters() if id(param) not in initialised]
    if missed:
        raise RuntimeError(f"init_random has no rule for parameters: {missed}")
    model.to(device=target, dtype=resolve_dtype(dtype, target))
    return model.train(False).requires_grad_(False)


def save_pretrained(
    model: Step37VisionModel,
    directory: str | os.PathLike[str],
    config: VisionConfig | None = None,
    *,
    extra_config: Mapping[str, Any] | None = None,
    extra_tensors: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """Write `config.json` and `model.safetensors` with `vision_model.`-prefixed keys.

    `extra_config` / `extra_tensors` let a training script put the LM worker's parts
    (e.g. `language_model.*`) into the same checkpoint in one call. Files are written
    to a temporary name and renamed, so a crash never leaves a half-written file.
    """
    config = config or model.config
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {
        VISION_PREFIX + name: tensor.detach().to("cpu").contiguous()
        for name, tensor in model.state_dict().items()
    }
    for name, tensor in (extra_tensors or {}).items():
        if name.startswith(VISION_PREFIX) or name in tensors:
            raise ValueError(f"extra tensor {name!r} collides with the vision tower's keys")
        tensors[name] = tensor.detach().to("cpu").contiguous()
    document = {**(extra_config or {}), "vision_config": config.to_dict()}
    _atomic_write(out / CONFIG_FILE, lambda path: path.write_text(json.dumps(document, indent=2)))
    _atomic_write(
        out / WEIGHTS_FILE, lambda path: save_file(tensors, str(path), metadata={"format": "pt"})
    )


def _atomic_write(target: Path, write: Any) -> None:
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    os.close(handle)
    try:
        write(Path(temporary))
        os.chmod(temporary, 0o644)  # mkstemp creates 0600; a checkpoint is meant to be shared
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def load_vision_config(directory: str | os.PathLike[str]) -> VisionConfig:
    """The `vision_config` section of `<directory>/config.json`."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: not found")
    try:
        document = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable ({exc})") from exc
    if not isinstance(document, dict) or "vision_config" not in document:
        raise CheckpointError(f"{path}: no 'vision_config' section")
    try:
        return VisionConfig.from_dict(document["vision_config"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: vision_config: {exc}") from exc


def _weight_files(directory: Path) -> list[Path]:
    """Files that may hold `vision_model.*` tensors: from the index when there is one."""
    index_path = directory / INDEX_FILE
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index_path}: unreadable index ({exc})") from exc
        names = sorted({file for key, file in weight_map.items() if key.startswith(VISION_PREFIX)})
        for name in names:
            if Path(name).name != name:  # the index must not point outside the directory
                raise CheckpointError(f"{index_path}: shard name {name!r} is not a plain file name")
            if not (directory / name).is_file():
                raise CheckpointError(f"{index_path}: shard {name!r} is missing")
        return [directory / name for name in names]
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{directory}: no *.safetensors files")
    return files


def load_vision_model(
    directory: str | os.PathLike[str],
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> Step37VisionModel:
    """Load the tower from a checkpoint directory, in eval mode with gradients off.

    Every key and shape is checked against the model before any tensor data is read;
    all missing, unexpected and wrongly shaped keys are reported in one CheckpointError.
    """
    root = Path(directory)
    config = load_vision_config(root)
    target = resolve_device(device)
    target_dtype = resolve_dtype(dtype, target)
    model = _empty_model(config)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}

    sources: dict[str, tuple[Path, str]] = {}  # model name -> (file, checkpoint key)
    found: dict[str, tuple[int, ...]] = {}
    for path in _weight_files(root):
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                if not key.startswith(VISION_PREFIX):
                    continue
                name = key[len(VISION_PREFIX) :]
                if name in sources:
                    raise CheckpointError(f"{key} appears in both {sources[name][0]} and {path}")
                sources[name] = (path, key)
                found[name] = tuple(handle.get_slice(key).get_shape())
    _check_keys(root, expected, found)

    state: dict[str, torch.Tensor] = {}
    for path in sorted({path for path, _ in sources.values()}):
        with safe_open(str(path), framework="pt", device=str(target)) as handle:
            for name, (source, key) in sources.items():
                if source == path:
                    state[name] = handle.get_tensor(key).to(target_dtype)
    model.load_state_dict(state, strict=True, assign=True)
    if model.rope is not None:
        model.rope.to_empty(device=target)  # rebuilds the float32 tables on `target`
    return model.train(False).requires_grad_(False)


def _check_keys(
    root: Path, expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]]
) -> None:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    mismatched = sorted(
        f"{VISION_PREFIX}{name}: checkpoint {list(found[name])}, model {list(shape)}"
        for name, shape in expected.items()
        if name in found and found[name] != shape
    )
    problems = []
    if missing:
        problems.append("missing keys: " + ", ".join(VISION_PREFIX + k for k in missing))
    if unexpected:
        problems.append("unexpected keys: " + ", ".join(VISION_PREFIX + k for k in unexpected))
    if mismatched:
        problems.append("wrongly shaped keys: " + "; ".join(mismatched))
    if problems:
        raise CheckpointError(
            f"{root}: checkpoint does not match its vision_config:\n  " + "\n  ".join(problems)
        )
