"""Read the captions of a shard dataset, for building a tokenizer vocabulary before training."""

from __future__ import annotations

import os
import tarfile

import fsspec

from aigc.data.manifest import DatasetError, manifest_location, read_manifest, shard_location


def read_captions(dataset: str | os.PathLike[str], split: str = "train") -> list[str]:
    """Every caption of ``split`` in shard order, read from the ``.txt`` members of the tars.

    ``dataset`` is what :func:`~aigc.data.manifest.read_manifest` takes (a local folder, its
    ``manifest.json`` or an fsspec URL). Only text members are read; nothing is decoded beyond UTF-8.
    """
    manifest = read_manifest(dataset)
    if split not in manifest["splits"]:
        have = sorted(manifest["splits"])
        raise KeyError(f"{manifest_location(dataset)} has no split {split!r}; has {have}")
    captions: list[str] = []
    for shard in manifest["splits"][split]["shards"]:
        url = shard_location(dataset, shard["name"])
        try:
            with fsspec.open(url, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
                for member in tar:
                    if member.isfile() and member.name.endswith(".txt"):
                        data = tar.extractfile(member)
                        if data is not None:
                            captions.append(data.read().decode("utf-8").strip())
        except (tarfile.TarError, UnicodeDecodeError, EOFError) as err:
            # A truncated or corrupt shard: say which one (tarfile's own message names no file).
            raise DatasetError(
                f"{url}: corrupt shard ({type(err).__name__}: {err}); check it with `aigc data verify`"
            ) from None
    return captions
