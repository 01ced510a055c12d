"""Procedurally generated scenes for the demo model ``step37-tiny``, each with its caption.

The demo trains its own tiny vision-language model on these scenes, so what it says about
a picture can be checked: every scene comes with the objects that are really in it. A
scene is 1 to 3 objects (shape, colour, size, position) on a muted background, with
enough jitter and noise that the model has to look rather than memorise pixels.

Design choices that keep the captions learnable and checkable:

- Object colours are saturated and far apart; backgrounds are near-grey (all channels
  within a few levels of each other), so no object ever blends into the background.
- The five positions are fixed regions whose spacing, together with the largest object
  size and the jitter bounds, guarantees that objects never overlap and stay inside the
  image (``tests/unit/test_scenes.py`` checks the bounding boxes).
- Everything is drawn at 4x and box-downsampled, so edges are anti-aliased and small
  shapes stay recognisable at 112 px.
- All randomness comes from ``random.Random(seed)`` (and a numpy generator seeded from
  it), never global state: the same seed gives the same pixels, in any process.

The caption grammar lives in ``services.demo.captions`` and is re-exported here.
Run ``python -m services.demo.scenes --out DIR --n 8 --seed 1`` to look at some scenes.
"""

from __future__ import annotations

import argparse
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from services.demo.captions import (
    CAPTION_VOCABULARY,
    COLOURS,
    MAX_OBJECTS,
    POSITIONS,
    SHAPES,
    SIZES,
    CaptionParseError,
    SceneObject,
    caption_for,
    caption_words,
    parse_caption,
    score_captions,
)

__all__ = [
    "BACKGROUND_RGB",
    "CAPTION_VOCABULARY",
    "COLOUR_RGB",
    "MIN_IMAGE_SIZE",
    "CaptionParseError",
    "ObjectLayout",
    "Scene",
    "SceneObject",
    "caption_for",
    "caption_words",
    "generate_scene",
    "generate_scenes",
    "main",
    "parse_caption",
    "score_captions",
]

RGB = tuple[int, int, int]

# Saturated and pairwise far apart (closest pair, yellow/orange, differ by ~95 levels).
COLOUR_RGB: dict[str, RGB] = {
    "red": (210, 30, 35),
    "green": (40, 165, 60),
    "blue": (35, 80, 215),
    "yellow": (240, 215, 30),
    "purple": (130, 50, 180),
    "orange": (245, 120, 20),
}
# Near-grey: channels within 20 levels of each other, so never mistaken for an object.
BACKGROUND_RGB: tuple[RGB, ...] = (
    (128, 128, 128),
    (96, 98, 104),
    (168, 166, 160),
    (200, 200, 196),
    (140, 136, 120),
    (112, 124, 120),
    (70, 72, 78),
    (150, 140, 150),
)
MIN_IMAGE_SIZE = 32  # below this a small object is a couple of pixels across

# Geometry, as fractions of the image side. Non-overlap budget for two neighbours (say
# left and centre): region spacing 0.32, minus 2 x 0.015 position jitter = 0.29, against
# 2 x the widest large-object extent 0.11 x 1.05 (size jitter) x 1.186 (a square rotated
# by 12 degrees, the widest outline below) = 0.274. The 0.016 left over is ~3.5 px at 224.
_REGION_CENTRES: dict[str, tuple[float, float]] = {
    "left": (0.18, 0.5),
    "top": (0.5, 0.18),
    "centre": (0.5, 0.5),
    "bottom": (0.5, 0.82),
    "right": (0.82, 0.5),
}
_HALF_EXTENT = {"small": 0.058, "large": 0.11}  # large ~1.9x small
_POSITION_JITTER = 0.015
_SIZE_JITTER = 0.05
_MAX_ROTATION_DEG = 12.0  # small, so a square never turns into a diamond
_COLOUR_JITTER = 10  # per channel, levels
_NOISE_PROBABILITY = 0.7
_NOISE_SIGMA_RANGE = (1.5, 6.0)  # levels
_SUPERSAMPLE = 4


def _star_outline(
    points: int = 5, outer: float = 1.18, inner: float = 0.52
) -> list[tuple[float, float]]:
    return [
        (r * math.cos(angle), r * math.sin(angle))
        for k in range(2 * points)
        for r, angle in [((outer, inner)[k % 2], -math.pi / 2 + k * math.pi / points)]
    ]


def _cross_outline(arm: float = 0.36) -> list[tuple[float, float]]:
    """A plus sign whose arms are ``2 * arm`` wide: the top arm, turned four times."""
    quarter = [(-arm, -1.0), (arm, -1.0), (arm, -arm)]
    outline = []
    for _ in range(4):
        outline.extend(quarter)
        quarter = [(-y, x) for x, y in quarter]  # a quarter turn clockwise (y points down)
    return outline


_CIRCLE_RADIUS = 1.1  # area ~3.8 against the square's 4
# Outlines in units of the half-extent, centred on the origin, y pointing down. Shapes
# thinner than the square reach a little past 1 so that they look about as big; none
# reaches past the rotated square's 1.186. A circle's radius is _CIRCLE_RADIUS.
_UNIT_OUTLINES: dict[str, list[tuple[float, float]]] = {
    "square": [(-1, -1), (1, -1), (1, 1), (-1, 1)],
    "triangle": [(0, -1), (1, 1), (-1, 1)],  # fills its box: centre inside, half-width 0.5
    "star": _star_outline(),
    "cross": _cross_outline(),
    "diamond": [(0, -1.18), (0.72, 0), (0, 1.18), (-0.72, 0)],  # taller than wide
}


@dataclass(frozen=True)
class ObjectLayout:
    """Where and how an object was drawn, in pixels of the final image.

    ``outline`` is the polygon drawn (empty for a circle); ``bbox`` is ``(x0, y0, x1, y1)``
    of the exact drawn extent; ``rgb`` is the jittered colour actually used.
    """

    centre: tuple[float, float]
    half_extent: float
    rotation_deg: float
    rgb: RGB
    outline: tuple[tuple[float, float], ...]
    bbox: tuple[float, float, float, float]


@dataclass(frozen=True)
class Scene:
    """A generated picture and the truth about it.

    ``objects`` are in canonical caption order; ``layout[i]`` is where ``objects[i]`` was
    drawn. ``generate_scene(scene.seed, scene.image.width)`` gives this scene back.
    """

    seed: int
    image: Image.Image
    caption: str
    objects: list[SceneObject]
    layout: list[ObjectLayout]


def _sample_objects(rng: random.Random) -> list[SceneObject]:
    count = rng.randint(1, MAX_OBJECTS)
    positions = sorted(rng.sample(POSITIONS, count), key=POSITIONS.index)
    return [
        SceneObject(rng.choice(SHAPES), rng.choice(COLOURS), rng.choice(SIZES), position)
        for position in positions
    ]


def _lay_out(obj: SceneObject, rng: random.Random, image_size: int) -> ObjectLayout:
    region_x, region_y = _REGION_CENTRES[obj.position]
    centre_x = (region_x + rng.uniform(-_POSITION_JITTER, _POSITION_JITTER)) * image_size
    centre_y = (region_y + rng.uniform(-_POSITION_JITTER, _POSITION_JITTER)) * image_size
    half_extent = (
        _HALF_EXTENT[obj.size] * image_size * rng.uniform(1 - _SIZE_JITTER, 1 + _SIZE_JITTER)
    )
    rotation_deg = (
        0.0 if obj.shape == "circle" else rng.uniform(-_MAX_ROTATION_DEG, _MAX_ROTATION_DEG)
    )
    red, green, blue = (
        min(255, max(0, level + rng.randint(-_COLOUR_JITTER, _COLOUR_JITTER)))
        for level in COLOUR_RGB[obj.colour]
    )
    if obj.shape == "circle":
        outline: tuple[tuple[float, float], ...] = ()
        radius = _CIRCLE_RADIUS * half_extent
        bbox = (centre_x - radius, centre_y - radius, centre_x + radius, centre_y + radius)
    else:
        cos, sin = math.cos(math.radians(rotation_deg)), math.sin(math.radians(rotation_deg))
        outline = tuple(
            (
                centre_x + half_extent * (x * cos - y * sin),
                centre_y + half_extent * (x * sin + y * cos),
            )
            for x, y in _UNIT_OUTLINES[obj.shape]
        )
        xs, ys = [x for x, _ in outline], [y for _, y in outline]
        bbox = (min(xs), min(ys), max(xs), max(ys))
    return ObjectLayout(
        (centre_x, centre_y), half_extent, rotation_deg, (red, green, blue), outline, bbox
    )


@dataclass(frozen=True)
class _Background:
    """One or two grey levels split along a row or column, in supersampled pixels: pixels
    at and past ``split`` (rows for "horizontal", columns for "vertical") are ``second``."""

    first: RGB
    second: RGB
    style: str  # "plain", "horizontal" or "vertical"
    split: int


def _sample_background(rng: random.Random, side: int) -> _Background:
    # One brightness offset for all three channels, so the background stays grey.
    first, second = (
        tuple(level + offset for level in rgb)
        for rgb, offset in zip(
            rng.sample(BACKGROUND_RGB, 2), (rng.randint(-6, 6), rng.randint(-6, 6)), strict=True
        )
    )
    style = rng.choice(("plain", "horizontal", "vertical"))
    split = round(rng.uniform(0.35, 0.65) * side)
    return _Background(first, second, style, split)  # type: ignore[arg-type]


def _draw_background(draw: ImageDraw.ImageDraw, background: _Background, side: int,
                     box: tuple[int, int, int, int] | None = None) -> None:
    """The background of the ``side``-pixel supersampled canvas, or only of its pixels in
    ``box`` = ``(left, top, right, bottom)`` (right and bottom exclusive)."""
    left, top, right, bottom = box or (0, 0, side, side)
    draw.rectangle((left, top, right - 1, bottom - 1), fill=background.first)
    if background.style == "horizontal" and max(top, background.split) < bottom:  # rows past the split
        draw.rectangle((left, max(top, background.split), right - 1, bottom - 1), fill=background.second)
    elif background.style == "vertical" and max(left, background.split) < right:  # columns past it
        draw.rectangle((max(left, background.split), top, right - 1, bottom - 1), fill=background.second)


def _downsampled_background(background: _Background, image_size: int) -> np.ndarray:
    """The background after the box downsampling, computed directly: [S, S, 3] uint8.

    A box of ``_SUPERSAMPLE`` rows (or columns) straddling the split averages the two
    levels, rounded half up as Pillow's box filter does."""
    first, second = np.array(background.first), np.array(background.second)
    if background.style == "plain":
        return np.broadcast_to(first.astype(np.uint8), (image_size, image_size, 3))
    starts = np.arange(image_size) * _SUPERSAMPLE  # first supersampled line of each output line
    seconds = np.clip(starts + _SUPERSAMPLE - background.split, 0, _SUPERSAMPLE)  # [S] lines of `second`
    line = (seconds[:, None] * second + (_SUPERSAMPLE - seconds[:, None]) * first) / _SUPERSAMPLE  # [S, 3]
    line = np.floor(line + 0.5).astype(np.uint8)
    if background.style == "horizontal":
        return np.broadcast_to(line[:, None, :], (image_size, image_size, 3))
    return np.broadcast_to(line[None, :, :], (image_size, image_size, 3))


def _draw_object(draw: ImageDraw.ImageDraw, layout: ObjectLayout, scale: int) -> None:
    if layout.outline:
        draw.polygon([(x * scale, y * scale) for x, y in layout.outline], fill=layout.rgb)
    else:
        draw.ellipse([coordinate * scale for coordinate in layout.bbox], fill=layout.rgb)


def _render(layout: list[ObjectLayout], background: _Background, image_size: int) -> np.ndarray:
    """The scene drawn at ``_SUPERSAMPLE`` times the size and box-downsampled: [S, S, 3] uint8.

    Each output pixel is the mean of its own block of supersampled pixels, so only the
    blocks around the objects get a background on the canvas and are downsampled; the
    rest of the image is the downsampled background, computed directly. The objects are
    drawn at their place on the full canvas (Pillow's polygon edges are not exactly the
    same when shifted). The same pixels as drawing and downsampling the whole canvas
    (``tests/unit/test_scenes.py`` compares)."""
    blocks = []
    for placed in layout:
        x0, y0, x1, y1 = placed.bbox
        left, top = max(0, math.floor(x0) - 1), max(0, math.floor(y0) - 1)
        right, bottom = min(image_size, math.ceil(x1) + 2), min(image_size, math.ceil(y1) + 2)
        blocks.append((left, top, right, bottom))
    side = image_size * _SUPERSAMPLE
    canvas = Image.new("RGB", (side, side))
    draw = ImageDraw.Draw(canvas)
    for block in blocks:
        _draw_background(draw, background, side, tuple(edge * _SUPERSAMPLE for edge in block))
    for placed in layout:
        _draw_object(draw, placed, _SUPERSAMPLE)
    pixels = _downsampled_background(background, image_size).copy()  # [S, S, 3]
    for left, top, right, bottom in blocks:
        crop = canvas.crop(tuple(edge * _SUPERSAMPLE for edge in (left, top, right, bottom)))
        pixels[top:bottom, left:right] = np.asarray(crop.resize((right - left, bottom - top), Image.Resampling.BOX))
    return pixels


def generate_scene(seed: int, image_size: int = 224) -> Scene:
    """The scene for ``seed``: the same seed and size always give the same pixels."""
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be at least {MIN_IMAGE_SIZE}, got {image_size}")
    rng = random.Random(seed)
    objects = _sample_objects(rng)
    layout = [_lay_out(obj, rng, image_size) for obj in objects]
    background = _sample_background(rng, image_size * _SUPERSAMPLE)
    pixels = _render(layout, background, image_size)  # [H, W, 3] uint8
    noise_seed = rng.getrandbits(64)
    if rng.random() < _NOISE_PROBABILITY:
        noisy = np.random.default_rng(noise_seed).normal(
            0.0, rng.uniform(*_NOISE_SIGMA_RANGE), (image_size, image_size, 3)
        )  # [H, W, 3] float64, turned into the noisy pixels in place
        noisy += pixels
        np.rint(noisy, out=noisy)
        np.clip(noisy, 0, 255, out=noisy)
        pixels = noisy.astype(np.uint8)
    return Scene(seed, Image.fromarray(pixels, "RGB"), caption_for(objects), objects, layout)


def generate_scenes(n: int, seed: int, image_size: int = 224) -> Iterator[Scene]:
    """``n`` scenes whose seeds are drawn from ``random.Random(seed)``.

    Drawn rather than ``seed + i`` so that streams from nearby seeds (a training set on
    seed 0, a test set on seed 1) do not share scenes.
    """
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    seeds = random.Random(seed)
    for _ in range(n):
        yield generate_scene(seeds.getrandbits(63), image_size)


def main(argv: Sequence[str] | None = None) -> int:
    """Write scenes as PNGs plus ``captions.txt`` (``file<TAB>caption`` per line)."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--out", type=Path, required=True, help="directory to write to")
    parser.add_argument("--n", type=int, default=8, help="number of scenes")
    parser.add_argument("--seed", type=int, default=0, help="seed of the scene stream")
    parser.add_argument("--image-size", type=int, default=224, help="side in pixels")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    lines = []
    for index, scene in enumerate(generate_scenes(args.n, args.seed, args.image_size)):
        name = f"scene_{index:03d}.png"
        scene.image.save(args.out / name)
        lines.append(f"{name}\t{scene.caption}\n")
    (args.out / "captions.txt").write_text("".join(lines))
    print(f"wrote {len(lines)} scenes and captions.txt to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
