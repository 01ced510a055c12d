"""2D rotary position embedding of the Step3.7 (Perception-Encoder) vision tower.

Each head splits in two halves: the first rotates with the patch's column, the second
with its row, and rotation acts on adjacent channel pairs (x1, x2) -> (-x2, x1) rather
than on the two halves of the vector as in LLaMA-style RoPE. Getting either choice
wrong still produces plausible-looking features, which is why the tests compare against
an independent implementation.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = ["Rope2D", "apply_rope2d", "rope2d_angles", "rotate_half"]


def rope2d_angles(
    rows: torch.Tensor, cols: torch.Tensor, head_dim: int, theta: float, rescale: float
) -> torch.Tensor:
    """Rotation angles [P, head_dim] in float32 for patches at (rows[i], cols[i]).

    `theta' = theta * rescale ** (head_dim / (head_dim - 2))` is the NTK-style
    rescale of the released code; with rescale 1.0 it is plain `theta`.
    """
    axis_dim = head_dim // 2  # channels per axis
    scaled_theta = theta * rescale ** (head_dim / (head_dim - 2))
    exponents = torch.arange(0, axis_dim, 2, dtype=torch.float32, device=rows.device) / axis_dim
    inv_freq = 1.0 / scaled_theta**exponents  # [axis_dim / 2]
    col_angles = cols.to(torch.float32)[:, None] * inv_freq  # [P, axis_dim / 2]
    row_angles = rows.to(torch.float32)[:, None] * inv_freq  # [P, axis_dim / 2]
    # Each frequency drives one adjacent (x1, x2) pair, hence the interleaved repeat.
    col_angles = col_angles.repeat_interleave(2, dim=-1)  # [P, axis_dim]
    row_angles = row_angles.repeat_interleave(2, dim=-1)  # [P, axis_dim]
    return torch.cat([col_angles, row_angles], dim=-1)  # [P, head_dim], width part first


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Map each adjacent channel pair (x1, x2) to (-x2, x1)."""
    pairs = x.unflatten(-1, (-1, 2))  # [..., D / 2, 2]
    first, second = pairs.unbind(dim=-1)  # each [..., D / 2]
    return torch.stack((-second, first), dim=-1).flatten(-2)  # [..., D]


def apply_rope2d(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [..., T, head_dim] by float32 cos/sin [T, head_dim]; returns x's dtype.

    The product is formed in float32: in bf16 the rotation of large-angle positions
    loses enough precision to move attention patterns measurably.
    """
    x32 = x.to(torch.float32)
    return (x32 * cos + rotate_half(x32) * sin).to(x.dtype)


class Rope2D(nn.Module):
    """cos/sin tables for a patch grid, cached for the trained (largest) grid.

    The cache holds one row per patch of the max grid at index `r * max_w + c`; a
    smaller grid gathers its rows from it, a larger one (an image above the trained
    resolution) is computed on the fly from the same formula. The tables are
    non-persistent buffers, so they follow `.to(device)` but never enter a checkpoint.
    """

    cos: torch.Tensor
    sin: torch.Tensor

    def __init__(
        self,
        head_dim: int,
        max_grid_height: int,
        max_grid_width: int,
        theta: float = 10000.0,
        rescale: float = 1.0,
        use_cls_token: bool = False,
    ) -> None:
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"head_dim must be a multiple of 4 for 2D RoPE, got {head_dim}")
        self.head_dim = head_dim
        self.max_grid_height = max_grid_height
        self.max_grid_width = max_grid_width
        self.theta = theta
        self.rescale = rescale
        self.use_cls_token = use_cls_token
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self._build_cache(self.cos.device)

    def _angles(self, grid_h: int, grid_w: int, device: torch.device) -> torch.Tensor:
        rows = torch.arange(grid_h, device=device).repeat_interleave(grid_w)  # [Gh * Gw]
        cols = torch.arange(grid_w, device=device).repeat(grid_h)  # [Gh * Gw]
        return rope2d_angles(rows, cols, self.head_dim, self.theta, self.rescale)

    def _build_cache(self, device: torch.device) -> None:
        angles = self._angles(self.max_grid_height, self.max_grid_width, device)
        self.cos = angles.cos()  # [max_h * max_w, head_dim] float32
        self.sin = angles.sin()

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Rope2D:
        # `model.to(torch.bfloat16)` casts every floating buffer. The tables are derived
        # data, so rebuild them in float32 on whatever device the tensors moved to
        # (this also fills them after `to_empty` on a meta-initialised model).
        super()._apply(fn, recurse)
        self._build_cache(self.cos.device)
        return self

    def cos_sin(self, grid_h: int, grid_w: int) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 (cos, sin), each [T, head_dim]; T = grid_h * grid_w (+1 with CLS)."""
        if grid_h == self.max_grid_height and grid_w == self.max_grid_width:
            cos, sin = self.cos, self.sin
        elif grid_h <= self.max_grid_height and grid_w <= self.max_grid_width:
            device = self.cos.device
            rows = torch.arange(grid_h, device=device)[:, None]  # [Gh, 1]
            cols = torch.arange(grid_w, device=device)[None, :]  # [1, Gw]
            index = (rows * self.max_grid_width + cols).flatten()  # [Gh * Gw]
            cos, sin = self.cos[index], self.sin[index]
        else:
            angles = self._angles(grid_h, grid_w, self.cos.device)
            cos, sin = angles.cos(), angles.sin()
        if self.use_cls_token:
            # CLS sits before the patches at angle zero: cos 1, sin 0 leaves it unrotated.
            cos = torch.cat([cos.new_ones(1, self.head_dim), cos], dim=0)  # [1 + Gh*Gw, D]
            sin = torch.cat([sin.new_zeros(1, self.head_dim), sin], dim=0)  # [1 + Gh*Gw, D]
        return cos, sin

    def extra_repr(self) -> str:
        return (
            f"head_dim={self.head_dim}, max_grid=({self.max_grid_height}, "
            f"{self.max_grid_width}), theta={self.theta}, rescale={self.rescale}"
        )
