"""Hand-made shard folders with odd layouts for the loader tests (uneven sizes, corrupt samples).

Written with :mod:`tarfile` following the shard contract exactly (``<key>.json``, ``<key>.png``,
``<key>.txt`` per sample, ``manifest.json`` with per-shard counts and sha256). The digits dataset
itself comes from the real shard writer; this only makes layouts the writer would never produce.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

CORRUPTIONS = ("image", "caption", "json")


def _image_bytes(index: int, size: int, channels: int, fmt: str) -> bytes:
    rng = np.random.default_rng(index)
    shape = (size, size) if channels == 1 else (size, size, 3)
    pixels = rng.integers(0, 256, size=shape, dtype=np.uint8)
    pixels.flat[0], pixels.flat[1] = 0, 255  # every image spans the full range
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)  # (H, W) -> L, (H, W, 3) -> RGB
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_dataset(
    folder: str | Path,
    sizes: dict[str, list[int]],
    *,
    image_size: int = 8,
    channels: int = 1,
    bad: dict[str, str] | None = None,
    jpg_every: int = 0,
) -> dict:
    """Write ``<split>-NNNNNN.tar`` shards of the given sizes and ``manifest.json``; return the manifest.

    Keys are ``<split>-<shard>-<i>``; label ``i % 10``. ``bad`` maps a key to a corruption: "image"
    (bytes that are not an image), "caption" (no ``.txt``) or "json" (not valid JSON). With
    ``jpg_every=k`` every k-th sample is stored as ``.jpg`` instead of ``.png``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    bad = bad or {}
    splits = {}
    for split, shard_sizes in sizes.items():
        entries = []
        for s, count in enumerate(shard_sizes):
            name = f"{split}-{s:06d}.tar"
            with tarfile.open(folder / name, "w", format=tarfile.PAX_FORMAT) as tar:
                for i in range(count):
                    key = f"{split}-{s:02d}-{i:04d}"
                    kind = bad.get(key)
                    meta = json.dumps(
                        {"label": i % 10, "source": "test", "width": image_size, "height": image_size}
                    ).encode()
                    ext = "jpg" if jpg_every and i % jpg_every == 0 else "png"
                    image = _image_bytes(
                        zlib.crc32(key.encode()), image_size, channels, "JPEG" if ext == "jpg" else "PNG"
                    )
                    _add(tar, f"{key}.json", b"{not json" if kind == "json" else meta)
                    _add(tar, f"{key}.{ext}", b"\x89PNG garbage" if kind == "image" else image)
                    if kind != "caption":
                        _add(tar, f"{key}.txt", f"caption of {key}".encode())
            data = (folder / name).read_bytes()
            entries.append(
                {
                    "name": name,
                    "num_samples": count,
                    "bytes": len(data),
                    "sha256": hashlib.sha256(data).hexdigest(),
                }
            )
        splits[split] = {"num_samples": sum(shard_sizes), "shards": entries}
    rows = sorted((sp, e["name"], e["sha256"]) for sp, v in splits.items() for e in v["shards"])
    digest = hashlib.md5("".join(f"{a}\t{b}\t{c}\n" for a, b, c in rows).encode()).hexdigest()
    manifest = {
        "format": "aigc-shards/1",
        "name": folder.name,
        "source": {"type": "test", "path": None},
        "image_size": image_size,
        "channels": channels,
        "splits": splits,
        "skipped": {"unreadable": 0, "missing_caption": 0, "failed_status": 0},
        "digest": digest,
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def all_keys(manifest: dict, split: str) -> set[str]:
    """The keys :func:`write_dataset` wrote for ``split``."""
    return {
        f"{split}-{s:02d}-{i:04d}"
        for s, shard in enumerate(manifest["splits"][split]["shards"])
        for i in range(shard["num_samples"])
    }


def truncate(path: str | Path, fraction: float = 0.5) -> None:
    """Cut a file to ``fraction`` of its length, as an interrupted copy would."""
    path = Path(path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
