"""Read a whole split of a shard dataset into memory, for training and applying the evaluator.

The evaluator needs every image of a split at once (feature statistics, nearest neighbours), not a
stream. The shards are read by the data layer's one reader
(:func:`aigc.data.loader_read.iter_tar_samples`: WebDataset's grouping of members into samples) and
the images decoded as the loader decodes them (:func:`aigc.data.loader_read.decode_image`, at the
manifest's image size), so the evaluator sees the pixels training sees. Only image, text and json
members are decoded, nothing is unpickled. Samples without an image (img2dataset failures) are
skipped; unlike the loader, which skips and counts bad samples, an undecodable image or json here
is an error naming the sample.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from aigc.data.loader_read import IMAGE_EXTS, decode_image, iter_tar_samples
from aigc.data.manifest import manifest_location, read_manifest, shard_location


@dataclass
class SplitData:
    """One split in memory: ``images`` uint8 ``(N, C, H, W)``, ``labels`` long ``(N,)`` or None."""

    images: torch.Tensor
    captions: list[str]
    labels: torch.Tensor | None
    keys: list[str]

    def __len__(self) -> int:
        return len(self.captions)


def _decode(data: bytes, mode: str, size: int, where: str) -> np.ndarray:
    try:
        arr = decode_image(data, mode, size)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise ValueError(f"{where}: cannot decode image: {err}") from None
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)  # (C, H, W)


def read_split(
    dataset_dir: str | Path,
    split: str,
    max_images: int | None = None,
    channels: int | None = None,
) -> SplitData:
    """Every sample of ``split`` in shard order (the first ``max_images`` when given).

    ``channels`` (1 or 3) converts images; default the manifest's ``channels``. Images come out at
    the manifest's ``image_size`` (one size per dataset, as the evaluator needs). Labels are read
    from the json ``label`` field and kept only when every sample has one. ``dataset_dir`` is what
    :func:`~aigc.data.manifest.read_manifest` takes (a folder, its manifest or an fsspec URL).
    """
    manifest = read_manifest(dataset_dir)
    if split not in manifest["splits"]:
        have = sorted(manifest["splits"])
        raise KeyError(f"{manifest_location(dataset_dir)} has no split {split!r}; has {have}")
    channels = channels or int(manifest["channels"])
    mode, size = ("L" if channels == 1 else "RGB"), int(manifest["image_size"])
    images: list[np.ndarray] = []
    captions: list[str] = []
    labels: list[int | None] = []
    keys: list[str] = []

    for shard in manifest["splits"][split]["shards"]:
        if max_images is not None and len(images) >= max_images:
            break
        url = shard_location(dataset_dir, shard["name"])
        for key, sample in iter_tar_samples(url):
            img_ext = next((e for e in IMAGE_EXTS if e in sample), None)
            if img_ext is None:
                continue
            images.append(_decode(sample[img_ext], mode, size, f"{url}:{key}.{img_ext}"))
            meta: dict[str, Any] = {}
            if "json" in sample:
                try:
                    meta = json.loads(sample["json"].decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError) as err:
                    raise ValueError(f"{url}:{key}.json: invalid JSON: {err}") from None
            captions.append(sample.get("txt", b"").decode("utf-8").strip())
            label = meta.get("label") if isinstance(meta, dict) else None
            labels.append(
                int(label) if isinstance(label, (int, np.integer)) and not isinstance(label, bool) else None
            )
            keys.append(key)
            if max_images is not None and len(images) >= max_images:
                break
    if not images:
        raise ValueError(f"{dataset_dir}: split {split!r} holds no images")
    images_t = torch.from_numpy(np.stack(images))
    labels_t = None if any(v is None for v in labels) else torch.tensor(labels, dtype=torch.long)
    return SplitData(images=images_t, captions=captions, labels=labels_t, keys=keys)
