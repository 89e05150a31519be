"""Images from untrusted requests, decoded with limits.

An encoded image is refused before decoding when it is larger than ``max_image_bytes`` or when its
header announces more than ``max_image_pixels`` pixels; then it is decoded by the project's guarded
reader (:func:`vlmkit.core.data.images.decode_image`: anything PIL refuses, truncated files and
PIL's own decompression-bomb limit included, is an error).
"""

from __future__ import annotations

import io
from typing import Any

from PIL import Image

from vlmkit.core.data.images import ImageDecodeError, decode_base64, decode_image
from vlmkit.core.errors import VlmkitError
from vlmkit.serve.limits import Limits


class BadInput(VlmkitError):
    """A request the server refuses (HTTP 400 / 413); the message says what and why."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def image_from_data_url(url: str, where: str, limits: Limits) -> Image.Image:
    """``data:image/...;base64,...`` -> an RGB PIL image, or :class:`BadInput` naming ``where``."""
    if not isinstance(url, str) or not url.startswith("data:"):
        raise BadInput(f"{where}: only data URLs (data:image/png;base64,...) are accepted; this server fetches no URLs")
    head, sep, body = url.partition(",")
    if not sep or not head.endswith(";base64"):
        raise BadInput(f"{where}: a data URL must be base64-encoded (data:image/png;base64,...)")
    if len(body) > limits.max_image_bytes * 4 // 3 + 8:
        raise BadInput(f"{where}: the image is larger than the limit of {limits.max_image_bytes} bytes", 413)
    try:
        raw = decode_base64(body)
    except ValueError as exc:
        raise BadInput(f"{where}: not valid base64: {exc}") from None
    return image_from_bytes(raw, where, limits)


def image_from_bytes(raw: bytes, where: str, limits: Limits) -> Image.Image:
    """Encoded image bytes -> an RGB PIL image, or :class:`BadInput` naming ``where``."""
    if len(raw) > limits.max_image_bytes:
        raise BadInput(f"{where}: the image has {len(raw)} bytes, more than the limit of {limits.max_image_bytes}", 413)
    if not raw:
        raise BadInput(f"{where}: the image is empty")
    check_pixels(raw, where, limits)
    try:
        return decode_image(raw, where)
    except ImageDecodeError as exc:
        raise BadInput(f"{where}: not a readable image: {exc.reason}") from None


def check_pixels(raw: bytes, where: str, limits: Limits) -> None:
    """Refuse an image whose header announces more than ``max_image_pixels`` pixels (read without
    decoding the pixels)."""
    try:
        with Image.open(io.BytesIO(raw)) as image:
            width, height = image.size
    except Image.DecompressionBombError as exc:
        raise BadInput(f"{where}: refused as a decompression bomb: {exc}", 413) from None
    except Exception as exc:  # PIL: UnidentifiedImageError, OSError, SyntaxError ...
        raise BadInput(f"{where}: not a readable image: {exc or type(exc).__name__}") from None
    if width * height > limits.max_image_pixels:
        raise BadInput(f"{where}: the image is {width}x{height} pixels, more than the limit of "
                       f"{limits.max_image_pixels} pixels", 413)


def image_from_file(path: Any, where: str, limits: Limits) -> Image.Image:
    """An uploaded file (the web app's) -> an RGB PIL image, with the same limits."""
    with open(path, "rb") as file:
        raw = file.read(limits.max_image_bytes + 1)
    return image_from_bytes(raw, where, limits)
