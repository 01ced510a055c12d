"""Configuration of the Step3.7 text decoder (a dense LLaMA-style decoder).

One frozen dataclass holds every size the decoder and the align projector need, so a
checkpoint's ``config.json`` (key ``text_config``) fully determines the module tree and
weights load by name. The released Step-3.5 decoder is MoE with hybrid attention; this
project serves a dense decoder with the same ``decoder_input [S, B, H]`` interface, and
very large decoders belong to engines built for them (see ``backend.py``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

__all__ = ["ConfigError", "DecoderConfig"]


class ConfigError(ValueError):
    """A decoder config value is missing, unknown, of the wrong type or impossible.

    ``field`` names the offending field (``""`` when the problem is the whole mapping),
    ``value`` is what was found.
    """

    def __init__(self, field: str, message: str, value: Any = None) -> None:
        self.field = field
        self.value = value
        super().__init__(f"DecoderConfig.{field}: {message}" if field else message)


@dataclass(frozen=True)
class DecoderConfig:
    """Sizes of the text decoder and of the align projector that feeds it.

    ``hidden_size`` need not equal ``num_heads * head_dim`` (``o_proj`` maps between
    them), as in Step-3.5 and Gemma. ``encoder_output_dim`` is the width of the vision
    tower's output (``image_features [N, L, C]``, C = 4 x vision width after the two
    downsamplers); the projector maps it to ``hidden_size``.
    """

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    encoder_output_dim: int = 256
    projector_bias: bool = False

    # Presets leave out vocab_size on purpose: it comes from the tokenizer file.
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        # Pairs with the tiny vision tower: 16 tokens of 256 per 224-px image.
        "step37-tiny": {
            "hidden_size": 128,
            "num_layers": 4,
            "num_heads": 4,
            "num_kv_heads": 2,
            "head_dim": 32,
            "intermediate_size": 384,
            "max_position_embeddings": 512,
            "tie_word_embeddings": True,
            "encoder_output_dim": 256,
        },
        # Still CPU-trainable in minutes-to-hours; for captioning experiments that
        # outgrow the tiny model.
        "step37-small": {
            "hidden_size": 512,
            "num_layers": 8,
            "num_heads": 8,
            "num_kv_heads": 2,
            "head_dim": 64,
            "intermediate_size": 1536,
            "max_position_embeddings": 2048,
            "tie_word_embeddings": False,
            "encoder_output_dim": 256,
        },
    }

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def preset(cls, name: str, *, vocab_size: int, **overrides: Any) -> DecoderConfig:
        """A named preset with the tokenizer's ``vocab_size`` and optional overrides."""
        if name not in cls.PRESETS:
            raise ConfigError("", f"unknown preset {name!r}; known: {sorted(cls.PRESETS)}")
        return cls.from_dict({**cls.PRESETS[name], "vocab_size": vocab_size, **overrides})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DecoderConfig:
        """Build from a JSON mapping; unknown or missing keys are errors, not ignored.

        Silently ignoring an unknown key would load a checkpoint whose author meant
        something this decoder does not implement (e.g. a sliding window).
        """
        if not isinstance(data, dict):
            raise ConfigError("", f"expected a mapping, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(unknown[0], f"unknown key(s) {unknown}; known: {sorted(names)}")
        required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
        missing = [name for name in required if name not in data]
        if missing:
            raise ConfigError(missing[0], f"required key(s) missing: {missing}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable mapping that :meth:`from_dict` reads back unchanged."""
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Check types and invariants; raises :class:`ConfigError` naming the field."""
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.type in ("int", int):
                # bool is an int subclass; a JSON `true` for a size is a mistake.
                if not isinstance(value, int) or isinstance(value, bool):
                    raise ConfigError(field.name, "expected an integer", value)
                if value <= 0:
                    raise ConfigError(field.name, "must be positive", value)
            elif field.type in ("float", float):
                if not isinstance(value, (int, float)) or isinstance(value, bool):
                    raise ConfigError(field.name, "expected a number", value)
                if not value > 0:
                    raise ConfigError(field.name, "must be positive", value)
            elif field.type in ("bool", bool) and not isinstance(value, bool):
                raise ConfigError(field.name, "expected a boolean", value)
        if self.num_heads % self.num_kv_heads != 0:
            raise ConfigError(
                "num_kv_heads",
                f"must divide num_heads={self.num_heads} (grouped-query attention)",
                self.num_kv_heads,
            )
        if self.head_dim % 2 != 0:
            raise ConfigError("head_dim", "must be even (RoPE rotates pairs)", self.head_dim)

    @property
    def num_query_groups(self) -> int:
        """Query heads per key/value head."""
        return self.num_heads // self.num_kv_heads
