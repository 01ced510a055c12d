"""Checkpoint I/O of the vision tower: HF key names, shards, strict checks, dtypes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from encoder_server.model import (
    CheckpointError,
    Step37VisionModel,
    VisionConfig,
    init_random,
    load_vision_model,
    save_pretrained,
)

CONFIG = VisionConfig(image_size=56, width=16, layers=2, heads=2, intermediate_size=32)

# Written out from the facts sheet, not derived from the model.
BLOCK_NAMES = [
    "attn.in_proj_weight",
    "attn.in_proj_bias",
    "attn.out_proj.weight",
    "attn.out_proj.bias",
    "ln_1.weight",
    "ln_1.bias",
    "ln_2.weight",
    "ln_2.bias",
    "ls_1.gamma",
    "ls_2.gamma",
    "mlp.c_fc.weight",
    "mlp.c_fc.bias",
    "mlp.c_proj.weight",
    "mlp.c_proj.bias",
]
HF_NAMES = {
    "vision_model." + name
    for name in [
        "conv1.weight",
        "ln_pre.weight",
        "ln_pre.bias",
        "positional_embedding",
        "vit_downsampler1.weight",
        "vit_downsampler1.bias",
        "vit_downsampler2.weight",
        "vit_downsampler2.bias",
        *(f"transformer.resblocks.{i}.{name}" for i in range(2) for name in BLOCK_NAMES),
    ]
}


@pytest.fixture
def model() -> Step37VisionModel:
    return init_random(CONFIG, seed=7, device="cpu")


@pytest.fixture
def pixels() -> torch.Tensor:
    return torch.randn(2, 3, 56, 56)


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}


def test_save_then_load_is_identical(tmp_path: Path, model, pixels) -> None:
    save_pretrained(model, tmp_path, CONFIG)
    assert set(read_tensors(tmp_path / "model.safetensors")) == HF_NAMES
    document = json.loads((tmp_path / "config.json").read_text())
    assert document["vision_config"] == CONFIG.to_dict()

    loaded = load_vision_model(tmp_path, device="cpu")
    assert loaded.config == CONFIG
    assert not loaded.training
    assert all(not p.requires_grad for p in loaded.parameters())
    with torch.no_grad():
        assert torch.equal(loaded(pixels), model(pixels))


def test_other_prefixes_are_ignored(tmp_path: Path, model, pixels) -> None:
    save_pretrained(
        model,
        tmp_path,
        extra_config={"hidden_size": 64, "text_config": {"layers": 2}},
        extra_tensors={
            "vit_large_projector.weight": torch.zeros(64, 64),
            "language_model.embed_tokens.weight": torch.zeros(10, 64),
        },
    )
    document = json.loads((tmp_path / "config.json").read_text())
    assert document["text_config"] == {"layers": 2}
    loaded = load_vision_model(tmp_path, device="cpu")
    with torch.no_grad():
        assert torch.equal(loaded(pixels), model(pixels))


def test_extra_tensors_must_not_shadow_the_tower(tmp_path: Path, model) -> None:
    with pytest.raises(ValueError, match="collides"):
        save_pretrained(
            model, tmp_path, extra_tensors={"vision_model.conv1.weight": torch.zeros(1)}
        )


def test_sharded_checkpoint_with_index(tmp_path: Path, model, pixels) -> None:
    save_pretrained(model, tmp_path / "single")
    tensors = read_tensors(tmp_path / "single" / "model.safetensors")
    names = sorted(tensors)
    shards = {
        "model-00001-of-00002.safetensors": {
            **{k: tensors[k] for k in names[::2]},
            "language_model.norm.weight": torch.ones(8),
        },
        "model-00002-of-00002.safetensors": {
            **{k: tensors[k] for k in names[1::2]},
            "vit_large_projector.weight": torch.ones(8, 64),
        },
    }
    out = tmp_path / "sharded"
    out.mkdir()
    weight_map = {}
    for file, shard in shards.items():
        save_file(shard, str(out / file))
        weight_map.update(dict.fromkeys(shard, file))
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (out / "config.json").write_text((tmp_path / "single" / "config.json").read_text())

    loaded = load_vision_model(out, device="cpu")
    with torch.no_grad():
        assert torch.equal(loaded(pixels), model(pixels))

    weight_map[names[0]] = "model-00003-of-00002.safetensors"
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(
        CheckpointError, match="shard 'model-00003-of-00002.safetensors' is missing"
    ):
        load_vision_model(out, device="cpu")

    weight_map[names[0]] = "../elsewhere.safetensors"
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match="not a plain file name"):
        load_vision_model(out, device="cpu")


def test_key_problems_are_listed_together(tmp_path: Path, model) -> None:
    save_pretrained(model, tmp_path)
    tensors = read_tensors(tmp_path / "model.safetensors")
    del tensors["vision_model.transformer.resblocks.1.ls_2.gamma"]
    tensors["vision_model.transformer.resblocks.2.ls_1.gamma"] = torch.ones(16)
    tensors["vision_model.conv1.weight"] = torch.zeros(16, 3, 16, 16)
    save_file(tensors, str(tmp_path / "model.safetensors"))

    with pytest.raises(CheckpointError) as caught:
        load_vision_model(tmp_path, device="cpu")
    message = str(caught.value)
    assert "missing keys: vision_model.transformer.resblocks.1.ls_2.gamma" in message
    assert "unexpected keys: vision_model.transformer.resblocks.2.ls_1.gamma" in message
    assert "vision_model.conv1.weight: checkpoint [16, 3, 16, 16], model [16, 3, 14, 14]" in message
    assert isinstance(caught.value, ValueError)


def test_config_problems(tmp_path: Path, model) -> None:
    with pytest.raises(CheckpointError, match="config.json: not found"):
        load_vision_model(tmp_path, device="cpu")
    save_pretrained(model, tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"vision_config": {"widht": 16}}))
    with pytest.raises(CheckpointError, match="widht"):
        load_vision_model(tmp_path, device="cpu")
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {}}))
    with pytest.raises(CheckpointError, match="no 'vision_config' section"):
        load_vision_model(tmp_path, device="cpu")


def test_no_weights_file(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"vision_config": CONFIG.to_dict()}))
    with pytest.raises(CheckpointError, match=r"no \*.safetensors files"):
        load_vision_model(tmp_path, device="cpu")


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [
        (None, torch.float32),
        ("bf16", torch.bfloat16),
        ("fp16", torch.float16),
        (torch.float32, torch.float32),
    ],
)
def test_dtype_option(tmp_path: Path, model, pixels, dtype, expected) -> None:
    save_pretrained(model, tmp_path)
    loaded = load_vision_model(tmp_path, dtype=dtype, device="cpu")
    assert {p.dtype for p in loaded.parameters()} == {expected}
    assert loaded.rope.cos.dtype == torch.float32
    with torch.no_grad():
        out = loaded(pixels)
    assert out.dtype == expected
    torch.testing.assert_close(out.float(), model(pixels), rtol=0.05, atol=0.05)


def test_unknown_dtype_is_refused(tmp_path: Path, model) -> None:
    save_pretrained(model, tmp_path)
    with pytest.raises(ValueError, match="dtype must be one of"):
        load_vision_model(tmp_path, dtype="int8", device="cpu")


def test_init_random_is_reproducible() -> None:
    first = init_random(CONFIG, seed=1, device="cpu").state_dict()
    again = init_random(CONFIG, seed=1, device="cpu").state_dict()
    other = init_random(CONFIG, seed=2, device="cpu").state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["conv1.weight"], other["conv1.weight"])
    assert torch.all(first["transformer.resblocks.0.ls_1.gamma"] == 0.1)
