"""A folder of images (png/jpg/jpeg/webp, searched recursively) with captions.

Captions come, in order of preference, from a sidecar ``<stem>.txt`` beside the image, from
``captions.jsonl`` (``{"file": ..., "caption": ...}`` per line) or from ``captions.csv``
(columns ``file,caption``) at the folder's top; ``file`` is the path relative to the folder.
An image without a caption or that PIL cannot read is logged by path and skipped.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from PIL import Image

from aigc.data.images import encode_png, fit_image
from aigc.data.manifest import DatasetError
from aigc.data.sample import Sample, new_skip_counts

__all__ = ["FolderSource", "IMAGE_EXTENSIONS"]

log = logging.getLogger("aigc.data")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")


def _read_captions_jsonl(path: Path) -> dict[str, str]:
    captions: dict[str, str] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            captions[str(row["file"])] = str(row["caption"])
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise DatasetError(f'{path}:{n}: expected {{"file": ..., "caption": ...}} ({err})') from None
    return captions


def _read_captions_csv(path: Path) -> dict[str, str]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"file", "caption"} <= set(reader.fieldnames):
            raise DatasetError(f"{path}: needs a header with columns file,caption")
        return {row["file"]: row["caption"] or "" for row in reader if row["file"]}


class FolderSource:
    """Images under ``root`` in sorted relative-path order; keys ``folder-NNNNNN`` by that order."""

    def __init__(self, root: Path, image_size: int, channels: int) -> None:
        self.root = root
        self.image_size = image_size
        self.channels = channels
        self.skipped = new_skip_counts()
        table: dict[str, str] = {}
        if (root / "captions.csv").is_file():
            table.update(_read_captions_csv(root / "captions.csv"))
        if (root / "captions.jsonl").is_file():
            table.update(_read_captions_jsonl(root / "captions.jsonl"))
        files = sorted(
            p
            for p in root.rglob("*")
            if p.suffix.lower() in IMAGE_EXTENSIONS
            and p.is_file()
            and not any(part.startswith(".") for part in p.relative_to(root).parts)
        )
        # Numbered over every image found, so adding a caption later does not renumber others.
        self._items: list[tuple[str, Path, str]] = []
        for i, file in enumerate(files):
            rel = file.relative_to(root).as_posix()
            sidecar = file.with_suffix(".txt")
            caption = sidecar.read_text(encoding="utf-8") if sidecar.is_file() else table.get(rel, "")
            caption = caption.strip()
            if not caption:
                log.warning("skipping %s: no caption (no %s, not in captions.jsonl/csv)", file, sidecar.name)
                self.skipped["missing_caption"] += 1
                continue
            self._items.append((f"folder-{i:06d}", file, caption))
        if not files:
            raise DatasetError(f"{root}: no images ({', '.join(IMAGE_EXTENSIONS)})")

    def candidates(self) -> list[str]:
        return [key for key, _, _ in self._items]

    def samples(self) -> Iterator[Sample]:
        for key, file, caption in self._items:
            try:
                with Image.open(file) as raw:
                    raw.load()
                    orig_w, orig_h = raw.size
                    img = fit_image(raw, self.image_size, self.channels)
            except Exception as err:  # noqa: BLE001 - PIL raises many types on corrupt input
                log.warning("skipping %s: unreadable image (%s: %s)", file, type(err).__name__, err)
                self.skipped["unreadable"] += 1
                continue
            meta = {
                "label": None,
                "source": "folder",
                "file": file.relative_to(self.root).as_posix(),
                "width": img.width,
                "height": img.height,
                "orig_width": orig_w,
                "orig_height": orig_h,
            }
            yield Sample(key, encode_png(img), "png", caption, meta)

    def describe(self) -> dict[str, Any]:
        return {"type": "folder", "path": str(self.root)}
