"""The Step3.7 vision tower against the facts sheet.

The reference below is written from STEP37_FACTS.md with explicit loops and einsums in
float64, without calling the module code it checks, so a shared misreading of the
facts (pair vs half rotation, width-first RoPE, row-major token order) cannot pass.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from encoder_server.model import (
    Rope2D,
    Step37VisionModel,
    VisionConfig,
    flops_per_image,
    init_random,
    rope_cu_seqlens,
)

# Released geometry (728 px, patch 14, 52x52 grid), toy width and depth.
NARROW_FULL_GEOMETRY = VisionConfig(width=32, layers=1, heads=2, intermediate_size=64)
# Small enough for the float64 reference: 112 px -> 8x8 grid, head_dim 16.
SMALL = VisionConfig(image_size=112, width=32, layers=2, heads=2, intermediate_size=48)


def randomised(config: VisionConfig, seed: int = 0) -> Step37VisionModel:
    """Every parameter random, LayerNorm and LayerScale included, so none can be skipped."""
    model = init_random(config, seed=seed, device="cpu")
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=generator))
    return model


# ---- the independent reference -----------------------------------------------------------


def ref_rope_angles(
    grid_h: int, grid_w: int, head_dim: int, theta: float, rescale: float, cls: bool
):
    d = head_dim // 2
    theta_scaled = theta * rescale ** (head_dim / (head_dim - 2))
    inv_freq = [1.0 / theta_scaled ** (2 * j / d) for j in range(d // 2)]
    rows = [[0.0] * head_dim] if cls else []
    for r in range(grid_h):
        for c in range(grid_w):
            width_part = [c * f for f in inv_freq for _ in range(2)]
            height_part = [r * f for f in inv_freq for _ in range(2)]
            rows.append(width_part + height_part)
    return torch.tensor(rows, dtype=torch.float64)  # [T, head_dim]


def ref_rotate(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """x [..., T, D]: each pair (x[2i], x[2i+1]) rotated by its angle."""
    out = torch.empty_like(x)
    cos, sin = angles.cos(), angles.sin()
    for i in range(0, x.shape[-1], 2):
        x1, x2 = x[..., i], x[..., i + 1]
        out[..., i] = x1 * cos[:, i] - x2 * sin[:, i]
        out[..., i + 1] = x2 * cos[:, i + 1] + x1 * sin[:, i + 1]
    return out


def ref_layer_norm(x, weight, bias, eps):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def ref_block(x: torch.Tensor, p: dict[str, torch.Tensor], prefix: str, config, angles):
    """One residual block in float64 from the facts; x [B, T, W]."""
    width, heads = config.width, config.heads
    head_dim = width // heads
    h = ref_layer_norm(x, p[prefix + "ln_1.weight"], p[prefix + "ln_1.bias"], config.layer_norm_eps)
    qkv = (
        torch.einsum("btw,ow->bto", h, p[prefix + "attn.in_proj_weight"])
        + p[prefix + "attn.in_proj_bias"]
    )
    q, k, v = qkv[..., :width], qkv[..., width : 2 * width], qkv[..., 2 * width :]
    out_heads = []
    for head in range(heads):
        cols = slice(head * head_dim, (head + 1) * head_dim)
        qh, kh, vh = (
            ref_rotate(q[..., cols], angles),
            ref_rotate(k[..., cols], angles),
            v[..., cols],
        )
        scores = torch.einsum("bqd,bkd->bqk", qh, kh) / math.sqrt(head_dim)
        out_heads.append(torch.einsum("bqk,bkd->bqd", scores.softmax(-1), vh))
    attn = torch.cat(out_heads, dim=-1)
    attn = (
        torch.einsum("btw,ow->bto", attn, p[prefix + "attn.out_proj.weight"])
        + p[prefix + "attn.out_proj.bias"]
    )
    x = x + p[prefix + "ls_1.gamma"] * attn
    h = ref_layer_norm(x, p[prefix + "ln_2.weight"], p[prefix + "ln_2.bias"], config.layer_norm_eps)
    h = torch.einsum("btw,ow->bto", h, p[prefix + "mlp.c_fc.weight"]) + p[prefix + "mlp.c_fc.bias"]
    h = h * torch.sigmoid(1.702 * h)
    h = (
        torch.einsum("bti,oi->bto", h, p[prefix + "mlp.c_proj.weight"])
        + p[prefix + "mlp.c_proj.bias"]
    )
    return x + p[prefix + "ls_2.gamma"] * h


def ref_bilinear_matrix(out_size: int, in_size: int) -> torch.Tensor:
    """Interpolation weights [out, in] of bilinear resize with align_corners=False."""
    m = torch.zeros(out_size, in_size, dtype=torch.float64)
    for i in range(out_size):
        src = max((i + 0.5) * in_size / out_size - 0.5, 0.0)
        lo = min(int(math.floor(src)), in_size - 1)
        hi = min(lo + 1, in_size - 1)
        frac = src - lo
        m[i, lo] += 1.0 - frac
        m[i, hi] += frac
    return m


def ref_posemb(table: torch.Tensor, trained: int, grid_h: int, grid_w: int) -> torch.Tensor:
    grid = table.reshape(trained, trained, -1)  # [r, c, W]
    resized = torch.einsum(
        "hr,rcw,vc->hvw",
        ref_bilinear_matrix(grid_h, trained),
        grid,
        ref_bilinear_matrix(grid_w, trained),
    )
    return resized.reshape(grid_h * grid_w, -1)


def ref_forward(model: Step37VisionModel, pixels: torch.Tensor) -> torch.Tensor:
    config = model.config
    p = {k: v.double() for k, v in model.state_dict().items()}
    n, _, height, width = pixels.shape
    ps = config.patch_size
    gh, gw = height // ps, width // ps
    patches = pixels.double().reshape(n, 3, gh, ps, gw, ps)
    x = torch.einsum("ncrhsw,ochw->nrso", patches, p["conv1.weight"]).reshape(n, gh * gw, -1)
    cls = int(config.use_cls_token)
    table = p["positional_embedding"]
    posemb = ref_posemb(table[cls:], config.grid_size, gh, gw)
    if cls:
        x = torch.cat([p["class_embedding"].expand(n, 1, -1), x], dim=1)
        posemb = torch.cat([table[:1], posemb])
    x = ref_layer_norm(x + posemb, p["ln_pre.weight"], p["ln_pre.bias"], config.layer_norm_eps)
    angles = ref_rope_angles(
        gh, gw, config.head_dim, config.rope_theta, config.rope_rescale, bool(cls)
    )
    for layer in range(config.layers):
        x = ref_block(x, p, f"transformer.resblocks.{layer}.", config, angles)
    x = x[:, cls:]
    spatial = torch.zeros(n, config.width, gh, gw, dtype=torch.float64)
    for r in range(gh):
        for c in range(gw):
            spatial[:, :, r, c] = x[:, r * gw + c]
    y = F.conv2d(
        spatial, p["vit_downsampler1.weight"], p["vit_downsampler1.bias"], stride=2, padding=1
    )
    y = F.conv2d(y, p["vit_downsampler2.weight"], p["vit_downsampler2.bias"], stride=2, padding=1)
    return torch.stack([y[:, :, r, c] for r in range(y.shape[2]) for c in range(y.shape[3])], dim=1)


# ---- geometry -------------------------------------------------------------------------------


def test_full_geometry_at_728_gives_169_tokens_of_four_times_width() -> None:
    model = init_random(NARROW_FULL_GEOMETRY, device="cpu")
    with torch.no_grad():
        out = model(torch.randn(2, 3, 728, 728))
    assert out.shape == (2, 169, 4 * 32)
    assert NARROW_FULL_GEOMETRY.tokens_per_image == 169
    assert VisionConfig().output_dim == 6144 and VisionConfig().tokens_per_image == 169
    assert out.is_contiguous()


def test_multicrop_504_gives_81_tokens() -> None:
    model = init_random(NARROW_FULL_GEOMETRY, device="cpu")
    with torch.no_grad():
        assert model(torch.randn(1, 3, 504, 504)).shape == (1, 81, 128)


def test_tokens_are_row_major_over_the_13x13_grid() -> None:
    """With attention and MLP silenced the tower is local: a change at patch (20, 40)
    reaches downsampled cell (5, 10) only, i.e. token 5 * 13 + 10."""
    model = init_random(NARROW_FULL_GEOMETRY, device="cpu")
    with torch.no_grad():
        block = model.transformer.resblocks[0]
        block.ls_1.gamma.zero_()
        block.ls_2.gamma.zero_()
        pixels = torch.randn(1, 3, 728, 728)
        changed = pixels.clone()
        changed[:, :, 20 * 14 : 21 * 14, 40 * 14 : 41 * 14] += 1.0
        delta = (model(changed) - model(pixels)).abs().amax(dim=-1)[0]
    assert delta.nonzero().flatten().tolist() == [5 * 13 + 10]


@pytest.mark.parametrize("size", [(112, 112), (84, 84), (112, 84), (140, 112)])
def test_matches_independent_reference(size: tuple[int, int]) -> None:
    model = randomised(SMALL)
    pixels = torch.randn(2, 3, *size)
    with torch.no_grad():
        out = model(pixels)
    expected = ref_forward(model, pixels)
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-4)


def test_matches_reference_with_cls_token_and_rope_rescale() -> None:
    config = VisionConfig(
        image_size=112, width=32, layers=1, heads=2, intermediate_size=48,
        use_cls_token=True, rope_rescale=2.5,
    )  # fmt: skip
    model = randomised(config, seed=3)
    pixels = torch.randn(1, 3, 84, 98)
    with torch.no_grad():
        out = model(pixels)
    torch.testing.assert_close(out.double(), ref_forward(model, pixels), rtol=1e-4, atol=1e-4)


def test_one_block_matches_reference() -> None:
    model = randomised(SMALL, seed=5)
    x = torch.randn(2, 64, 32)
    rope = model.rope.cos_sin(8, 8)
    with torch.no_grad():
        out = model.transformer.resblocks[1](x, rope)
    p = {k: v.double() for k, v in model.state_dict().items()}
    angles = ref_rope_angles(8, 8, 16, 10000.0, 1.0, cls=False)
    expected = ref_block(x.double(), p, "transformer.resblocks.1.", SMALL, angles)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("grid", "cls", "rescale"),
    [((8, 8), False, 1.0), ((5, 7), False, 1.0), ((6, 6), True, 3.0), ((9, 10), False, 1.0)],
)
def test_rope_tables_match_reference(grid: tuple[int, int], cls: bool, rescale: float) -> None:
    rope = Rope2D(
        head_dim=16, max_grid_height=8, max_grid_width=8, rescale=rescale, use_cls_token=cls
    )
    cos, sin = rope.cos_sin(*grid)
    angles = ref_rope_angles(*grid, 16, 10000.0, rescale, cls)
    assert cos.dtype == torch.float32
    torch.testing.assert_close(cos.double(), angles.cos(), rtol=0, atol=1e-6)
    torch.testing.assert_close(sin.double(), angles.sin(), rtol=0, atol=1e-6)


def test_rope_tables_stay_float32_when_the_model_is_cast() -> None:
    model = init_random(SMALL, device="cpu")
    before = model.rope.cos.clone()
    model.to(torch.bfloat16)
    assert model.rope.cos.dtype == torch.float32
    assert torch.equal(model.rope.cos, before)
    assert "rope" not in " ".join(model.state_dict())


def test_image_alone_equals_image_in_a_batch() -> None:
    model = randomised(SMALL)
    batch = torch.randn(3, 3, 112, 112)
    with torch.no_grad():
        together = model(batch)
        alone = model(batch[1:2])
    torch.testing.assert_close(alone, together[1:2], rtol=1e-5, atol=1e-5)


def test_posemb_is_resampled_only_off_the_trained_grid() -> None:
    model = randomised(SMALL)
    assert model._sample_posemb(8, 8) is model.positional_embedding
    resampled = model._sample_posemb(6, 10)
    expected = ref_posemb(model.positional_embedding.detach().double(), 8, 6, 10)
    assert resampled.shape == (60, 32)
    torch.testing.assert_close(resampled.double(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ((3, 112, 112), r"\[N, 3, H, W\]"),
        ((1, 4, 112, 112), r"\[N, 3, H, W\]"),
        ((1, 3, 100, 112), "multiples of patch_size 14"),
    ],
)
def test_bad_input_shape_is_refused_clearly(shape: tuple[int, ...], message: str) -> None:
    model = init_random(SMALL, device="cpu")
    with pytest.raises(ValueError, match=message):
        model(torch.zeros(shape))


def test_integer_pixels_are_refused() -> None:
    with pytest.raises(ValueError, match="floating-point"):
        init_random(SMALL, device="cpu")(torch.zeros(1, 3, 112, 112, dtype=torch.uint8))


def test_rope_cu_seqlens_counts_patches_per_image() -> None:
    cu_seqlens, max_len = rope_cu_seqlens([(728, 728), (504, 504), (728, 504)])
    assert cu_seqlens.dtype == torch.int32
    assert cu_seqlens.tolist() == [0, 2704, 2704 + 1296, 2704 + 1296 + 52 * 36]
    assert max_len == 2704
    empty, empty_max = rope_cu_seqlens([])
    assert empty.tolist() == [0] and empty_max == 0
    with pytest.raises(ValueError, match="multiples"):
        rope_cu_seqlens([(720, 728)])


@pytest.mark.parametrize("size", [(112, 112), (84, 140)])
def test_flops_estimate_matches_torch_flop_counter(size: tuple[int, int]) -> None:
    config = VisionConfig(
        image_size=112, width=32, layers=2, heads=2, intermediate_size=48, use_cls_token=True
    )
    model = init_random(config, device="cpu")
    # The math backend decomposes attention into matmuls the counter can see.
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, *size))
    assert flops_per_image(config, size) == counter.get_total_flops()


def test_released_flops_are_about_11_6_tflops() -> None:
    assert flops_per_image(VisionConfig()) == pytest.approx(11.63e12, rel=1e-3)


# ---- config ---------------------------------------------------------------------------------


def test_presets() -> None:
    full, tiny = VisionConfig.preset("step37"), VisionConfig.preset("step37-tiny")
    assert (full.width, full.layers, full.heads, full.head_dim, full.grid_size) == (
        1536,
        47,
        16,
        96,
        52,
    )
    assert (tiny.tokens_per_image, tiny.output_dim) == (16, 256)
    with pytest.raises(ValueError, match="unknown vision preset 'nope'"):
        VisionConfig.preset("nope")


def test_odd_grid_tokens_use_ceil() -> None:
    config = VisionConfig(image_size=15 * 14, width=32, layers=1, heads=2, intermediate_size=64)
    assert config.tokens_per_image == 4 * 4  # 15 -> 8 -> 4
    with torch.no_grad():
        assert init_random(config, device="cpu")(torch.zeros(1, 3, 210, 210)).shape[1] == 16


def test_config_dict_round_trip_and_errors() -> None:
    config = VisionConfig.preset("step37-tiny")
    assert VisionConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown vision config key.*widht"):
        VisionConfig.from_dict({"widht": 64})
    with pytest.raises(ValueError, match="heads"):
        VisionConfig.from_dict({"width": 64, "heads": 3})
    with pytest.raises(ValueError, match="image_size"):
        VisionConfig(image_size=100).validate()
    with pytest.raises(ValueError, match="hidden_act"):
        VisionConfig(hidden_act="relu").validate()


def test_hf_spellings_are_accepted() -> None:
    config = VisionConfig.from_dict(
        {"hidden_size": 1536, "num_attention_heads": 16, "num_hidden_layers": 47,
         "mlp_ratio": 8960 / 1536, "rope_theta_rescale_factor": 1.0, "model_type": "x"}
    )  # fmt: skip
    assert config == VisionConfig()
    with pytest.raises(ValueError, match="disagrees"):
        VisionConfig.from_dict({"intermediate_size": 100, "mlp_ratio": 4.0})
