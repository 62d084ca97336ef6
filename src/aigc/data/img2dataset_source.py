"""The WebDataset output folder of img2dataset, re-sharded to this project's shard size.

img2dataset writes ``NNNNN.tar`` files holding ``<key>.jpg``, ``<key>.txt`` and ``<key>.json``
(with a ``status`` field), plus parquet and stats files that are ignored here. Tars are read
with :mod:`tarfile` in memory only: nothing is extracted, nothing but images, text and JSON is
decoded. A sample whose json ``status`` is not ``"success"`` is skipped and counted (a sample
without a json is taken as is). JPEGs already at the target size and mode are kept byte for
byte; everything else is resized, center-cropped and stored as PNG.
"""

from __future__ import annotations

import io
import json
import logging
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from aigc.data.images import MODES, encode_png, fit_image
from aigc.data.manifest import DatasetError
from aigc.data.sample import Sample, new_skip_counts

__all__ = ["Img2DatasetSource"]

log = logging.getLogger("aigc.data")
_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


@dataclass
class _Entry:
    key: str  # our key, img2dataset-NNNNNN
    tar: Path
    source_key: str
    image: tarfile.TarInfo
    text: tarfile.TarInfo
    meta: dict[str, Any]


def _group(tar: tarfile.TarFile) -> Iterator[tuple[str, dict[str, tarfile.TarInfo]]]:
    """``(key, {ext: member})`` per sample; members of a sample are consecutive in a tar."""
    key, parts = None, {}
    for member in tar:
        if not member.isfile():
            continue
        stem, dot, ext = member.name.rpartition("/")[2].partition(".")
        if not dot:
            continue
        if stem != key and key is not None:
            yield key, parts
            parts = {}
        key = stem
        parts[ext.lower()] = member
    if key is not None:
        yield key, parts


class Img2DatasetSource:
    """Samples of every ``*.tar`` directly in ``root`` (sorted), keys ``img2dataset-NNNNNN``."""

    def __init__(self, root: Path, image_size: int, channels: int) -> None:
        self.root = root
        self.image_size = image_size
        self.channels = channels
        self.skipped = new_skip_counts()
        tars = sorted(root.glob("*.tar"))
        if not tars:
            raise DatasetError(f"{root}: no .tar files (expected img2dataset webdataset output)")
        # First pass: only headers and the small json members are read, to know which samples
        # are usable before the split is chosen.
        self._entries: list[_Entry] = []
        index = 0
        for path in tars:
            try:
                with tarfile.open(path, mode="r:") as tar:
                    for source_key, parts in _group(tar):
                        self._scan(tar, path, f"img2dataset-{index:06d}", source_key, parts)
                        index += 1
            except tarfile.TarError as err:
                raise DatasetError(f"{path}: not a readable tar ({err})") from None

    def _scan(
        self, tar: tarfile.TarFile, path: Path, key: str, source_key: str, parts: dict[str, tarfile.TarInfo]
    ) -> None:
        meta: dict[str, Any] = {}
        if "json" in parts:
            f = tar.extractfile(parts["json"])
            try:
                meta = json.loads(f.read().decode("utf-8")) if f is not None else {}
            except (UnicodeDecodeError, json.JSONDecodeError):
                meta = {"status": "unreadable json"}
            if not isinstance(meta, dict):
                meta = {"status": "unreadable json"}
            if meta.get("status", "success") != "success":
                log.debug("skipping %s:%s: status %r", path, source_key, meta.get("status"))
                self.skipped["failed_status"] += 1
                return
        image_ext = next((e for e in _IMAGE_EXTS if e in parts), None)
        if image_ext is None:
            log.warning("skipping %s:%s: no image member", path, source_key)
            self.skipped["unreadable"] += 1
            return
        if "txt" not in parts:
            log.warning("skipping %s:%s: no caption (.txt member)", path, source_key)
            self.skipped["missing_caption"] += 1
            return
        self._entries.append(_Entry(key, path, source_key, parts[image_ext], parts["txt"], meta))

    def candidates(self) -> list[str]:
        return [e.key for e in self._entries]

    def samples(self) -> Iterator[Sample]:
        tar: tarfile.TarFile | None = None
        current: Path | None = None
        try:
            for entry in self._entries:  # grouped by tar, so each tar is opened once
                if tar is None or current != entry.tar:
                    if tar is not None:
                        tar.close()
                    tar, current = tarfile.open(entry.tar, mode="r:"), entry.tar  # noqa: SIM115
                sample = self._read(tar, entry)
                if sample is not None:
                    yield sample
        finally:
            if tar is not None:
                tar.close()

    def _read(self, tar: tarfile.TarFile, entry: _Entry) -> Sample | None:
        where = f"{entry.tar}:{entry.source_key}"
        caption = (tar.extractfile(entry.text) or io.BytesIO()).read().decode("utf-8", "replace").strip()
        if not caption:
            log.warning("skipping %s: empty caption", where)
            self.skipped["missing_caption"] += 1
            return None
        data = (tar.extractfile(entry.image) or io.BytesIO()).read()
        size = self.image_size
        try:
            with Image.open(io.BytesIO(data)) as raw:
                raw.load()
                keep = raw.format == "JPEG" and raw.size == (size, size) and raw.mode == MODES[self.channels]
                orig_w, orig_h = raw.size
                img = None if keep else fit_image(raw, size, self.channels)
        except Exception as err:  # noqa: BLE001 - PIL raises many types on corrupt input
            log.warning("skipping %s: unreadable image (%s: %s)", where, type(err).__name__, err)
            self.skipped["unreadable"] += 1
            return None
        meta: dict[str, Any] = {
            "label": None,
            "source": "img2dataset",
            "source_key": entry.source_key,
            "width": size,
            "height": size,
            "orig_width": orig_w,
            "orig_height": orig_h,
        }
        if isinstance(entry.meta.get("url"), str):
            meta["url"] = entry.meta["url"]
        if img is None:
            return Sample(entry.key, data, "jpg", caption, meta)
        return Sample(entry.key, encode_png(img), "png", caption, meta)

    def describe(self) -> dict[str, Any]:
        return {"type": "img2dataset", "path": str(self.root)}
