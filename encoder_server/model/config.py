"""Configuration of the Step3.7 vision tower (Perception-Encoder G/14 + two conv downsamplers).

One dataclass holds every number the tower's shapes depend on, so the model, the loader,
the batcher and the benchmarks derive geometry from the same place. Field names follow
the project's facts sheet; a few spellings seen in public HF configs are accepted as
aliases by :meth:`VisionConfig.from_dict` so real checkpoints load unchanged.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

from encoder_server.model.geometry import downsampled_side

__all__ = ["VisionConfig"]

SUPPORTED_ACTIVATIONS = ("quick_gelu", "gelu")

# HF spellings of the same fields, as found in public Step3.x vision configs.
_ALIASES: dict[str, str] = {
    "hidden_size": "width",
    "num_hidden_layers": "layers",
    "num_attention_heads": "heads",
    "rope_theta_rescale_factor": "rope_rescale",
}
# Keys that HF configs carry but that do not change this tower: accepted and dropped.
_IGNORED_KEYS = frozenset({"model_type", "transformers_version", "architectures", "torch_dtype"})


@dataclass
class VisionConfig:
    """Shapes and options of the vision tower; defaults are the released Step3.7 model."""

    width: int = 1536
    layers: int = 47
    heads: int = 16
    num_channels: int = 3
    image_size: int = 728
    patch_size: int = 14
    intermediate_size: int = 8960
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    use_cls_token: bool = False
    use_ln_pre: bool = True
    use_ln_post: bool = False
    use_abs_posemb: bool = True
    use_rope2d: bool = True
    rope_theta: float = 10000.0
    rope_rescale: float = 1.0
    # None disables LayerScale (no `ls_*.gamma` parameters), as in the PE code base.
    ls_init_value: float | None = 0.1

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "step37": {},
        # Same architecture at toy size: 224 px -> 16x16 grid -> 8 -> 4: 16 tokens of 256.
        "step37-tiny": {
            "image_size": 224,
            "patch_size": 14,
            "width": 64,
            "layers": 4,
            "heads": 4,
            "intermediate_size": 256,
        },
    }

    # ---- derived geometry -------------------------------------------------------------

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def grid_size(self) -> int:
        """Patches per side at the trained resolution (52 for 728 px / 14)."""
        return self.image_size // self.patch_size

    @property
    def output_dim(self) -> int:
        """Channels per output token: the second downsampler quadruples the width."""
        return 4 * self.width

    @property
    def tokens_per_image(self) -> int:
        """Output tokens for an image at `image_size` (169 for the released model)."""
        side = downsampled_side(self.grid_size)
        return side * side

    # ---- construction -----------------------------------------------------------------

    @classmethod
    def preset(cls, name: str) -> VisionConfig:
        """A named configuration: `step37` (released sizes) or `step37-tiny` (demo sizes)."""
        if name not in cls.PRESETS:
            known = ", ".join(sorted(cls.PRESETS))
            raise ValueError(f"unknown vision preset {name!r}; known presets: {known}")
        config = cls(**cls.PRESETS[name])
        config.validate()
        return config

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> VisionConfig:
        """Build from a `config.json` mapping; unknown keys are an error, not a silent drop.

        A silently ignored key is how a checkpoint with a different architecture loads
        into the wrong shapes, so anything not understood is refused by name.
        """
        if not isinstance(values, dict):
            raise TypeError(f"vision config must be a dict, got {type(values).__name__}")
        field_names = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        unknown: list[str] = []
        for key, value in values.items():
            if key in _IGNORED_KEYS:
                continue
            name = _ALIASES.get(key, key)
            if name == "mlp_ratio":
                continue  # resolved below, once width is known
            if name not in field_names:
                unknown.append(key)
                continue
            if name in kwargs:
                raise ValueError(f"vision config sets {name!r} twice (directly and via an alias)")
            kwargs[name] = value
        if unknown:
            known = ", ".join(sorted(field_names | set(_ALIASES) | {"mlp_ratio"}))
            raise ValueError(
                f"unknown vision config key(s): {', '.join(sorted(unknown))}; known keys: {known}"
            )
        if "mlp_ratio" in values:
            width = kwargs.get("width", cls.width)
            # The released code computes int(width * mlp_ratio); keep its truncation.
            from_ratio = int(width * values["mlp_ratio"])
            if kwargs.setdefault("intermediate_size", from_ratio) != from_ratio:
                raise ValueError(
                    f"intermediate_size ({kwargs['intermediate_size']}) disagrees with "
                    f"int(width * mlp_ratio) = {from_ratio}"
                )
        config = cls(**kwargs)
        config.validate()
        return config

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready mapping using this class's field names."""
        return dataclasses.asdict(self)

    # ---- checks -----------------------------------------------------------------------

    def validate(self) -> None:
        """Raise ValueError naming the first field whose value the tower cannot use."""
        for name in ("width", "layers", "heads", "num_channels", "image_size", "patch_size"):
            _require_positive_int(name, getattr(self, name))
        _require_positive_int("intermediate_size", self.intermediate_size)
        for name in ("use_cls_token", "use_ln_pre", "use_ln_post", "use_abs_posemb", "use_rope2d"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        for name in ("layer_norm_eps", "rope_theta", "rope_rescale"):
            _require_positive_float(name, getattr(self, name))
        if self.ls_init_value is not None:
            _require_positive_float("ls_init_value", self.ls_init_value)
        if self.hidden_act not in SUPPORTED_ACTIVATIONS:
            raise ValueError(
                f"hidden_act must be one of {SUPPORTED_ACTIVATIONS}, got {self.hidden_act!r}"
            )
        if self.width % self.heads:
            raise ValueError(f"width ({self.width}) must be divisible by heads ({self.heads})")
        if self.use_rope2d and self.head_dim % 4:
            # Half the head rotates with the column, half with the row, in (x1, x2) pairs.
            raise ValueError(
                f"heads: head_dim = width / heads = {self.head_dim} must be a multiple of 4 "
                "for the 2D RoPE"
            )
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size ({self.image_size}) must be a multiple of patch_size "
                f"({self.patch_size})"
            )


def _require_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _require_positive_float(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite positive number, got {value!r}")
