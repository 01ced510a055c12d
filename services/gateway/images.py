"""Image bytes from clients: base64 / data-URL parsing and header-only validation.

The gateway never decodes pixels (that is the encoder's job, on its own CPU budget);
it reads the header, which is enough to refuse the wrong format or a decompression
bomb — a few KB of PNG can declare a 100k × 100k canvas — before any service
allocates for it. Every size is bounded before the work that size would cost:
base64 text before decoding it, file bytes before opening them, pixels before
decoding them.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import re
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from services.gateway.errors import InvalidImage, LimitExceeded, PayloadTooLarge

__all__ = [
    "FORMAT_MEDIA_TYPES",
    "ValidatedImage",
    "decode_base64_image",
    "inspect_image",
    "parse_data_url",
]

# PIL format name → media type: what the encoder can decode (GIF: its first frame).
FORMAT_MEDIA_TYPES = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "GIF": "image/gif"}
_MEDIA_TYPES = frozenset(FORMAT_MEDIA_TYPES.values()) | {"image/jpg"}
_WHITESPACE = re.compile(rb"\s+")


@dataclass(frozen=True)
class ValidatedImage:
    """An image whose header was checked; ``sha256`` (hex) keys the feature cache."""

    data: bytes
    sha256: str
    format: str
    width: int
    height: int
    param: str

    @property
    def pixels(self) -> int:
        return self.width * self.height


def decode_base64_image(text: str, *, param: str, max_bytes: int) -> bytes:
    """Plain base64 (line breaks allowed) → bytes, refusing oversized input before decoding."""
    # 4 base64 characters carry 3 bytes; padding and line breaks only make it shorter.
    if len(text) > 4 * (max_bytes // 3 + 1) + len(text) // 32 + 8:
        raise PayloadTooLarge(f"{param}: the base64 image is longer than {max_bytes} bytes allow",
                              param=param, value=len(text))
    try:
        raw = text.encode("ascii")
    except UnicodeEncodeError:
        raise InvalidImage(f"{param}: base64 data contains non-ASCII characters", param=param) from None
    raw = _WHITESPACE.sub(b"", raw)
    try:
        data = base64.b64decode(raw, validate=True)
    except binascii.Error as exc:
        raise InvalidImage(f"{param}: not valid base64 ({exc})", param=param) from exc
    if len(data) > max_bytes:
        raise PayloadTooLarge(f"{param}: the image is {len(data)} bytes; the limit is {max_bytes}",
                              param=param, value=len(data))
    if not data:
        raise InvalidImage(f"{param}: the image is empty", param=param)
    return data


def parse_data_url(url: str, *, param: str, max_bytes: int) -> bytes:
    """``data:image/png;base64,....`` → bytes (RFC 2397, base64 form only)."""
    header, comma, payload = url.partition(",")
    if not header.lower().startswith("data:") or not comma:
        raise InvalidImage(f"{param}: not a data URL (expected data:image/<type>;base64,<data>)", param=param)
    params = [p.strip().lower() for p in header[5:].split(";")]
    media_type, options = params[0], params[1:]
    if "base64" not in options:
        raise InvalidImage(f"{param}: only base64 data URLs are accepted (add ;base64)", param=param)
    if media_type not in _MEDIA_TYPES:
        raise InvalidImage(f"{param}: media type {media_type or '(none)'!r} is not one of "
                           f"{', '.join(sorted(FORMAT_MEDIA_TYPES.values()))}", param=param, value=media_type)
    # The declared type is a hint; the bytes are sniffed by inspect_image, which is
    # what the encoder will trust too (clients often label every image image/jpeg).
    return decode_base64_image(payload, param=param, max_bytes=max_bytes)


def inspect_image(data: bytes, *, param: str, max_pixels: int, max_bytes: int) -> ValidatedImage:
    """Check format, size and pixel count from the header alone; hash the bytes."""
    if len(data) > max_bytes:
        raise PayloadTooLarge(f"{param}: the image is {len(data)} bytes; the limit is {max_bytes}",
                              param=param, value=len(data))
    if not data:
        raise InvalidImage(f"{param}: the image is empty", param=param)
    try:
        # Header only: Image.open does not decode pixels. (Pillow's own, global bomb
        # check may warn first for > 89 MP; the bound that decides is ours, below.)
        with Image.open(io.BytesIO(data), formats=tuple(FORMAT_MEDIA_TYPES)) as image:
            width, height = image.size
            image_format = str(image.format)
    except Image.DecompressionBombError as exc:
        raise LimitExceeded(f"{param}: {exc}", param=param) from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        # Pillow reports a malformed header with any of these, depending on the plugin.
        raise InvalidImage(f"{param}: not a readable JPEG, PNG, WebP or GIF image ({type(exc).__name__})",
                           param=param) from exc
    if width < 1 or height < 1:
        raise InvalidImage(f"{param}: the image has no pixels ({width}x{height})", param=param)
    if width * height > max_pixels:
        raise LimitExceeded(f"{param}: {width}x{height} = {width * height} pixels exceeds the limit of "
                            f"{max_pixels}", param=param, value=width * height)
    return ValidatedImage(data=data, sha256=hashlib.sha256(data).hexdigest(), format=image_format,
                          width=width, height=height, param=param)
