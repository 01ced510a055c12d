"""Size bounds for everything a peer controls on the wire.

Decoding checks these *before* allocating, so a hostile message costs at most its own
length in memory. Services may tighten them (settings); the defaults fit the full-size
Step3.7 geometry (16 images × 169 tokens × 6144 bf16 features ≈ 33 MB) with headroom.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DEFAULT_LIMITS", "WireLimits"]


@dataclass(frozen=True)
class WireLimits:
    max_message_bytes: int = 512 * 1024 * 1024
    max_tensor_elements: int = 256 * 1024 * 1024
    max_message_elements: int = 256 * 1024 * 1024
    max_tensor_rank: int = 4
    max_tensors: int = 1024
    max_list_len: int = 65_536
    max_str_len: int = 1024 * 1024
    max_map_len: int = 64
    max_images: int = 256

    def __post_init__(self) -> None:
        for name, value in self.__dict__.items():
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"WireLimits.{name} must be a positive int, got {value!r}")


DEFAULT_LIMITS = WireLimits()
