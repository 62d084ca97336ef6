"""Read a whole split of a shard dataset into memory, for training and applying the evaluator.

The evaluator needs every image of a split at once (feature statistics, nearest neighbours), not a
stream, so it reads the tars itself: only image (PIL), text (UTF-8) and json members are decoded,
nothing is unpickled. Members are grouped into samples by WebDataset's rule: the key is the member
name up to the first dot of its base name (``a/b.c.png`` -> key ``a/b``, extension ``c.png``).
Samples without an image (img2dataset failures) are skipped.
"""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import torch
from PIL import Image

from aigc.data.manifest import manifest_location, read_manifest, shard_location

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")


@dataclass
class SplitData:
    """One split in memory: ``images`` uint8 ``(N, C, H, W)``, ``labels`` long ``(N,)`` or None."""

    images: torch.Tensor
    captions: list[str]
    labels: torch.Tensor | None
    keys: list[str]

    def __len__(self) -> int:
        return len(self.captions)


def _split_name(name: str) -> tuple[str, str]:
    """WebDataset's key/extension rule (see the module docstring)."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1 :].lower()


def _decode_image(data: bytes, channels: int, where: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as img:
            arr = np.asarray(img.convert("L" if channels == 1 else "RGB"))
    except Exception as err:  # PIL raises many types for corrupt data
        raise ValueError(f"{where}: cannot decode image: {err}") from None
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)  # (C, H, W)


def read_split(
    dataset_dir: str | Path,
    split: str,
    max_images: int | None = None,
    channels: int | None = None,
) -> SplitData:
    """Every sample of ``split`` in shard order (the first ``max_images`` when given).

    ``channels`` (1 or 3) converts images; default the manifest's ``channels``. Labels are read
    from the json ``label`` field and kept only when every sample has one. ``dataset_dir`` is what
    :func:`~aigc.data.manifest.read_manifest` takes (a folder, its manifest or an fsspec URL).
    """
    manifest = read_manifest(dataset_dir)
    if split not in manifest["splits"]:
        have = sorted(manifest["splits"])
        raise KeyError(f"{manifest_location(dataset_dir)} has no split {split!r}; has {have}")
    channels = channels or int(manifest["channels"])
    images: list[np.ndarray] = []
    captions: list[str] = []
    labels: list[int | None] = []
    keys: list[str] = []

    def flush(key: str | None, sample: dict[str, bytes], where: str) -> None:
        img_ext = next((e for e in IMAGE_EXTS if e in sample), None)
        if key is None or img_ext is None:
            return
        arr = _decode_image(sample[img_ext], channels, f"{where}:{key}.{img_ext}")
        if images and arr.shape != images[0].shape:
            raise ValueError(
                f"{where}:{key}: image shape {arr.shape} differs from the first image's "
                f"{images[0].shape}; the evaluator needs one image size per dataset"
            )
        meta: dict[str, Any] = {}
        if "json" in sample:
            try:
                meta = json.loads(sample["json"].decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                raise ValueError(f"{where}:{key}.json: invalid JSON: {err}") from None
        images.append(arr)
        captions.append(sample.get("txt", b"").decode("utf-8").strip())
        label = meta.get("label") if isinstance(meta, dict) else None
        labels.append(
            int(label) if isinstance(label, (int, np.integer)) and not isinstance(label, bool) else None
        )
        keys.append(key)

    for shard in manifest["splits"][split]["shards"]:
        url = shard_location(dataset_dir, shard["name"])
        key: str | None = None
        sample: dict[str, bytes] = {}
        with fsspec.open(url, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                k, ext = _split_name(member.name)
                if ext not in (*IMAGE_EXTS, "txt", "json"):
                    continue  # never decode anything else (.pyd, .pth, ...)
                if k != key:
                    flush(key, sample, url)
                    key, sample = k, {}
                    if max_images is not None and len(images) >= max_images:
                        break
                data = tar.extractfile(member)
                if data is not None:
                    sample[ext] = data.read()
            else:
                flush(key, sample, url)
        if max_images is not None and len(images) >= max_images:
            break
    if not images:
        raise ValueError(f"{dataset_dir}: split {split!r} holds no images")
    images_t = torch.from_numpy(np.stack(images))
    labels_t = None if any(v is None for v in labels) else torch.tensor(labels, dtype=torch.long)
    return SplitData(images=images_t, captions=captions, labels=labels_t, keys=keys)
