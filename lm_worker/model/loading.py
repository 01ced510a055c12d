"""Save and load the LM worker's half of a Step3.7 checkpoint directory.

Layout (shared with the encoder, which owns ``vision_model.*`` and ``vision_config``)::

    config.json                    {"text_config": {...DecoderConfig...}, "vision_config": ...}
    model.safetensors              language_model.*, vit_large_projector.*, vision_model.*
    model.safetensors.index.json   optional: {"weight_map": {key: shard file}} when sharded

Only safetensors is read (``safe_open``, tensor by tensor, skipping the vision keys
without materializing them); ``torch.load`` would execute pickled code from the file.
A checkpoint that does not match the config fails once, with every missing,
unexpected and wrong-shape key listed, instead of on the first mismatch.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lm_worker.model.config import DecoderConfig
from lm_worker.model.decoder import Step37Decoder

__all__ = ["CheckpointError", "load_lm", "save_pretrained"]

LANGUAGE_PREFIX = "language_model."
PROJECTOR_PREFIX = "vit_large_projector."
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_MAX_LISTED = 20


class CheckpointError(ValueError):
    """The checkpoint directory is incomplete or does not match its ``text_config``."""


def _listing(title: str, items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    more = f" (+{len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""
    return f"{title} ({len(items)}): {shown}{more}"


def expected_shapes(config: DecoderConfig) -> dict[str, tuple[int, ...]]:
    """Checkpoint key -> shape for the decoder and projector this config describes."""
    with torch.device("meta"):
        decoder = Step37Decoder(config)
    shapes = {LANGUAGE_PREFIX + k: tuple(v.shape) for k, v in decoder.state_dict().items()}
    shapes[PROJECTOR_PREFIX + "weight"] = (config.hidden_size, config.encoder_output_dim)
    if config.projector_bias:
        shapes[PROJECTOR_PREFIX + "bias"] = (config.hidden_size,)
    return shapes


def save_pretrained(
    directory: str | Path,
    decoder: Step37Decoder,
    projector_state: dict[str, torch.Tensor],
    config: DecoderConfig,
    *,
    dtype: torch.dtype | None = None,
) -> None:
    """Write ``text_config`` and the decoder + projector weights into ``directory``.

    ``projector_state`` is ``fusion.align_projector.state_dict()`` (keys ``weight``,
    ``bias``); keys prefixed ``align_projector.`` (from ``fusion.state_dict()``) are
    accepted too. Other components' entries already in ``config.json`` and
    ``model.safetensors`` (the vision tower's) are kept, so either side may save first.
    ``dtype`` casts floating tensors (e.g. ``torch.bfloat16`` for a GPU checkpoint).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if (directory / INDEX_FILE).exists():
        raise CheckpointError(
            f"{directory / INDEX_FILE} exists: cannot merge into a sharded checkpoint"
        )

    tensors = {LANGUAGE_PREFIX + k: v for k, v in decoder.state_dict().items()}
    for key, value in projector_state.items():
        tensors[PROJECTOR_PREFIX + key.removeprefix("align_projector.")] = value
    _check(tensors, expected_shapes(config))

    weights_path = directory / WEIGHTS_FILE
    if weights_path.exists():
        with safe_open(str(weights_path), framework="pt", device="cpu") as handle:
            for key in handle.keys():
                if not key.startswith((LANGUAGE_PREFIX, PROJECTOR_PREFIX)):
                    tensors[key] = handle.get_tensor(key)
    out = {}
    for key, value in tensors.items():
        value = value.detach().to("cpu")
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        out[key] = value.contiguous()
    tmp_path = weights_path.with_suffix(".safetensors.tmp")
    save_file(out, str(tmp_path), metadata={"format": "pt"})
    tmp_path.replace(weights_path)  # atomic: a crash never leaves half a checkpoint

    config_path = directory / CONFIG_FILE
    merged = json.loads(config_path.read_text()) if config_path.exists() else {}
    merged["text_config"] = config.to_dict()
    config_path.write_text(json.dumps(merged, indent=2, sort_keys=True) + "\n")


def _weight_files(directory: Path) -> list[Path]:
    index_path = directory / INDEX_FILE
    if index_path.exists():
        weight_map = json.loads(index_path.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index_path}: no 'weight_map' mapping")
        files = sorted({directory / name for name in weight_map.values()})
    else:
        files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors files in {directory}")
    for path in files:
        if not path.is_file():
            raise CheckpointError(f"weight file {path} listed in {INDEX_FILE} does not exist")
    return files


def _read_tensors(files: Iterable[Path]) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            for key in handle.keys():
                if not key.startswith((LANGUAGE_PREFIX, PROJECTOR_PREFIX)):
                    continue  # vision_model.* and anything else belongs to other services
                if key in tensors:
                    raise CheckpointError(f"key {key} appears in more than one weight file")
                tensors[key] = handle.get_tensor(key)
    return tensors


def _check(tensors: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]]) -> None:
    missing = sorted(set(shapes) - set(tensors))
    unexpected = sorted(set(tensors) - set(shapes))
    wrong = sorted(
        f"{k} {list(tensors[k].shape)} (expected {list(shapes[k])})"
        for k in set(shapes) & set(tensors)
        if tuple(tensors[k].shape) != shapes[k]
    )
    not_float = sorted(
        f"{k} ({tensors[k].dtype})"
        for k in set(shapes) & set(tensors)
        if not tensors[k].is_floating_point()
    )
    problems = [
        _listing(title, items)
        for title, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("wrong-shape keys", wrong),
            ("non-floating keys", not_float),
        )
        if items
    ]
    if problems:
        raise CheckpointError("checkpoint does not match text_config: " + "; ".join(problems))


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_lm(
    directory: str | Path,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> tuple[Step37Decoder, dict[str, torch.Tensor], DecoderConfig]:
    """Load the decoder, the projector state and the config from ``directory``.

    Returns ``(decoder, projector_state, config)``; ``projector_state`` has keys
    ``weight`` (and ``bias``) for ``fusion.align_projector.load_state_dict``. The
    device defaults to CUDA when available; the dtype to float32 on CPU (bf16 matmul
    there is ~300x slower than fp32) and bfloat16 on GPU.
    """
    directory = Path(directory)
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise CheckpointError(f"{config_path} not found")
    text_config = json.loads(config_path.read_text()).get("text_config")
    if text_config is None:
        raise CheckpointError(f"{config_path} has no 'text_config' key")
    config = DecoderConfig.from_dict(text_config)

    device = torch.device(device) if device is not None else _default_device()
    if dtype is None:
        dtype = torch.float32 if device.type == "cpu" else torch.bfloat16

    tensors = _read_tensors(_weight_files(directory))
    _check(tensors, expected_shapes(config))
    tensors = {k: v.to(device=device, dtype=dtype) for k, v in tensors.items()}

    with torch.device("meta"):
        decoder = Step37Decoder(config)
    # assign=True adopts the loaded tensors instead of copying into meta storage.
    decoder.load_state_dict(
        {
            k.removeprefix(LANGUAGE_PREFIX): v
            for k, v in tensors.items()
            if k.startswith(LANGUAGE_PREFIX)
        },
        strict=True,
        assign=True,
    )
    projector_state = {
        k.removeprefix(PROJECTOR_PREFIX): v
        for k, v in tensors.items()
        if k.startswith(PROJECTOR_PREFIX)
    }
    return decoder.train(False), projector_state, config
