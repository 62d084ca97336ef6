"""A PNG contact sheet of a dataset's first samples with their captions drawn underneath."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from aigc.data.loader_read import IMAGE_EXTS, decode_image, iter_tar_samples
from aigc.data.manifest import read_manifest, shard_location
from aigc.data.shards import SPLITS

__all__ = ["PreviewSample", "iter_samples", "write_preview"]

_CELL = 128  # cell width in pixels; tiny images are upscaled (nearest) to fill most of it
_LINES = 3  # caption lines per cell


@dataclass
class PreviewSample:
    key: str
    image: Image.Image
    caption: str
    meta: dict[str, Any]


def iter_samples(path: str | os.PathLike[str], limit: int | None = None) -> Iterator[PreviewSample]:
    """Decode samples in manifest order (train shards, then val), images, text and json only.

    ``path`` is what :func:`~aigc.data.manifest.read_manifest` takes. Images are decoded as the
    loader decodes them (:func:`~aigc.data.loader_read.decode_image`: the dataset's size and
    channels); samples without an image (those of a latent dataset) are left out.
    """
    manifest = read_manifest(path)
    mode, size = ("L" if manifest["channels"] == 1 else "RGB"), int(manifest["image_size"])
    count = 0
    for split in SPLITS:
        for shard in manifest["splits"].get(split, {}).get("shards", []):
            for key, parts in iter_tar_samples(shard_location(path, shard["name"])):
                ext = next((e for e in IMAGE_EXTS if e in parts), None)
                if ext is None:
                    continue
                image = Image.fromarray(decode_image(parts[ext], mode, size))
                meta = json.loads(parts["json"].decode("utf-8")) if "json" in parts else {}
                yield PreviewSample(key, image, parts.get("txt", b"").decode("utf-8"), meta)
                count += 1
                if limit is not None and count >= limit:
                    return


def _wrap(draw: ImageDraw.ImageDraw, text: str, font: Any, width: int) -> list[str]:
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    if len(lines) > _LINES:
        lines = lines[: _LINES - 1] + [lines[_LINES - 1] + "..."]
    return lines


def write_preview(path: str | os.PathLike[str], out_png: str | Path, n: int = 16) -> Path:
    """Write a grid of the first ``n`` samples of the dataset at ``path`` to ``out_png``.

    Each image is upscaled by an integer factor with nearest-neighbour (8x8 -> 64x64 or more, so
    pixels stay sharp) and its caption is drawn below in PIL's default font.
    """
    samples = list(iter_samples(path, limit=n))
    if not samples:
        raise ValueError(f"{path}: no samples to preview")
    size = max(s.image.width for s in samples)
    scale = max(1, (_CELL - 16) // size)
    img_px = size * scale
    cell_w = max(_CELL, img_px + 8)
    font = ImageFont.load_default()
    line_h = 12
    cell_h = img_px + 8 + _LINES * line_h + 6
    cols = min(len(samples), math.ceil(math.sqrt(len(samples))))
    rows = math.ceil(len(samples) / cols)
    sheet = Image.new("RGB", (cols * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    for i, s in enumerate(samples):
        x, y = (i % cols) * cell_w, (i // cols) * cell_h
        tile = s.image.convert("RGB").resize(
            (s.image.width * scale, s.image.height * scale), Image.Resampling.NEAREST
        )
        sheet.paste(tile, (x + (cell_w - tile.width) // 2, y + 4))
        for j, line in enumerate(_wrap(draw, s.caption, font, cell_w - 6)):
            draw.text((x + 3, y + img_px + 8 + j * line_h), line, fill="black", font=font)
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out, format="PNG")
    return out
