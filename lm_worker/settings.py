"""Settings of the LM worker service, and loading the model they name.

Read once at start-up (CLI flags, then ``STEP37_*`` environment variables, see
``lm_worker.cli``); nothing below reads the environment.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from lm_worker.image_insert_embedding import ImageInsertEmbedding
from lm_worker.model import CheckpointError, DecoderConfig, Step37Decoder, load_lm
from lm_worker.tokens import Step37Tokenizer

__all__ = ["LMWorkerSettings", "LoadedModel", "load_model", "resolve_device", "resolve_dtype"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# config.json key → SpecialTokenIds field, as the released Step3.7 config names them.
_CONFIG_TOKEN_IDS = {"im_start_token_id": "im_start", "image_token_id": "im_patch",
                     "im_end_token_id": "im_end", "patch_start_token_id": "patch_start",
                     "patch_end_token_id": "patch_end"}


@dataclass(frozen=True)
class LMWorkerSettings:
    """Everything the service needs to start; ``model`` or ``preset`` + ``tokenizer``."""

    model: str | None = None
    preset: str | None = None
    tokenizer: str | None = None
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    max_batch_size: int = 16
    max_waiting: int = 256
    max_prefill_tokens: int = 4096  # per step; a longer prompt is prefilled in chunks (chunked prefill)
    max_seq_len: int = 0  # 0: the model's max_position_embeddings
    cuda_graphs: str = "auto"  # auto: decode steps replayed from CUDA graphs on a GPU; off: eager
    compile_steps: str = "off"  # on: decode steps and prefills compiled by Inductor at start-up (where no CUDA graphs run)
    prefix_cache_mb: int = 256  # keys and values of prompt prefixes kept for reuse (0: off)
    prefix_block_size: int = 16  # prompt positions per cached block
    feature_store_mb: int = 256  # image features kept for callers to name again (0: off)
    max_body_bytes: int = 64 * 1024 * 1024
    ready_timeout_s: float = 10.0
    internal_token: str | None = None  # required in x-internal-token on /v1/* when set

    def __post_init__(self) -> None:
        if (self.model is None) == (self.preset is None):
            raise ValueError("give exactly one of model (a checkpoint directory) or preset")
        if self.preset is not None and self.tokenizer is None:
            raise ValueError("a preset needs a tokenizer (path to tokenizer.json)")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be auto or one of {sorted(DTYPES)}, got {self.dtype!r}")
        for name in ("max_batch_size", "max_prefill_tokens", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if min(self.max_waiting, self.max_seq_len, self.prefix_cache_mb, self.feature_store_mb) < 0:
            raise ValueError("max_waiting, max_seq_len, prefix_cache_mb and feature_store_mb must be >= 0")
        if self.prefix_block_size < 1:
            raise ValueError(f"prefix_block_size must be >= 1, got {self.prefix_block_size}")
        if self.cuda_graphs not in ("auto", "off"):
            raise ValueError(f"cuda_graphs must be auto or off, got {self.cuda_graphs!r}")
        if self.compile_steps not in ("on", "off"):
            raise ValueError(f"compile_steps must be on or off, got {self.compile_steps!r}")
        if self.internal_token == "":
            raise ValueError("internal_token must not be empty (leave it unset to disable)")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> LMWorkerSettings:
        names = cls.__dataclass_fields__
        return cls(**{name: getattr(args, name) for name in names if hasattr(args, name)})

    @property
    def model_name(self) -> str:
        return Path(self.model).name if self.model else str(self.preset)

    def __repr__(self) -> str:  # keep the shared secret out of logs and tracebacks
        shown = {name: getattr(self, name) for name in self.__dataclass_fields__}
        if shown["internal_token"] is not None:
            shown["internal_token"] = "***"
        return f"LMWorkerSettings({', '.join(f'{k}={v!r}' for k, v in shown.items())})"


@dataclass
class LoadedModel:
    """The decoder, the fusion module that borrows its embedding, tokenizer and config."""

    decoder: Step37Decoder
    fusion: ImageInsertEmbedding
    tokenizer: Step37Tokenizer
    config: DecoderConfig


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: float32 on CPU (bf16 matmuls there are ~300x slower), bfloat16 on GPU."""
    if name == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    return DTYPES[name]


def load_model(settings: LMWorkerSettings) -> LoadedModel:
    """Load a checkpoint directory, or build a preset with seeded random weights."""
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    if settings.model is not None:
        directory = Path(settings.model)
        tokenizer = Step37Tokenizer.from_file(settings.tokenizer or directory / "tokenizer.json")
        _check_token_ids(directory, tokenizer)
        decoder, projector_state, config = load_lm(directory, dtype=dtype, device=device)
    else:
        tokenizer = Step37Tokenizer.from_file(str(settings.tokenizer))
        config = DecoderConfig.preset(str(settings.preset), vocab_size=tokenizer.vocab_size)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(settings.seed)
            decoder = Step37Decoder(config)
            projector_state = ImageInsertEmbedding(
                decoder.embed_tokens, config.encoder_output_dim, config.hidden_size, config.projector_bias
            ).align_projector.state_dict()
        decoder = decoder.to(device=device, dtype=dtype).train(False)
    if tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(
            f"tokenizer has {tokenizer.vocab_size} tokens, the decoder only {config.vocab_size}")
    decoder.requires_grad_(False)
    decoder.pack_joined_weights()  # serving only: the joined q/k/v and gate/up without a second copy
    fusion = ImageInsertEmbedding(decoder.embed_tokens, config.encoder_output_dim,
                                  config.hidden_size, config.projector_bias,
                                  placeholder_token_id=tokenizer.ids.im_patch, strict=True)
    fusion.align_projector.load_state_dict(projector_state)
    fusion = fusion.to(device=device, dtype=dtype).train(False).requires_grad_(False)
    return LoadedModel(decoder, fusion, tokenizer, config)


def _check_token_ids(directory: Path, tokenizer: Step37Tokenizer) -> None:
    """The ids the checkpoint was trained with must be the tokenizer's ids."""
    config_path = directory / "config.json"
    document = json.loads(config_path.read_text()) if config_path.is_file() else {}
    for key, name in _CONFIG_TOKEN_IDS.items():
        if key in document and int(document[key]) != getattr(tokenizer.ids, name):
            raise CheckpointError(
                f"{config_path}: {key}={document[key]} but the tokenizer has "
                f"{getattr(tokenizer.ids, name)} for {getattr(tokenizer.special_tokens, name)!r}"
            )
