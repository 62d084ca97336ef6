"""Read a whole split of a shard dataset into memory, for training and applying the evaluator.

The evaluator needs every image of a split at once (feature statistics, nearest neighbours), not a
stream, so it reads the tars itself: only image (PIL), text (UTF-8) and json members are decoded,
nothing is unpickled. Members are grouped into samples by WebDataset's rule: the key is the member
name up to the first dot of its base name (``a/b.c.png`` -> key ``a/b``, extension ``c.png``).
Samples without an image (img2dataset failures) are skipped.
"""

from __future__ import annotations

import hashlib
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


def read_manifest(dataset_dir: str | Path) -> dict[str, Any]:
    """The parsed ``manifest.json`` of a shard folder; a clear error if it is missing or invalid."""
    base = str(dataset_dir).rstrip("/")
    url = f"{base}/manifest.json"
    try:
        with fsspec.open(url, "rt", encoding="utf-8") as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{url} not found: {base} is not a shard dataset (build it with `aigc data build`)"
        ) from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{url}: not valid JSON: {err}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("splits"), dict):
        raise ValueError(f"{url}: no 'splits' mapping")
    return manifest


def data_version(dataset_dir: str | Path) -> str:
    """A content identifier of the dataset: ``aigc.data.version.version`` where that module exists,
    else the manifest's ``digest``, else the sha256 of ``manifest.json`` (which lists every shard's
    sha256, so it changes whenever the data does)."""
    try:
        from aigc.data.version import version  # written by the data helpers; optional here
    except ImportError:
        version = None
    if version is not None:
        try:
            v = version(dataset_dir)
            if v:
                return str(v)
        except (FileNotFoundError, ValueError, OSError):
            pass  # an untracked folder: fall back to the manifest
    manifest = read_manifest(dataset_dir)
    if manifest.get("digest"):
        return str(manifest["digest"])
    blob = json.dumps(manifest, sort_keys=True).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:32]


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


def _infer_channels(manifest: dict[str, Any]) -> int | None:
    c = manifest.get("channels")
    return int(c) if c in (1, 3) else None


def read_split(
    dataset_dir: str | Path,
    split: str,
    max_images: int | None = None,
    channels: int | None = None,
) -> SplitData:
    """Every sample of ``split`` in shard order (the first ``max_images`` when given).

    ``channels`` (1 or 3) converts images; default the manifest's ``channels``, else the mode of
    the first image. Labels are read from the json ``label`` field and kept only when every sample
    has one.
    """
    base = str(dataset_dir).rstrip("/")
    manifest = read_manifest(base)
    if split not in manifest["splits"]:
        raise KeyError(f"{base}/manifest.json has no split {split!r}; has {sorted(manifest['splits'])}")
    channels = channels or _infer_channels(manifest)
    images: list[np.ndarray] = []
    captions: list[str] = []
    labels: list[int | None] = []
    keys: list[str] = []

    def flush(key: str | None, sample: dict[str, bytes], where: str) -> None:
        nonlocal channels
        img_ext = next((e for e in IMAGE_EXTS if e in sample), None)
        if key is None or img_ext is None:
            return
        if channels is None:
            with Image.open(io.BytesIO(sample[img_ext])) as probe:
                channels = 1 if probe.mode in ("1", "L", "LA", "I", "I;16", "F") else 3
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

    for shard in manifest["splits"][split].get("shards", []):
        url = f"{base}/{shard['name']}"
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
        raise ValueError(f"{base}: split {split!r} holds no images")
    images_t = torch.from_numpy(np.stack(images))
    labels_t = None if any(v is None for v in labels) else torch.tensor(labels, dtype=torch.long)
    return SplitData(images=images_t, captions=captions, labels=labels_t, keys=keys)
