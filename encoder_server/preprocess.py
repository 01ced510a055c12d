"""Image preprocessing for the vision tower: whatever came in -> CLIP-normalised [3, S, S].

The pipeline is the one the released model was trained with: RGB, `resize((S, S),
BILINEAR)` (no aspect-preserving crop), /255, CLIP mean/std. Everything around it is
about untrusted input: the header is read first (`Image.open` is lazy) and an image
whose declared size is over the limits is refused before a pixel is decoded, only a
short list of formats is parsed at all, and every failure becomes a `BadImage` naming
the request field.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from encoder_server.errors import BadImage, ImageTooLarge
from encoder_server.model.geometry import patch_grid

__all__ = [
    "ALLOWED_FORMATS",
    "CLIP_MEAN",
    "CLIP_STD",
    "ImageInput",
    "ImageLimits",
    "check_pixels",
    "decode_image",
    "normalise_levels",
    "preprocess_batch",
    "preprocess_image",
    "rgb_levels",
    "to_rgb",
]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Formats Pillow may parse. Pillow knows dozens more (some, like EPS, shell out to
# other programs); a vision API has no use for them, so they are never tried.
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")

# Leading bytes of the allowed formats (WebP, whose tag sits at offset 8, aside): a file
# that starts like one but does not open is a damaged file, not an unsupported one.
_SIGNATURES = (("PNG", b"\x89PNG\r\n\x1a\n"), ("JPEG", b"\xff\xd8\xff"), ("GIF", b"GIF87a"),
               ("GIF", b"GIF89a"), ("BMP", b"BM"))

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})

ImageInput = bytes | bytearray | memoryview | Image.Image | torch.Tensor

_MEAN = np.asarray(CLIP_MEAN, dtype=np.float32)
_STD = np.asarray(CLIP_STD, dtype=np.float32)
# Every 8-bit level of each channel, CLIP-normalised: [3, 256] float32. Normalising a
# decoded image is then a table lookup with the same values as the arithmetic
# ``(level / 255 - mean) / std`` done in float32, without the arithmetic per pixel.
_LEVELS = (np.arange(256, dtype=np.float32)[None, :] / 255.0 - _MEAN[:, None]) / _STD[:, None]


@dataclass(frozen=True)
class ImageLimits:
    """Ceilings checked against an image's declared size before it is decoded.

    40 megapixels is ~160 MB of RGBA while decoding; `max_side` stops extreme aspect
    ratios that stay under the pixel budget. Pillow's own bomb check still applies
    above 2 x `PIL.Image.MAX_IMAGE_PIXELS` (~179 MP) whatever is configured here.
    """

    max_pixels: int = 40_000_000
    max_side: int = 16_384

    def check(self, width: int, height: int, field: str) -> None:
        size = f"{width}x{height}"
        if width > self.max_side or height > self.max_side:
            raise ImageTooLarge(field, f"{size} has a side over {self.max_side} px", value=size)
        if width * height > self.max_pixels:
            raise ImageTooLarge(
                field, f"{size} is over the {self.max_pixels} pixel limit", value=size
            )


DEFAULT_LIMITS = ImageLimits()


def decode_image(
    data: bytes | bytearray | memoryview,
    *,
    field: str = "image",
    limits: ImageLimits = DEFAULT_LIMITS,
) -> Image.Image:
    """Decode encoded bytes (first frame of animations) after checking the header's size."""
    if len(data) == 0:
        raise BadImage(field, "empty image data")
    try:
        image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)  # header only
    except UnidentifiedImageError as exc:
        claimed = _claimed_format(data)
        if claimed is not None:  # Pillow says "cannot identify" for a damaged header too
            raise BadImage(field, f"truncated or corrupt {claimed} header") from exc
        allowed = ", ".join(ALLOWED_FORMATS)
        raise BadImage(field, f"not a supported image (expected one of {allowed})") from exc
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(field, str(exc)) from exc
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise BadImage(field, f"truncated or corrupt image header ({exc})") from exc
    limits.check(image.width, image.height, field)
    _load(image, field)
    return image


def _claimed_format(data: bytes | bytearray | memoryview) -> str | None:
    """The allowed format whose signature ``data`` starts with, if any."""
    head = bytes(data[:12])
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "WEBP"
    return next((fmt for fmt, magic in _SIGNATURES if head.startswith(magic)), None)


def _load(image: Image.Image, field: str) -> None:
    """Decode a lazily opened image (frame 0 only) so corrupt data fails here, by name."""
    try:
        image.load()
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise BadImage(field, f"truncated or corrupt {image.format or 'image'} ({exc})") from exc


def to_rgb(image: Image.Image, *, field: str = "image") -> Image.Image:
    """Upright 8-bit RGB: EXIF orientation applied, transparency composited on white.

    White, not black, because `convert("RGB")` would expose whatever colour sits
    under transparent pixels (often black), which turns a logo on a transparent
    background into a black square; white matches how viewers show it.
    """
    try:
        image = ImageOps.exif_transpose(image)
    except (OSError, ValueError, SyntaxError, KeyError, TypeError) as exc:
        raise BadImage(field, f"unreadable EXIF orientation ({exc})") from exc
    if image.mode in _SIXTEEN_BIT_MODES:
        image = _sixteen_bit_to_l(image)
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode == "RGB":
        return image
    try:
        return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, ...
    except ValueError as exc:
        raise BadImage(field, f"unsupported colour mode {image.mode}") from exc


def _sixteen_bit_to_l(image: Image.Image) -> Image.Image:
    # Pillow's convert clips 16-bit values at 255 (nearly everything turns white);
    # scale the 0..65535 range to 0..255 instead, rounding to nearest.
    values = np.clip(np.asarray(image, dtype=np.int64), 0, 65535)
    return Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8))


def preprocess_image(
    image: ImageInput,
    size: int = 728,
    *,
    field: str = "image",
    limits: ImageLimits = DEFAULT_LIMITS,
) -> torch.Tensor:
    """One image -> float32 [3, size, size], resized and CLIP-normalised.

    Accepts encoded bytes (JPEG, PNG, WebP, GIF, BMP), a PIL image, or a tensor
    [3, H, W] / [1, H, W] of uint8 (0..255) or float (0..1) pixel values.
    """
    if isinstance(image, torch.Tensor):
        unit_range = _resize_tensor(image, size, field, limits)  # [S, S, 3] in 0..1
    else:
        if isinstance(image, (bytes, bytearray, memoryview)):
            image = decode_image(image, field=field, limits=limits)
        elif isinstance(image, Image.Image):
            limits.check(image.width, image.height, field)
            _load(image, field)  # a caller's Image.open() result may not be decoded yet
        else:
            raise BadImage(field, f"unsupported image input type {type(image).__name__}")
        return torch.from_numpy(_normalise_array(rgb_levels(image, size, field=field)))  # [3, S, S]
    normalised = (unit_range - _MEAN) / _STD  # [S, S, 3]
    return torch.from_numpy(np.ascontiguousarray(normalised.transpose(2, 0, 1)))  # [3, S, S]


def rgb_levels(image: Image.Image, size: int, *, field: str = "image") -> np.ndarray:
    """A decoded image as upright RGB resized to ``size`` × ``size``: 8-bit levels [S, S, 3]."""
    return np.asarray(to_rgb(image, field=field).resize((size, size), Image.Resampling.BILINEAR))


def normalise_levels(levels: torch.Tensor) -> torch.Tensor:
    """8-bit RGB levels ``[..., S, S, 3]`` (uint8) → CLIP-normalised float32 ``[..., 3, S, S]``
    on the levels' device: the values :func:`preprocess_image` gives, by the same table."""
    if levels.device.type == "cpu":  # numpy's table lookup: ~10x faster than torch's indexing here
        return torch.from_numpy(_normalise_array(levels.numpy()))
    return _index_levels(levels)


def _normalise_array(levels: np.ndarray) -> np.ndarray:
    """:func:`normalise_levels` of a uint8 array ``[..., S, S, 3]``, by table lookup (the
    levels are uint8, so always in the table's range)."""
    images = levels.reshape(-1, *levels.shape[-3:])  # [n, S, S, 3]
    out = np.empty((images.shape[0], 3, *images.shape[1:3]), dtype=np.float32)  # [n, 3, S, S]
    for image, normalised in zip(images, out, strict=True):
        for channel in range(3):
            np.take(_LEVELS[channel], image[:, :, channel], out=normalised[channel], mode="clip")
    return out.reshape(*levels.shape[:-3], *out.shape[1:])


def _index_levels(levels: torch.Tensor) -> torch.Tensor:
    """:func:`normalise_levels` by torch indexing, on any device."""
    table = torch.from_numpy(_LEVELS).to(levels.device)  # [3, 256]
    channel = torch.arange(3, device=levels.device).view(3, 1, 1)  # [3, 1, 1]
    return table[channel, levels.movedim(-1, -3).long()]  # [..., 3, S, S]


def check_pixels(pixels: torch.Tensor, patch_size: int, limits: ImageLimits = DEFAULT_LIMITS, *,
                 field: str = "pixels") -> torch.Tensor:
    """Already-preprocessed pixels from a client: checked, as contiguous float32 [N, 3, H, W].

    They skip decoding and resizing, so everything the model relies on is checked here:
    the layout, sides that are multiples of the patch size, the size limits, a floating
    dtype (CLIP-normalised values, not raw bytes) and finite values.
    """
    if pixels.dim() != 4 or pixels.shape[1] != 3 or pixels.shape[0] == 0:
        raise BadImage(field, f"expected [N, 3, H, W] with N >= 1, got {list(pixels.shape)}")
    height, width = int(pixels.shape[2]), int(pixels.shape[3])
    try:
        patch_grid(height, width, patch_size)
    except ValueError as exc:
        raise BadImage(field, str(exc)) from exc
    limits.check(width, height, field)
    if not pixels.is_floating_point():
        raise BadImage(field, f"expected CLIP-normalised floats, got {pixels.dtype}")
    pixels = pixels.to(torch.float32).contiguous()
    if not bool(torch.isfinite(pixels).all()):
        raise BadImage(field, "pixels hold NaN or infinite values")
    return pixels


def _resize_tensor(tensor: torch.Tensor, size: int, field: str, limits: ImageLimits) -> np.ndarray:
    """Resize a pixel tensor with Pillow's filter, so it matches the bytes path."""
    if tensor.ndim != 3 or tensor.shape[0] not in (1, 3):
        raise BadImage(field, f"expected a [3, H, W] or [1, H, W] tensor, got {list(tensor.shape)}")
    height, width = tensor.shape[1:]
    if height == 0 or width == 0:
        raise BadImage(field, f"empty image tensor {list(tensor.shape)}")
    limits.check(width, height, field)
    pixels = tensor.detach().to("cpu").expand(3, -1, -1)  # [3, H, W]
    if pixels.dtype == torch.uint8:
        rgb = Image.fromarray(np.ascontiguousarray(pixels.permute(1, 2, 0).numpy()))
        resized = rgb.resize((size, size), Image.Resampling.BILINEAR)
        return np.asarray(resized, dtype=np.float32) / 255.0  # [S, S, 3]
    if not pixels.is_floating_point():
        raise BadImage(field, f"unsupported tensor dtype {pixels.dtype} (use uint8 or float)")
    pixels = pixels.to(torch.float32)
    if not bool(torch.isfinite(pixels).all()):
        raise BadImage(field, "tensor holds NaN or infinite values")
    low, high = float(pixels.min()), float(pixels.max())
    if low < 0.0 or high > 1.0:
        raise BadImage(field, f"float pixel values must lie in [0, 1], got [{low:.4g}, {high:.4g}]")
    # Mode "F" resizes each channel in float with the same bilinear filter as RGB,
    # without quantising to 8 bits first.
    channels = [
        np.asarray(Image.fromarray(channel.numpy()).resize((size, size), Image.Resampling.BILINEAR))
        for channel in pixels
    ]
    return np.stack(channels, axis=-1)  # [S, S, 3]


def preprocess_batch(
    images: Sequence[ImageInput],
    size: int = 728,
    *,
    field: str = "images",
    limits: ImageLimits = DEFAULT_LIMITS,
) -> torch.Tensor:
    """Several images -> float32 [N, 3, size, size]; errors name `images[i]`."""
    if len(images) == 0:
        raise BadImage(field, "no images given")
    tensors = [
        preprocess_image(image, size, field=f"{field}[{index}]", limits=limits)
        for index, image in enumerate(images)
    ]
    return torch.stack(tensors)  # [N, 3, S, S]
