"""Image fitting and encoding shared by every source.

Every shard image is square, ``image_size`` pixels, mode ``L`` (1 channel) or ``RGB`` (3), and
PNG-encoded without metadata so the same pixels always give the same bytes.
"""

from __future__ import annotations

import io

from PIL import Image, ImageOps

__all__ = ["MODES", "fit_image", "encode_png", "to_mode"]

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
