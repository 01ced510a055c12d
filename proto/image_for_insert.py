"""``ImageForInsert``: one image-insertion group, from the vision tower to the LM.

The dataclass is the seed's contract, field for field. It carries either raw
``images`` (``[N, 3, H, W]``, consumed by an in-process vision tower) or the tower's
``image_features`` — ``[N, L, C]``, or a list of ``[L, C]`` / ``[N_i, L, C]`` blocks so
images with different token counts ``L`` travel together — plus the per-image patch
``rope_cu_seqlens`` used by the tower's 2D RoPE. In the decoupled deployment the LM
worker only accepts it with ``image_features`` populated.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from proto.errors import BadTensor, InvalidValue, LimitExceeded, WrongType
from proto.fields import FieldReader
from proto.limits import DEFAULT_LIMITS
from proto.tensor import DecodeBudget, tensor_from_wire, tensor_to_wire

__all__ = ["ImageForInsert", "feature_blocks", "feature_nbytes"]

FeatureForm = torch.Tensor | list[torch.Tensor]


def feature_blocks(image_features: FeatureForm) -> Iterator[torch.Tensor]:
    """Yield one ``[L, C]`` tensor per image, whatever form the features came in."""
    blocks = [image_features] if isinstance(image_features, torch.Tensor) else image_features
    for block in blocks:
        if block.dim() == 2:
            yield block  # [L, C]
        else:
            yield from block.unbind(0)  # [N, L, C] → N × [L, C]


def feature_nbytes(image_features: FeatureForm | None) -> int:
    """Bytes of feature values, whatever form they came in (0 for none)."""
    if image_features is None:
        return 0
    return sum(block.numel() * block.element_size() for block in feature_blocks(image_features))


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or Inf in ``tensor``. For bfloat16, the wire's default, an exponent-bits test
    on its int16 view: a quarter of ``torch.isfinite``'s CPU time, which converts."""
    if tensor.dtype == torch.bfloat16:
        return not bool(((tensor.view(torch.int16) & 0x7F80) == 0x7F80).any())
    return bool(torch.isfinite(tensor).all())


@dataclass(eq=False)
class ImageForInsert:
    """Language-model insert payload for image / multicrop-patch features.

    ``insert_start_token`` is the id after which features are inserted (``<im_start>``
    for images, ``<patch_start>`` for multicrop patches); ``rope_max_seq_len`` is a
    plain int so the message stays serialisable.
    """

    insert_start_token: int
    images: torch.Tensor | None = None
    image_features: FeatureForm | None = None
    rope_cu_seqlens: torch.Tensor | None = None
    rope_max_seq_len: int | None = None

    # ---- derived facts -------------------------------------------------------------
    @property
    def num_images(self) -> int:
        if self.image_features is not None:
            return len(self.feature_lengths())
        if self.images is not None:
            return int(self.images.shape[0])
        return 0

    def feature_lengths(self) -> list[int]:
        """Token count ``L`` of each image, in order (host metadata: no device sync)."""
        if self.image_features is None:
            return []
        return [int(block.shape[0]) for block in feature_blocks(self.image_features)]

    @property
    def feature_dim(self) -> int | None:
        if self.image_features is None:
            return None
        blocks = [self.image_features] if isinstance(self.image_features, torch.Tensor) else self.image_features
        return int(blocks[0].shape[-1]) if blocks else None

    # ---- validation ----------------------------------------------------------------
    def validate(self, *, require_features: bool = False, check_finite: bool = False,
                 path: str = "") -> None:
        """Check internal consistency; raises a ``ProtocolError`` naming the field.

        ``check_finite`` scans every feature value (a full pass over the data), so
        receivers that feed a model enable it and forwarders skip it.
        """
        prefix = f"{path}." if path else ""
        if isinstance(self.insert_start_token, bool) or not isinstance(self.insert_start_token, int):
            raise WrongType(f"{prefix}insert_start_token", "an int", self.insert_start_token)
        if self.insert_start_token < 0:
            raise InvalidValue(f"{prefix}insert_start_token", "must be >= 0", self.insert_start_token)
        if self.images is not None and (self.images.dim() != 4 or self.images.shape[1] != 3):
            raise BadTensor(f"{prefix}images", f"expected [N, 3, H, W], got {list(self.images.shape)}")
        if self.image_features is None:
            if require_features:
                raise InvalidValue(f"{prefix}image_features", "required: run the vision tower first (got None)")
        else:
            self._validate_features(prefix, check_finite)
        if self.rope_cu_seqlens is not None:
            self._validate_rope(prefix)
        elif self.rope_max_seq_len is not None:
            raise InvalidValue(f"{prefix}rope_max_seq_len", "given without rope_cu_seqlens", self.rope_max_seq_len)

    def _validate_features(self, prefix: str, check_finite: bool) -> None:
        field = f"{prefix}image_features"
        features = self.image_features
        blocks = [features] if isinstance(features, torch.Tensor) else features
        if isinstance(features, torch.Tensor) and features.dim() != 3:
            raise BadTensor(field, f"expected [N, L, C], got shape {list(features.shape)}")
        if not isinstance(blocks, list) or not blocks:
            raise BadTensor(field, "expected a tensor [N, L, C] or a non-empty list of [L, C] / [N, L, C]")
        dim = None
        for i, block in enumerate(blocks):
            name = field if isinstance(features, torch.Tensor) else f"{field}[{i}]"
            if not isinstance(block, torch.Tensor) or block.dim() not in (2, 3):
                shape = list(block.shape) if isinstance(block, torch.Tensor) else type(block).__name__
                raise BadTensor(name, f"expected [L, C] or [N, L, C], got {shape}")
            if not block.is_floating_point():
                raise BadTensor(name, f"features must be floating point, got {block.dtype}")
            if dim is None:
                dim = block.shape[-1]
            elif block.shape[-1] != dim:
                raise BadTensor(name, f"feature dim {block.shape[-1]} differs from the first block's {dim}")
            if check_finite and not all_finite(block):
                raise BadTensor(name, "features contain NaN or Inf")

    def _validate_rope(self, prefix: str) -> None:
        field = f"{prefix}rope_cu_seqlens"
        cu = self.rope_cu_seqlens
        if cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 1:
            raise BadTensor(field, f"expected int32 [N+1], got {cu.dtype} {list(cu.shape)}")
        n = self.num_images
        if n and cu.numel() != n + 1:
            raise BadTensor(field, f"expected {n + 1} entries for {n} images, got {cu.numel()}")
        if cu.numel() > DEFAULT_LIMITS.max_images + 1:
            raise LimitExceeded(field, "entries", cu.numel(), DEFAULT_LIMITS.max_images + 1)
        values = cu.tolist()
        if values[0] != 0:
            raise InvalidValue(field, "must start at 0", values[0])
        diffs = [b - a for a, b in zip(values, values[1:], strict=False)]
        if any(d < 0 for d in diffs):
            raise InvalidValue(field, "must be non-decreasing", values)
        expected_max = max(diffs, default=0)
        if self.rope_max_seq_len is not None and self.rope_max_seq_len != expected_max:
            raise InvalidValue(
                f"{prefix}rope_max_seq_len",
                f"must equal the largest per-image patch count {expected_max}",
                self.rope_max_seq_len,
            )

    # ---- wire ----------------------------------------------------------------------
    def to_wire(self) -> dict[str, Any]:
        features = self.image_features
        if isinstance(features, list):
            wire_features: Any = [tensor_to_wire(block) for block in features]
        else:
            wire_features = tensor_to_wire(features) if features is not None else None
        return {
            "insert_start_token": self.insert_start_token,
            "images": tensor_to_wire(self.images) if self.images is not None else None,
            "image_features": wire_features,
            "rope_cu_seqlens": tensor_to_wire(self.rope_cu_seqlens) if self.rope_cu_seqlens is not None else None,
            "rope_max_seq_len": self.rope_max_seq_len,
        }

    @classmethod
    def from_wire(cls, obj: Any, budget: DecodeBudget, path: str = "") -> ImageForInsert:
        reader = FieldReader(obj, path, budget)
        features: FeatureForm | None = None
        if reader.has("image_features"):
            raw = reader.raw("image_features")
            name = reader.name("image_features")
            if isinstance(raw, list):
                limit = budget.limits.max_images
                if len(raw) > limit:
                    raise LimitExceeded(name, "feature blocks", len(raw), limit)
                features = [tensor_from_wire(block, f"{name}[{i}]", budget) for i, block in enumerate(raw)]
            else:
                features = tensor_from_wire(raw, name, budget)
        item = cls(
            insert_start_token=reader.int("insert_start_token", minimum=0),
            images=reader.tensor("images"),
            image_features=features,
            rope_cu_seqlens=reader.tensor("rope_cu_seqlens"),
            rope_max_seq_len=reader.int("rope_max_seq_len", None, minimum=0),
        )
        item.validate(path=path)
        if item.num_images > budget.limits.max_images:
            raise LimitExceeded(path or "image_features", "image count", item.num_images, budget.limits.max_images)
        return item
