"""Pure arithmetic on the tower's geometry: patch grids, token counts, RoPE offsets, FLOPs.

Kept free of nn.Module state so the batcher and the benchmarks can size work without
building a model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from encoder_server.model.config import VisionConfig

__all__ = ["downsampled_side", "flops_per_image", "patch_grid", "rope_cu_seqlens"]

# Both downsamplers: Conv2d(kernel 3, stride 2, padding 1).
_DOWNSAMPLER_KERNEL = 3
_DOWNSAMPLER_STRIDE = 2
_DOWNSAMPLER_PADDING = 1


def patch_grid(height: int, width: int, patch_size: int) -> tuple[int, int]:
    """(rows, cols) of patches; refuses sizes the patchify conv would silently crop."""
    if height <= 0 or width <= 0 or height % patch_size or width % patch_size:
        raise ValueError(
            f"image size {height}x{width} must be positive multiples of patch_size {patch_size}"
        )
    return height // patch_size, width // patch_size


def _conv_out(side: int) -> int:
    return (side + 2 * _DOWNSAMPLER_PADDING - _DOWNSAMPLER_KERNEL) // _DOWNSAMPLER_STRIDE + 1


def downsampled_side(grid_side: int) -> int:
    """Grid side after both downsamplers, ceil(ceil(G / 2) / 2): 52 -> 13, 36 -> 9, 15 -> 4."""
    return _conv_out(_conv_out(grid_side))


def rope_cu_seqlens(
    sizes: Sequence[tuple[int, int]], patch_size: int = 14
) -> tuple[torch.Tensor, int]:
    """Cumulative patch counts of a batch of images, for variable-length RoPE attention.

    `sizes` holds each image's (height, width) in pixels. Returns an int32 tensor
    [N + 1] starting at 0 whose i-th step is (H/14)*(W/14), and the largest step
    (`rope_max_seq_len`). These travel in `ImageForInsert` so a packed-sequence
    attention kernel downstream can find each image's patches.
    """
    counts = []
    for height, width in sizes:
        rows, cols = patch_grid(int(height), int(width), patch_size)
        counts.append(rows * cols)
    cu_seqlens = torch.zeros(len(counts) + 1, dtype=torch.int32)
    if counts:
        cu_seqlens[1:] = torch.cumsum(torch.tensor(counts, dtype=torch.int64), dim=0)
    return cu_seqlens, max(counts, default=0)


def flops_per_image(config: VisionConfig, image_size: int | tuple[int, int] | None = None) -> int:
    """Forward FLOPs for one image (2 x multiply-accumulates of matmuls and convs).

    Norms, activations, softmax and RoPE are left out: they are a fraction of a percent
    of the total and do not run on the tensor cores an MFU figure is measured against.
    The released tower at 728 px comes to about 11.6 TFLOPs per image (5.0 at 504 px).
    """
    if image_size is None:
        image_size = config.image_size
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    rows, cols = patch_grid(height, width, config.patch_size)
    patches = rows * cols
    tokens = patches + int(config.use_cls_token)
    hidden = config.width

    patchify = patches * hidden * config.num_channels * config.patch_size**2
    qkv = tokens * hidden * 3 * hidden
    scores_and_values = 2 * tokens * tokens * hidden  # q·kᵀ and p·v over all heads
    out_proj = tokens * hidden * hidden
    mlp = 2 * tokens * hidden * config.intermediate_size
    per_layer = qkv + scores_and_values + out_proj + mlp

    rows1, cols1 = _conv_out(rows), _conv_out(cols)
    rows2, cols2 = _conv_out(rows1), _conv_out(cols1)
    kernel_area = _DOWNSAMPLER_KERNEL**2
    downsampler1 = rows1 * cols1 * (2 * hidden) * hidden * kernel_area
    downsampler2 = rows2 * cols2 * (4 * hidden) * (2 * hidden) * kernel_area

    macs = patchify + config.layers * per_layer + downsampler1 + downsampler2
    return 2 * macs
