"""Checkpoint save/load for the LM worker: by-name round trip, key layout, merging with
the vision side's entries, sharded checkpoints, and one clear error per bad checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lm_worker.model.config import ConfigError, DecoderConfig
from lm_worker.model.decoder import Step37Decoder
from lm_worker.model.loading import CheckpointError, load_lm, save_pretrained


def tiny_config(**overrides) -> DecoderConfig:
    fields = dict(
        vocab_size=40, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
        head_dim=8, intermediate_size=64, max_position_embeddings=32, encoder_output_dim=24,
    )  # fmt: skip
    return DecoderConfig(**{**fields, **overrides})


def save_tiny(directory: Path, **overrides) -> tuple[Step37Decoder, dict[str, torch.Tensor]]:
    config = tiny_config(**overrides)
    torch.manual_seed(0)
    decoder = Step37Decoder(config)
    projector = torch.nn.Linear(
        config.encoder_output_dim, config.hidden_size, bias=config.projector_bias
    )
    save_pretrained(directory, decoder, projector.state_dict(), config)
    return decoder, projector.state_dict()


def logits(decoder: Step37Decoder) -> torch.Tensor:
    with torch.inference_mode():
        tokens = torch.tensor([[1, 5, 9, 2], [3, 3, 7, 0]])  # [B, S]
        return decoder(decoder.embed_tokens(tokens).transpose(0, 1))  # [S, B, V]


def checkpoint_keys(path: Path) -> set[str]:
    with safe_open(str(path), framework="pt") as handle:
        return set(handle.keys())


@pytest.mark.parametrize("overrides", [{}, {"tie_word_embeddings": True, "projector_bias": True}])
def test_save_load_round_trip_gives_identical_logits(tmp_path: Path, overrides: dict) -> None:
    decoder, projector_state = save_tiny(tmp_path, **overrides)
    loaded, loaded_projector, config = load_lm(tmp_path, device="cpu")
    assert config == decoder.config
    assert torch.equal(logits(loaded), logits(decoder))
    assert loaded_projector.keys() == projector_state.keys()
    for key, value in projector_state.items():
        assert torch.equal(loaded_projector[key], value)
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in loaded.parameters())


def test_checkpoint_keys_are_prefixed_and_complete(tmp_path: Path) -> None:
    decoder, _ = save_tiny(tmp_path)
    keys = checkpoint_keys(tmp_path / "model.safetensors")
    expected = {"language_model." + k for k in decoder.state_dict()} | {
        "vit_large_projector.weight"
    }
    assert keys == expected
    assert "language_model.layers.1.self_attn.k_proj.weight" in keys
    assert "language_model.lm_head.weight" in keys
    tied_dir = tmp_path / "tied"
    save_tiny(tied_dir, tie_word_embeddings=True)
    assert "language_model.lm_head.weight" not in checkpoint_keys(tied_dir / "model.safetensors")


def test_vision_entries_are_kept_on_save_and_ignored_on_load(tmp_path: Path) -> None:
    vision = {"vision_model.conv1.weight": torch.randn(8, 3, 14, 14)}
    save_file(vision, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"vision_config": {"width": 8}}))
    decoder, _ = save_tiny(tmp_path)

    config_json = json.loads((tmp_path / "config.json").read_text())
    assert config_json["vision_config"] == {"width": 8}
    assert config_json["text_config"] == decoder.config.to_dict()
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as handle:
        assert torch.equal(
            handle.get_tensor("vision_model.conv1.weight"), vision["vision_model.conv1.weight"]
        )
    loaded, _, _ = load_lm(tmp_path, device="cpu")
    assert torch.equal(logits(loaded), logits(decoder))


def test_sharded_checkpoint_with_index(tmp_path: Path) -> None:
    source = tmp_path / "single"
    decoder, _ = save_tiny(source)
    with safe_open(str(source / "model.safetensors"), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    names = sorted(tensors)
    shards = {
        "model-00001-of-00002.safetensors": names[::2],
        "model-00002-of-00002.safetensors": names[1::2],
    }
    weight_map = {}
    for file_name, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(sharded / file_name))
        weight_map.update(dict.fromkeys(keys, file_name))
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (sharded / "config.json").write_text((source / "config.json").read_text())

    loaded, _, _ = load_lm(sharded, device="cpu")
    assert torch.equal(logits(loaded), logits(decoder))

    (sharded / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="does not exist"):
        load_lm(sharded, device="cpu")


def test_mismatched_checkpoint_lists_every_problem_at_once(tmp_path: Path) -> None:
    save_tiny(tmp_path)
    path = tmp_path / "model.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    del tensors["language_model.layers.0.mlp.up_proj.weight"]
    tensors["language_model.layers.0.mlp.extra.weight"] = torch.zeros(2)
    tensors["vit_large_projector.weight"] = torch.zeros(32, 99)
    tensors["vision_model.anything"] = torch.zeros(1)  # not ours: neither error nor load
    save_file(tensors, str(path))

    with pytest.raises(CheckpointError) as info:
        load_lm(tmp_path, device="cpu")
    message = str(info.value)
    assert "missing keys (1): language_model.layers.0.mlp.up_proj.weight" in message
    assert "unexpected keys (1): language_model.layers.0.mlp.extra.weight" in message
    assert "vit_large_projector.weight [32, 99] (expected [32, 24])" in message
    assert "vision_model" not in message


def test_config_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="config.json not found"):
        load_lm(tmp_path, device="cpu")
    save_tiny(tmp_path)
    config_path = tmp_path / "config.json"
    config_json = json.loads(config_path.read_text())
    config_path.write_text(
        json.dumps({**config_json, "text_config": {**config_json["text_config"], "moe": 1}})
    )
    with pytest.raises(ConfigError, match="moe"):
        load_lm(tmp_path, device="cpu")
    config_path.write_text(json.dumps({"vision_config": {}}))
    with pytest.raises(CheckpointError, match="text_config"):
        load_lm(tmp_path, device="cpu")


def test_save_rejects_a_projector_that_does_not_fit(tmp_path: Path) -> None:
    config = tiny_config()
    with pytest.raises(CheckpointError, match="vit_large_projector.bias"):
        save_pretrained(
            tmp_path, Step37Decoder(config), torch.nn.Linear(24, 32, bias=True).state_dict(), config
        )
    assert not (tmp_path / "model.safetensors").exists()


def test_load_in_bfloat16_and_fusion_state_dict_prefix(tmp_path: Path) -> None:
    config = tiny_config()
    projector = torch.nn.Linear(24, 32, bias=False)
    fusion_style = {"align_projector." + k: v for k, v in projector.state_dict().items()}
    save_pretrained(tmp_path, Step37Decoder(config), fusion_style, config, dtype=torch.bfloat16)
    loaded, projector_state, _ = load_lm(tmp_path, dtype=torch.bfloat16, device="cpu")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert torch.equal(projector_state["weight"], projector.weight.to(torch.bfloat16))
