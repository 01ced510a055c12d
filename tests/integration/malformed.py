"""Inputs broken in known ways, shared by the bad-input matrices (``test_bad_input_*``).

Image files: ones no service may decode (``BROKEN_IMAGES``) and ones that are unusual
but valid, which the encoder converts to 8-bit RGB as ``preprocess.to_rgb`` documents
(``CONVERTIBLE_IMAGES``). Every file is tiny, or only *declares* a huge size in its
header, so a matrix sends hundreds of them in seconds.
"""

from __future__ import annotations

import asyncio
import io
import json
import math
import struct
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from services.common.procs import ServiceProcess
from services.common.rpc import RpcClient, RpcFailed
from services.launcher import BUNDLED_MODEL

__all__ = [
    "BROKEN_IMAGES",
    "CONVERTIBLE_IMAGES",
    "JPEG",
    "PNG",
    "assert_call_refused",
    "assert_refused",
    "deeply_nested",
    "encode_image",
    "jpeg_declaring",
    "multipart",
    "png_declaring",
    "wire_tensor",
]

_RNG = np.random.default_rng(0)
PHOTO = Image.fromarray(_RNG.integers(0, 256, (48, 64, 3), dtype=np.uint8))  # 64 x 48 RGB noise


def encode_image(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


JPEG = encode_image(PHOTO, "JPEG")
PNG = encode_image(PHOTO, "PNG")


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_declaring(width: int, height: int) -> bytes:
    """A few dozen bytes of valid PNG whose header declares ``width`` x ``height`` RGB."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
            + _png_chunk(b"IDAT", zlib.compress(b"\0" * 16)) + _png_chunk(b"IEND", b""))


def jpeg_declaring(width: int, height: int) -> bytes:
    """A JPEG start-of-frame that declares ``width`` x ``height`` and holds no scan."""
    frame = struct.pack(">BHHB", 8, height, width, 3) + b"\x01\x22\x00\x02\x11\x01\x03\x11\x01"
    return b"\xff\xd8\xff\xc0" + struct.pack(">H", len(frame) + 2) + frame + b"\xff\xd9"


def _with_text_chunk_bomb(png: bytes) -> bytes:
    # 64 MB of zeros as a compressed text chunk (~64 KB): Pillow refuses to inflate it.
    bomb = _png_chunk(b"zTXt", b"comment\x00\x00" + zlib.compress(b"\0" * (64 << 20), 9))
    return png[:33] + bomb + png[33:]  # after the 33-byte signature + IHDR


def _with_bad_header_crc(png: bytes) -> bytes:
    damaged = bytearray(png)
    damaged[29] ^= 0xFF  # the last byte of IHDR's CRC
    return bytes(damaged)


def _animated(fmt: str) -> bytes:
    frames = [Image.new("RGB", (32, 32), colour) for colour in ("red", "blue", "green")]
    return encode_image(frames[0], fmt, save_all=True, append_images=frames[1:], duration=50)


def _sixteen_bit_png() -> bytes:
    return encode_image(Image.fromarray(_RNG.integers(0, 65535, (40, 40)).astype(np.uint16)), "PNG")


def _rotated_by_exif() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    return encode_image(PHOTO, "JPEG", exif=exif.tobytes())


# name -> bytes that no service may decode.
BROKEN_IMAGES: dict[str, bytes] = {
    "not an image": b"hello, world: certainly not an image",
    "truncated png": PNG[: len(PNG) // 2],
    "truncated jpeg": JPEG[: len(JPEG) // 2],
    "png header only": PNG[:33],
    "png header crc wrong": _with_bad_header_crc(PNG),
    "png declaring 0x0": png_declaring(0, 0),
    "tiff (format not allowed)": encode_image(PHOTO, "TIFF"),
    "png text-chunk bomb": _with_text_chunk_bomb(PNG),
}

# name -> bytes of an unusual but valid image that the encoder converts to 8-bit RGB.
CONVERTIBLE_IMAGES: dict[str, bytes] = {
    "rgba png (alpha composited on white)": encode_image(PHOTO.convert("RGBA"), "PNG"),
    "la png (grey + alpha)": encode_image(PHOTO.convert("LA"), "PNG"),
    "palette png with transparency": encode_image(PHOTO.convert("P"), "PNG", transparency=0),
    "cmyk jpeg": encode_image(PHOTO.convert("CMYK"), "JPEG"),
    "16-bit greyscale png": _sixteen_bit_png(),
    "greyscale jpeg": encode_image(PHOTO.convert("L"), "JPEG"),
    "1-bit png": encode_image(PHOTO.convert("1"), "PNG"),
    "animated gif (first frame)": _animated("GIF"),
    "animated png (first frame)": _animated("PNG"),
    "webp": encode_image(PHOTO, "WEBP"),
    "jpeg rotated by exif": _rotated_by_exif(),
}


def multipart(files: list[tuple[str, bytes]], fields: dict[str, str] | None = None) -> tuple[bytes, dict[str, str]]:
    """A ``multipart/form-data`` body of these form fields and file parts (httpx would send
    a form without files urlencoded)."""
    boundary = "step37-boundary"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
             for name, value in (fields or {}).items()]
    parts += [f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{name}.png"\r\n'
              f"Content-Type: image/png\r\n\r\n".encode() + data + b"\r\n" for name, data in files]
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, {"content-type": f"multipart/form-data; boundary={boundary}"}


_ITEMSIZE = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "uint8": 1,
             "complex64": 8}


def wire_tensor(shape: list[int], dtype: str = "float32", data: bytes | None = None) -> dict:
    """A tensor map as ``proto`` puts it on the wire, unchecked; ``data`` defaults to
    zeros of the declared size (none when a dimension is negative)."""
    if data is None:
        data = b"\0" * (math.prod(shape) * _ITEMSIZE[dtype]) if all(dim >= 0 for dim in shape) else b""
    return {"dtype": dtype, "shape": shape, "data": data}


def deeply_nested(message_type: str, depth: int = 5000) -> bytes:
    """A message envelope whose field ``x`` is ``depth`` nested one-item arrays (msgpack's
    own packer refuses to build this; a hostile peer need not)."""
    name = message_type.encode()
    return b"\x83\xa1v\x01\xa4type" + bytes([0xA0 | len(name)]) + name + b"\xa1x" + b"\x91" * depth + b"\xc0"


def assert_refused(response: httpx.Response, status: int, field: str, fragment: str) -> dict:
    """The internal services' refusal: ``status`` with ``{"error": {type, field, message}}``
    naming ``field`` and saying ``fragment``."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json"), response.headers
    error = response.json()["error"]
    assert error["field"] == field, error
    assert fragment in error["message"] and error["type"], error
    return error


def assert_call_refused(url: str, method: str, body: bytes, status: int, field: str, fragment: str) -> dict:
    """The same refusal as :func:`assert_refused`, for ``body`` sent as one call over the
    service's call channel (the port its ``/ready`` reports)."""
    address = ("127.0.0.1", httpx.get(url + "/ready", timeout=30).json()["rpc_port"])

    async def call() -> RpcFailed:
        client = RpcClient()
        try:
            await client.call(address, method, [body])
        except RpcFailed as refused:
            return refused
        finally:
            await client.aclose()
        raise AssertionError(f"the {method} call was not refused")

    refused = asyncio.run(call())
    assert refused.status == status, refused.body
    error = json.loads(refused.body)["error"]
    assert error["field"] == field, error
    assert fragment in error["message"] and error["type"], error
    return error


@contextmanager
def serving(command: str, *flags: str, log_dir: Path) -> Iterator[ServiceProcess]:
    """``step37-serve <command>`` on the bundled model (CPU, one thread) with ``flags``,
    ready; stopped on the way out."""
    service = ServiceProcess(command, [command, "--model", str(BUNDLED_MODEL), "--device", "cpu",
                                       "--torch-threads", "1", *flags], log_path=str(log_dir / f"{command}.log"))
    try:
        yield service.start().wait_ready(timeout_s=120)
    finally:
        service.stop()
