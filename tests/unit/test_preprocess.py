"""Image preprocessing: exact CLIP normalisation, formats, orientation, modes, hostile input."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from encoder_server.errors import (
    BadImage,
    ClientError,
    EncoderError,
    ImageTooLarge,
    Overloaded,
    QueueFull,
    ServerError,
)
from encoder_server.preprocess import (
    ImageLimits,
    _index_levels,
    normalise_levels,
    preprocess_batch,
    preprocess_image,
    rgb_levels,
)

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
SIZE = 28


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def normalised(rgb: tuple[float, float, float]) -> torch.Tensor:
    """Hand computation of one pixel: (v / 255 - mean) / std per channel, float64."""
    return torch.tensor(
        [(v / 255.0 - m) / s for v, m, s in zip(rgb, MEAN, STD, strict=True)], dtype=torch.float64
    )


def pixel(out: torch.Tensor, row: int, col: int) -> torch.Tensor:
    return out[:, row, col].double()


def gradient_image(width: int = 61, height: int = 47) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    array = np.stack([x * 4 % 256, y * 5 % 256, (x * y) % 256], axis=-1).astype(np.uint8)
    return Image.fromarray(array)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG declaring a canvas of width x height with no pixel data at all."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


# ---- the numbers ------------------------------------------------------------------------------


def test_normalisation_matches_hand_computation() -> None:
    array = np.zeros((SIZE, SIZE, 3), dtype=np.uint8)
    array[0, 0] = (255, 128, 0)
    array[5, 7] = (17, 200, 99)
    out = preprocess_image(encode(Image.fromarray(array), "PNG"), SIZE)
    assert out.shape == (3, SIZE, SIZE) and out.dtype == torch.float32
    torch.testing.assert_close(pixel(out, 0, 0), normalised((255, 128, 0)), rtol=0, atol=1e-6)
    torch.testing.assert_close(pixel(out, 5, 7), normalised((17, 200, 99)), rtol=0, atol=1e-6)
    torch.testing.assert_close(pixel(out, 1, 1), normalised((0, 0, 0)), rtol=0, atol=1e-6)


def test_every_level_of_every_channel_matches_float32_arithmetic() -> None:
    # Decoded images are normalised by table lookup: it must give exactly what the plain
    # float32 arithmetic gives, for all 256 levels in every channel, at any size.
    rng = np.random.default_rng()
    levels = np.stack([rng.permutation(256) for _ in range(3)], axis=-1).astype(np.uint8)  # [256, 3]
    for height, width in ((16, 16), (8, 32)):
        array = np.resize(levels, (height * width, 3)).reshape(height, width, 3)
        out = preprocess_image(Image.fromarray(array), height if height == width else 16)
        resized = np.asarray(Image.fromarray(array).resize((out.shape[2], out.shape[1]), Image.Resampling.BILINEAR))
        mean, std = np.asarray(MEAN, dtype=np.float32), np.asarray(STD, dtype=np.float32)
        expected = (resized.astype(np.float32) / np.float32(255.0) - mean) / std  # [H, W, 3] float32
        assert out.dtype == torch.float32
        np.testing.assert_array_equal(out.permute(1, 2, 0).numpy(), expected)


def test_resize_is_pil_bilinear_to_a_square() -> None:
    image = gradient_image()
    out = preprocess_image(image, SIZE)
    bilinear = np.asarray(image.resize((SIZE, SIZE), Image.Resampling.BILINEAR), dtype=np.float64)
    bicubic = np.asarray(image.resize((SIZE, SIZE), Image.Resampling.BICUBIC), dtype=np.float64)
    expected = (bilinear / 255.0 - np.array(MEAN)) / np.array(STD)
    np.testing.assert_allclose(out.permute(1, 2, 0).numpy(), expected, atol=1e-5)
    assert not np.allclose(bilinear, bicubic)  # the check above can tell the filters apart


# ---- formats ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "tolerance"), [("PNG", 0), ("JPEG", 4), ("WEBP", 4), ("GIF", 0), ("BMP", 0)]
)
def test_formats_decode(fmt: str, tolerance: int) -> None:
    colour = (200, 40, 90)
    data = encode(
        Image.new("RGB", (40, 30), colour), fmt, **({"lossless": True} if fmt == "WEBP" else {})
    )
    out = preprocess_image(data, SIZE)
    limit = tolerance / 255 / min(STD) + 1e-6
    torch.testing.assert_close(pixel(out, 10, 10), normalised(colour), rtol=0, atol=limit)


def test_gif_uses_the_first_frame() -> None:
    frames = [Image.new("RGB", (20, 20), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=100)
    out = preprocess_image(buffer.getvalue(), SIZE)
    torch.testing.assert_close(pixel(out, 3, 3), normalised((255, 0, 0)), rtol=0, atol=1e-6)


def test_exif_orientation_is_applied() -> None:
    # Stored landscape: left half red, right half blue. Orientation 6 = rotate 90° clockwise
    # for display, which puts the left half on top.
    array = np.zeros((40, 80, 3), dtype=np.uint8)
    array[:, :40] = (255, 0, 0)
    array[:, 40:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(Image.fromarray(array), "JPEG", quality=95, exif=exif.tobytes())
    out = preprocess_image(data, SIZE)
    red, blue = normalised((255, 0, 0)), normalised((0, 0, 255))
    torch.testing.assert_close(pixel(out, 2, SIZE // 2), red, rtol=0, atol=0.1)
    torch.testing.assert_close(pixel(out, SIZE - 3, SIZE // 2), blue, rtol=0, atol=0.1)


# ---- colour modes -----------------------------------------------------------------------------


def test_alpha_is_composited_on_white() -> None:
    rgba = Image.new("RGBA", (SIZE, SIZE), (0, 0, 0, 0))
    rgba.putpixel((0, 0), (0, 0, 0, 255))
    rgba.putpixel((1, 0), (0, 0, 0, 128))
    out = preprocess_image(encode(rgba, "PNG"), SIZE)
    torch.testing.assert_close(pixel(out, 5, 5), normalised((255, 255, 255)), rtol=0, atol=1e-6)
    torch.testing.assert_close(pixel(out, 0, 0), normalised((0, 0, 0)), rtol=0, atol=1e-6)
    half = round(255 * (1 - 128 / 255))
    torch.testing.assert_close(
        pixel(out, 0, 1), normalised((half,) * 3), rtol=0, atol=1.01 / 255 / min(STD)
    )


def test_palette_transparency_and_grey_alpha_become_white() -> None:
    palette = Image.new("P", (SIZE, SIZE), 0)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    palette.info["transparency"] = 0
    for image in (
        Image.open(io.BytesIO(encode(palette, "GIF"))),
        Image.new("LA", (SIZE, SIZE), (0, 0)),
    ):
        out = preprocess_image(image, SIZE)
        torch.testing.assert_close(pixel(out, 4, 4), normalised((255, 255, 255)), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        (Image.new("L", (30, 30), 77), (77, 77, 77)),
        (Image.new("1", (30, 30), 1), (255, 255, 255)),
        (Image.new("CMYK", (30, 30), (0, 255, 255, 0)), (255, 0, 0)),
        (Image.fromarray(np.full((30, 30), 65535, dtype=np.uint16)), (255, 255, 255)),
        (Image.fromarray(np.full((30, 30), 32896, dtype=np.uint16)), (128, 128, 128)),
        (Image.fromarray(np.full((30, 30), 32896, dtype=np.int32)), (128, 128, 128)),
    ],
    ids=["L", "1", "CMYK", "I;16-white", "I;16-mid", "I"],
)
def test_other_modes_become_sensible_rgb(
    image: Image.Image, expected: tuple[int, int, int]
) -> None:
    torch.testing.assert_close(
        pixel(preprocess_image(image, SIZE), 3, 3), normalised(expected), rtol=0, atol=1e-6
    )


def test_sixteen_bit_png_is_scaled_not_clipped() -> None:
    data = encode(Image.fromarray(np.full((30, 30), 1000, dtype=np.uint16)), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    expected = round(1000 * 255 / 65535)  # 4, where clipping would give 255
    torch.testing.assert_close(
        pixel(preprocess_image(data, SIZE), 0, 0), normalised((expected,) * 3), rtol=0, atol=1e-6
    )


def test_cmyk_jpeg() -> None:
    data = encode(Image.new("CMYK", (30, 30), (0, 0, 0, 0)), "JPEG", quality=95)
    torch.testing.assert_close(
        pixel(preprocess_image(data, SIZE), 3, 3), normalised((255, 255, 255)), rtol=0, atol=0.05
    )


# ---- tensors ----------------------------------------------------------------------------------


def test_uint8_tensor_matches_bytes_path_and_float_is_close() -> None:
    image = gradient_image()
    from_bytes = preprocess_image(encode(image, "PNG"), SIZE)
    chw = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
    assert torch.equal(preprocess_image(chw, SIZE), from_bytes)
    from_float = preprocess_image(chw.float() / 255, SIZE)
    torch.testing.assert_close(from_float, from_bytes, rtol=0, atol=1.01 / 255 / min(STD))


def test_normalised_levels_are_the_values_of_preprocess_image() -> None:
    # The training batches' path: rendered levels, normalised in a batch (numpy's table on
    # the CPU, torch indexing on a GPU: both checked here, on the CPU).
    levels = np.random.default_rng(7).integers(0, 256, (2, 3, SIZE, SIZE, 3)).astype(np.uint8)
    expected = torch.stack([preprocess_image(Image.fromarray(image), SIZE) for image in levels.reshape(6, SIZE, SIZE, 3)])
    batch = normalise_levels(torch.from_numpy(levels))
    assert batch.shape == (2, 3, 3, SIZE, SIZE) and torch.equal(batch.reshape(6, 3, SIZE, SIZE), expected)
    assert torch.equal(normalise_levels(torch.from_numpy(levels[0, 0])), expected[0])
    assert rgb_levels(Image.fromarray(levels[0, 0]), SIZE).shape == (SIZE, SIZE, 3)
    assert torch.equal(_index_levels(torch.from_numpy(levels)).reshape(6, 3, SIZE, SIZE), expected)  # GPU path


def test_one_channel_tensor_is_grey() -> None:
    out = preprocess_image(torch.full((1, 30, 30), 77, dtype=torch.uint8), SIZE)
    torch.testing.assert_close(pixel(out, 0, 0), normalised((77, 77, 77)), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("tensor", "message"),
    [
        (torch.zeros(30, 30, 3), r"expected a \[3, H, W\]"),
        (torch.full((3, 8, 8), 2.0), r"must lie in \[0, 1\]"),
        (torch.full((3, 8, 8), float("nan")), "NaN"),
        (torch.zeros(3, 8, 8, dtype=torch.int64), "unsupported tensor dtype"),
        (torch.zeros(3, 0, 8), "empty image tensor"),
    ],
)
def test_bad_tensors(tensor: torch.Tensor, message: str) -> None:
    with pytest.raises(BadImage, match=message):
        preprocess_image(tensor, SIZE)


# ---- hostile and broken input -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("width", "height", "reason"),
    [
        (8000, 6000, "over the 40000000 pixel limit"),
        (20000, 10, "side over 16384"),
        (100_000, 100_000, "exceeds limit"),
    ],
)
def test_oversized_header_is_refused_before_decoding(width: int, height: int, reason: str) -> None:
    # No pixel data follows the header: if decoding were attempted it would fail as truncated.
    with pytest.raises(ImageTooLarge, match=reason) as caught:
        preprocess_image(png_header_only(width, height), SIZE, field="images[0]")
    assert caught.value.http_status == 413
    assert caught.value.field == "images[0]"


def test_limits_are_configurable() -> None:
    data = encode(Image.new("RGB", (50, 50)), "PNG")
    with pytest.raises(ImageTooLarge, match="50x50"):
        preprocess_image(data, SIZE, limits=ImageLimits(max_pixels=2000))
    with pytest.raises(ImageTooLarge):
        preprocess_image(torch.zeros(3, 50, 50), SIZE, limits=ImageLimits(max_side=49))


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty image data"),
        (b"this is not an image at all" * 10, "not a supported image"),
        (encode(Image.new("RGB", (8, 8)), "TIFF"), "not a supported image"),
        (encode(gradient_image(200, 200), "JPEG")[:-600], "truncated or corrupt JPEG"),
        (encode(gradient_image(200, 200), "PNG")[:-300], "truncated or corrupt PNG"),
    ],
    ids=["empty", "garbage", "tiff", "truncated-jpeg", "truncated-png"],
)
def test_broken_bytes_are_bad_images(data: bytes, reason: str) -> None:
    with pytest.raises(BadImage, match=reason) as caught:
        preprocess_image(data, SIZE)
    assert caught.value.http_status == 400
    assert not isinstance(caught.value, ImageTooLarge)


def test_batch_names_the_failing_image() -> None:
    good = encode(Image.new("RGB", (10, 10)), "PNG")
    truncated = encode(gradient_image(200, 200), "JPEG")[:-600]
    assert preprocess_batch([good, good], SIZE).shape == (2, 3, SIZE, SIZE)
    with pytest.raises(BadImage, match=r"^images\[2\]: truncated or corrupt JPEG") as caught:
        preprocess_batch([good, good, truncated], SIZE)
    assert caught.value.field == "images[2]"
    with pytest.raises(BadImage, match="no images"):
        preprocess_batch([], SIZE)


def test_lazy_pil_image_and_wrong_types() -> None:
    lazy = Image.open(io.BytesIO(encode(gradient_image(200, 200), "PNG")[:-300]))
    with pytest.raises(BadImage, match="truncated"):
        preprocess_image(lazy, SIZE)
    with pytest.raises(BadImage, match="unsupported image input type str"):
        preprocess_image("cat.jpg", SIZE)  # type: ignore[arg-type]


def test_error_hierarchy_and_statuses() -> None:
    assert issubclass(ImageTooLarge, BadImage) and issubclass(BadImage, ClientError)
    assert issubclass(QueueFull, Overloaded) and issubclass(Overloaded, ServerError)
    assert issubclass(ClientError, EncoderError) and issubclass(ServerError, EncoderError)
    assert (BadImage.http_status, ImageTooLarge.http_status, QueueFull.http_status) == (
        400,
        413,
        503,
    )
    error = QueueFull("queue is full", value=64, retry_after_s=0.5)
    assert (error.reason, error.value, error.retry_after_s, error.field) == (
        "queue is full",
        64,
        0.5,
        None,
    )
    assert str(BadImage("images[1]", "truncated JPEG")) == "images[1]: truncated JPEG"


def test_errors_describe_themselves_for_the_shared_http_mapping() -> None:
    assert BadImage("images[2]", "truncated JPEG", value="x" * 500).to_dict() == {
        "type": "bad_image",
        "field": "images[2]",
        "message": "images[2]: truncated JPEG",
        "value": repr("x" * 500)[:197] + "...",  # clipped to 200 characters in all
    }
    body = QueueFull("queue is full", value=64, retry_after_s=0.5).to_dict()
    assert body == {
        "type": "queue_full",
        "field": None,
        "message": "queue is full",
        "value": "64",
        "retry_after_s": 0.5,
    }
