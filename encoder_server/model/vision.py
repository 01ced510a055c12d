"""The Step3.7 vision tower: Perception-Encoder G/14 with 2D RoPE, then two conv downsamplers.

Module attribute names mirror the HF checkpoint (`vision_model.*`) one to one, so
weights load by name with no mapping table: `model.state_dict()` keys are exactly the
checkpoint keys without the `vision_model.` prefix. The align projector that follows
(`vit_large_projector`) belongs to the LM worker, not here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from encoder_server.model.config import VisionConfig
from encoder_server.model.geometry import patch_grid
from encoder_server.model.rope2d import Rope2D, apply_rope2d

__all__ = ["Step37VisionModel"]

RopeTables = tuple[torch.Tensor, torch.Tensor] | None


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(1.702 x): the CLIP-era GELU approximation the weights were trained with."""
    return x * torch.sigmoid(1.702 * x)


class LayerScale(nn.Module):
    """Per-channel learned scale on a residual branch (`ls_*.gamma`)."""

    def __init__(self, width: int, init_value: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((width,), float(init_value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class VisionAttention(nn.Module):
    """Bidirectional multi-head self-attention with a fused qkv projection and 2D RoPE.

    The fused weight is stored as `in_proj_weight` / `in_proj_bias` (the
    nn.MultiheadAttention layout of the checkpoint) with q, k, v stacked in that order.
    """

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = width // heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, rope: RopeTables) -> torch.Tensor:
        batch, tokens, width = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # [B, T, 3W]
        qkv = qkv.view(batch, tokens, 3, self.heads, self.head_dim)  # [B, T, 3, h, hd]
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, h, T, hd]
        if rope is not None:
            cos, sin = rope
            q = apply_rope2d(q, cos, sin)
            k = apply_rope2d(k, cos, sin)
        out = F.scaled_dot_product_attention(
            q, k, v, is_causal=False, scale=self.head_dim**-0.5
        )  # [B, h, T, hd]
        out = out.transpose(1, 2).reshape(batch, tokens, width)  # [B, T, W]
        return self.out_proj(out)


class VisionMLP(nn.Module):
    def __init__(self, width: int, intermediate_size: int, hidden_act: str) -> None:
        super().__init__()
        self.c_fc = nn.Linear(width, intermediate_size)
        self.c_proj = nn.Linear(intermediate_size, width)
        self.act = quick_gelu if hidden_act == "quick_gelu" else F.gelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class ResidualAttentionBlock(nn.Module):
    """Pre-norm block: x += ls_1(attn(ln_1(x))); x += ls_2(mlp(ln_2(x)))."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        width = config.width
        self.ln_1 = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.attn = VisionAttention(width, config.heads)
        self.ln_2 = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.mlp = VisionMLP(width, config.intermediate_size, config.hidden_act)
        if config.ls_init_value is None:
            self.ls_1: nn.Module = nn.Identity()
            self.ls_2: nn.Module = nn.Identity()
        else:
            self.ls_1 = LayerScale(width, config.ls_init_value)
            self.ls_2 = LayerScale(width, config.ls_init_value)

    def forward(self, x: torch.Tensor, rope: RopeTables) -> torch.Tensor:
        x = x + self.ls_1(self.attn(self.ln_1(x), rope))
        return x + self.ls_2(self.mlp(self.ln_2(x)))


class VisionTransformer(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(config) for _ in range(config.layers))

    def forward(self, x: torch.Tensor, rope: RopeTables) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, rope)
        return x


class Step37VisionModel(nn.Module):
    """pixel_values [N, 3, H, W] -> image features [N, L, 4 * width].

    L = ceil(ceil(H/14 / 2) / 2) * ceil(ceil(W/14 / 2) / 2): 169 at 728 px, 81 at 504 px.
    Inputs at another resolution than `config.image_size` work: the absolute position
    embedding is bilinearly resampled and the RoPE tables cover any grid.
    """

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        width, grid = config.width, config.grid_size
        self.conv1 = nn.Conv2d(
            config.num_channels,
            width,
            kernel_size=config.patch_size,
            stride=config.patch_size,
            bias=False,
        )
        if config.use_cls_token:
            self.class_embedding = nn.Parameter(torch.empty(width))
        if config.use_abs_posemb:
            rows = grid * grid + int(config.use_cls_token)
            self.positional_embedding = nn.Parameter(torch.empty(rows, width))
        eps = config.layer_norm_eps
        self.ln_pre = nn.LayerNorm(width, eps=eps) if config.use_ln_pre else nn.Identity()
        self.transformer = VisionTransformer(config)
        self.ln_post = nn.LayerNorm(width, eps=eps) if config.use_ln_post else nn.Identity()
        self.rope = (
            Rope2D(
                config.head_dim,
                grid,
                grid,
                theta=config.rope_theta,
                rescale=config.rope_rescale,
                use_cls_token=config.use_cls_token,
            )
            if config.use_rope2d
            else None
        )
        self.vit_downsampler1 = nn.Conv2d(width, 2 * width, kernel_size=3, stride=2, padding=1)
        self.vit_downsampler2 = nn.Conv2d(2 * width, 4 * width, kernel_size=3, stride=2, padding=1)

    def _check_input(self, pixel_values: torch.Tensor) -> tuple[int, int]:
        channels = self.config.num_channels
        if pixel_values.ndim != 4 or pixel_values.shape[1] != channels:
            raise ValueError(
                f"pixel_values: expected shape [N, {channels}, H, W], "
                f"got {list(pixel_values.shape)}"
            )
        if not pixel_values.is_floating_point():
            raise ValueError(
                f"pixel_values: expected a floating-point tensor, got {pixel_values.dtype}"
            )
        height, width = pixel_values.shape[2:]
        try:
            return patch_grid(height, width, self.config.patch_size)
        except ValueError as exc:
            raise ValueError(f"pixel_values: {exc}") from exc

    def _sample_posemb(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """Absolute position embedding for a grid, [T, W]; resampled if not the trained grid."""
        posemb = self.positional_embedding
        trained = self.config.grid_size
        if grid_h == trained and grid_w == trained:
            return posemb
        cls_row, patch_rows = posemb[: int(self.config.use_cls_token)], posemb[-(trained**2) :]
        # Interpolate in float32: bf16 bilinear weights would blur the table further.
        table = patch_rows.float().reshape(1, trained, trained, -1)  # [1, G, G, W]
        table = table.permute(0, 3, 1, 2)  # [1, W, G, G]
        table = F.interpolate(table, size=(grid_h, grid_w), mode="bilinear", align_corners=False)
        table = table.permute(0, 2, 3, 1).reshape(grid_h * grid_w, -1)  # [Gh * Gw, W]
        return torch.cat([cls_row, table.to(posemb.dtype)], dim=0)  # [T, W]

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        grid_h, grid_w = self._check_input(pixel_values)
        batch = pixel_values.shape[0]
        # Preprocessing yields float32; the weights may be bf16/fp16.
        x = self.conv1(pixel_values.to(self.conv1.weight.dtype))  # [N, W, Gh, Gw]
        x = x.flatten(2).transpose(1, 2)  # [N, Gh * Gw, W]
        if self.config.use_cls_token:
            cls = self.class_embedding.to(x.dtype).expand(batch, 1, -1)  # [N, 1, W]
            x = torch.cat([cls, x], dim=1)  # [N, T, W], T = 1 + Gh * Gw
        if self.config.use_abs_posemb:
            x = x + self._sample_posemb(grid_h, grid_w)  # [N, T, W]
        x = self.ln_pre(x)
        rope = self.rope.cos_sin(grid_h, grid_w) if self.rope is not None else None
        x = self.transformer(x, rope)  # [N, T, W]
        x = self.ln_post(x)
        if self.config.use_cls_token:
            x = x[:, 1:]  # [N, Gh * Gw, W]
        x = x.transpose(1, 2).reshape(batch, self.config.width, grid_h, grid_w)  # [N, W, Gh, Gw]
        x = self.vit_downsampler1(x)  # [N, 2W, ceil(Gh/2), ceil(Gw/2)]
        x = self.vit_downsampler2(x)  # [N, 4W, Lh, Lw]
        # Contiguous: the features go straight to a C-order wire buffer.
        return x.flatten(2).transpose(1, 2).contiguous()  # [N, Lh * Lw, 4W]
