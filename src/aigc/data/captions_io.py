"""Read the captions of a shard dataset, for building a tokenizer vocabulary before training."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import fsspec


def read_captions(dataset: str | Path, split: str = "train") -> list[str]:
    """Every caption of ``split`` in shard order, read from the ``.txt`` members of the tars.

    ``dataset`` is a local folder or an fsspec URL holding ``manifest.json``. Only text members are
    read; nothing is decoded beyond UTF-8.
    """
    base = str(dataset).rstrip("/")
    with fsspec.open(f"{base}/manifest.json", "rt", encoding="utf-8") as f:
        manifest = json.load(f)
    if split not in manifest.get("splits", {}):
        have = sorted(manifest.get("splits", {}))
        raise KeyError(f"{base}/manifest.json has no split {split!r}; has {have}")
    captions: list[str] = []
    for shard in manifest["splits"][split]["shards"]:
        url = f"{base}/{shard['name']}"
        with fsspec.open(url, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for member in tar:
                if member.isfile() and member.name.endswith(".txt"):
                    data = tar.extractfile(member)
                    if data is not None:
                        captions.append(data.read().decode("utf-8").strip())
    return captions
