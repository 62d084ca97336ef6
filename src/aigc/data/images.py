"""Image fitting and encoding shared by every source, and the edit inputs every way of using a
model reads (``aigc generate --init-image/--mask``, the pyfunc's params, ``aigc serve``'s
``/generate``).

Every shard image is square, ``image_size`` pixels, mode ``L`` (1 channel) or ``RGB`` (3), and
PNG-encoded without metadata so the same pixels always give the same bytes.

An edit input (an init image, a mask) must already be the model's size: it is refused with the size
it should have, never resized, so the pixels an edit keeps are the pixels that were given.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

__all__ = [
    "FILE_FORMATS",
    "MASK_THRESHOLD",
    "MODES",
    "WIRE_FORMATS",
    "ImageInputError",
    "decode_base64_image",
    "encode_png",
    "fit_image",
    "image_pixels",
    "mask_pixels",
    "open_image",
    "png_base64",
    "read_image_file",
    "read_mask_file",
    "to_mode",
]

MODES = {1: "L", 3: "RGB"}


def to_mode(img: Image.Image, channels: int) -> Image.Image:
    """Convert to ``L`` or ``RGB``; transparent pixels become white instead of PIL's black."""
    mode = MODES[channels]
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img if img.mode == mode else img.convert(mode)


def fit_image(img: Image.Image, size: int, channels: int) -> Image.Image:
    """Resize the shorter side to ``size`` (bicubic), center-crop to a square, convert the mode.

    EXIF orientation is applied first, so phone photos are upright.
    """
    img = ImageOps.exif_transpose(img)
    img = to_mode(img, channels)
    w, h = img.size
    if (w, h) != (size, size):
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        img = img.resize((nw, nh), Image.Resampling.BICUBIC)
        left, top = (nw - size) // 2, (nh - size) // 2
        img = img.crop((left, top, left + size, top + size))
    return img


def encode_png(img: Image.Image) -> bytes:
    """PNG bytes with no ancillary chunks (no timestamps), deterministic for given pixels."""
    # PIL re-embeds an ICC profile kept in ``info``; a fresh copy without it keeps bytes pixel-only.
    img = img.copy()
    img.info = {}
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


# ------------------------------------------------------------------ edit inputs: images and masks
#: A mask pixel at or above this grey level (0-255) is regenerated; below it, kept.
MASK_THRESHOLD = 128
#: The formats ``aigc generate`` reads an init image or a mask from (PIL's format names).
FILE_FORMATS = ("PNG", "JPEG")
#: The only format an image sent over HTTP (``aigc serve``, the pyfunc) may have: lossless, so a
#: mask's edges and an image at strength 0 come back as they were sent.
WIRE_FORMATS = ("PNG",)


class ImageInputError(ValueError):
    """An edit input that cannot be used; ``limit`` names what it broke (``image_format``,
    ``image_size``, ``max_image_bytes``, or the field's own name for unreadable data) and ``value``
    what that limit allows, so a server can answer with both."""

    def __init__(self, message: str, limit: str, value: Any = None, got: Any = None):
        super().__init__(message)
        self.limit = limit
        self.value = value
        self.got = got


def open_image(data: bytes, *, what: str, size: int, formats: tuple[str, ...] = WIRE_FORMATS) -> Image.Image:
    """``data`` (an encoded image file) opened and decoded, once its header says it is one of
    ``formats`` and ``size`` x ``size`` pixels: the model's size, which is checked before any pixel
    is decoded (so a small file that would decode to a huge image never does) and never adapted by
    resizing. Each refusal is an :class:`ImageInputError` naming ``what`` and the expected value."""
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:  # a header claiming far more pixels than any model makes
        raise ImageInputError(
            f"{what} claims too many pixels; the model makes {size}x{size} images", "image_size", [size, size]
        ) from None
    except (OSError, ValueError):  # UnidentifiedImageError is an OSError
        raise ImageInputError(
            f"{what} is not an image file ({' or '.join(formats)} expected)", what, list(formats)
        ) from None
    if img.format not in formats:
        raise ImageInputError(
            f"{what} is {img.format or 'of an unknown format'}; the format must be {' or '.join(formats)}",
            "image_format",
            list(formats),
            got=img.format,
        )
    if img.size != (size, size):
        w, h = img.size
        raise ImageInputError(
            f"{what} is {w}x{h} pixels; the model makes {size}x{size} images: give one of "
            f"{size}x{size} (it is not resized)",
            "image_size",
            [size, size],
            got=[w, h],
        )
    try:
        img.load()
    except (OSError, ValueError, SyntaxError) as err:  # a truncated or corrupt file
        raise ImageInputError(f"{what} could not be decoded: {err}", what, list(formats)) from None
    return img


def image_pixels(img: Image.Image, channels: int) -> np.ndarray:
    """An edit input image as the model takes it: uint8 ``(C, H, W)`` in the model's channels
    (:func:`to_mode`: RGB to grey, grey to RGB, transparency onto white)."""
    arr = np.asarray(to_mode(img, channels), dtype=np.uint8)
    return np.array(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1), order="C")  # a writable copy


def mask_pixels(img: Image.Image) -> np.ndarray:
    """A mask image as the model takes it: bool ``(1, H, W)``, True (regenerate) where its grey
    level (a colour mask's luminance; alpha is ignored) is at least :data:`MASK_THRESHOLD`:
    white regenerates, black keeps."""
    return (np.asarray(img.convert("L"), dtype=np.uint8) >= MASK_THRESHOLD)[None]


def read_image_file(
    path: str | os.PathLike[str],
    *,
    what: str,
    size: int,
    channels: int,
    formats: tuple[str, ...] = FILE_FORMATS,
) -> np.ndarray:
    """An init image file -> uint8 ``(C, H, W)`` (:func:`open_image`, :func:`image_pixels`);
    a missing file is an :class:`ImageInputError` too."""
    return image_pixels(open_image(_read(path, what), what=what, size=size, formats=formats), channels)


def read_mask_file(
    path: str | os.PathLike[str], *, what: str, size: int, formats: tuple[str, ...] = FILE_FORMATS
) -> np.ndarray:
    """A mask file -> bool ``(1, H, W)``, True = regenerate (:func:`mask_pixels`)."""
    return mask_pixels(open_image(_read(path, what), what=what, size=size, formats=formats))


def _read(path: str | os.PathLike[str], what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise ImageInputError(f"{what} {path}: {err.strerror or err}", what) from None


def decode_base64_image(text: Any, *, what: str, max_bytes: int) -> bytes:
    """The file bytes of an image sent as a base64 string (optionally a ``data:...;base64,`` URL,
    as a browser's FileReader makes), refused past ``max_bytes`` decoded bytes before decoding."""
    if not isinstance(text, str):
        raise ImageInputError(f"{what} must be a base64 string of a PNG file", what)
    if text.startswith("data:"):
        head, sep, text = text.partition(",")
        if not sep or not head.endswith(";base64"):
            raise ImageInputError(f"{what}: a data URL must be base64 (data:image/png;base64,...)", what)
    text = "".join(text.split())  # line breaks of a wrapped encoding
    decoded_size = len(text) * 3 // 4 - text.count("=", -2)
    if decoded_size > max_bytes:
        raise ImageInputError(
            f"{what} of {decoded_size} bytes is over the limit",
            "max_image_bytes",
            max_bytes,
            got=decoded_size,
        )
    try:
        return base64.b64decode(text, validate=True)
    except (ValueError, binascii.Error):
        raise ImageInputError(f"{what} is not valid base64", what) from None


def png_base64(image: Any) -> str:
    """uint8 ``(C, H, W)`` (torch or numpy) -> a base64 PNG string (grey for one channel)."""
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 3:
        raise ValueError(f"expected uint8 (C, H, W), got {arr.dtype} {arr.shape}")
    arr = arr[0] if arr.shape[0] == 1 else arr.transpose(1, 2, 0)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")
