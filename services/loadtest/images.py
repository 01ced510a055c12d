"""Where the load test's images come from: a directory of files, or generated pictures.

A source is asked for its ``n``-th *fresh* image; the same ``n`` always gives the same
bytes, so a load test is repeatable and a reused image is byte-identical to its first
sending (which is what makes a server's content-addressed feature cache hit).

Generated images come in two kinds:

- ``scenes``: the demo model's procedural scenes (``services.demo.scenes``), so a
  captioning model says something checkable and the compression ratio is realistic;
- ``noise``: uniform random pixels, the worst case for a codec and for upload size.

Directory images are sent as the files' own bytes, never re-encoded, so a user's
benchmark set reaches the server exactly as it is on disk.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from services.demo.scenes import MIN_IMAGE_SIZE, generate_scene
from services.loadtest.errors import ConfigError

__all__ = [
    "IMAGE_FORMATS",
    "DirectoryImages",
    "EncodedImage",
    "GeneratedImages",
    "ImageSource",
    "encode_image",
]

# --image-format → (Pillow format name, MIME type, encoder options)
IMAGE_FORMATS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "png": ("PNG", "image/png", {}),
    "jpeg": ("JPEG", "image/jpeg", {"quality": 90}),
    "webp": ("WEBP", "image/webp", {"quality": 90}),
}
_MIME_BY_PILLOW_FORMAT = {
    "PNG": "image/png",
    "JPEG": "image/jpeg",
    "WEBP": "image/webp",
    "GIF": "image/gif",
    "BMP": "image/bmp",
}
_DIRECTORY_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp"}


@dataclass(frozen=True)
class EncodedImage:
    """An image as it goes on the wire. ``image_id`` is a hash of the bytes."""

    data: bytes
    mime_type: str
    image_id: str

    @classmethod
    def from_bytes(cls, data: bytes, mime_type: str) -> EncodedImage:
        return cls(data, mime_type, hashlib.sha256(data).hexdigest()[:16])


class ImageSource(Protocol):
    """Gives the ``n``-th fresh image, the same bytes every time it is asked."""

    def image(self, fresh_index: int) -> EncodedImage: ...

    def describe(self) -> dict[str, Any]: ...


def encode_image(image: Image.Image, image_format: str) -> EncodedImage:
    pillow_format, mime_type, options = IMAGE_FORMATS[image_format]
    buffer = io.BytesIO()
    image.save(buffer, format=pillow_format, **options)
    return EncodedImage.from_bytes(buffer.getvalue(), mime_type)


class GeneratedImages:
    """Scenes or noise, ``image_size`` pixels square, encoded as ``image_format``."""

    KINDS = ("scenes", "noise")

    def __init__(self, kind: str = "scenes", image_size: int = 224, image_format: str = "png",
                 seed: int = 0) -> None:
        if kind not in self.KINDS:
            raise ConfigError("image_kind", kind, f"must be one of {self.KINDS}")
        if image_format not in IMAGE_FORMATS:
            raise ConfigError("image_format", image_format, f"must be one of {tuple(IMAGE_FORMATS)}")
        minimum = MIN_IMAGE_SIZE if kind == "scenes" else 1
        if image_size < minimum:
            raise ConfigError("image_size", image_size, f"must be at least {minimum} for {kind}")
        self.kind = kind
        self.image_size = image_size
        self.image_format = image_format
        self.seed = seed

    def image(self, fresh_index: int) -> EncodedImage:
        if self.kind == "scenes":
            picture = generate_scene(self.seed * 1_000_003 + fresh_index, self.image_size).image
        else:
            rng = np.random.default_rng([self.seed, fresh_index])
            pixels = rng.integers(0, 256, (self.image_size, self.image_size, 3), dtype=np.uint8)  # [H, W, 3]
            picture = Image.fromarray(pixels, "RGB")
        return encode_image(picture, self.image_format)

    def describe(self) -> dict[str, Any]:
        return {"source": "generated", "kind": self.kind, "image_size": self.image_size,
                "image_format": self.image_format, "seed": self.seed}


class DirectoryImages:
    """The image files of ``directory`` (sorted by name), sent as they are.

    Every file is opened once up front (Pillow reads only the header), so an unreadable
    file stops the run before the first request rather than becoming a client-side
    "error" in the middle of the measurements. Fresh images cycle through the files;
    when there are fewer files than fresh images, a repeat is counted as a reuse in the
    records, because to the server it is one.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise ConfigError("images_dir", str(directory), "is not a directory")
        self.files = sorted(p for p in self.directory.iterdir()
                            if p.is_file() and p.suffix.lower() in _DIRECTORY_SUFFIXES)
        if not self.files:
            raise ConfigError("images_dir", str(directory),
                              f"holds no image files ({', '.join(sorted(_DIRECTORY_SUFFIXES))})")
        self.mime_types = [self._mime_type(path) for path in self.files]

    @staticmethod
    def _mime_type(path: Path) -> str:
        try:
            with Image.open(path) as image:
                pillow_format = image.format
        except (OSError, ValueError) as exc:
            raise ConfigError("images_dir", str(path), f"not a readable image: {exc}") from exc
        if pillow_format not in _MIME_BY_PILLOW_FORMAT:
            raise ConfigError("images_dir", str(path), f"unsupported image format {pillow_format}")
        return _MIME_BY_PILLOW_FORMAT[pillow_format]

    def image(self, fresh_index: int) -> EncodedImage:
        position = fresh_index % len(self.files)
        return EncodedImage.from_bytes(self.files[position].read_bytes(), self.mime_types[position])

    def describe(self) -> dict[str, Any]:
        return {"source": "directory", "directory": str(self.directory), "files": len(self.files)}
