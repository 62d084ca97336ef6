"""Read the captions of a shard dataset, for building a tokenizer vocabulary before training."""

from __future__ import annotations

import os

from aigc.data.loader_read import iter_tar_samples
from aigc.data.manifest import DatasetError, manifest_location, read_manifest, shard_location


def read_captions(dataset: str | os.PathLike[str], split: str = "train") -> list[str]:
    """Every caption of ``split`` in shard order, read from the ``.txt`` members of the tars.

    ``dataset`` is what :func:`~aigc.data.manifest.read_manifest` takes (a local folder, its
    ``manifest.json`` or an fsspec URL). Only captions are decoded (UTF-8).

    A shard cut short after some whole samples gives the captions of those: the loader skips what is
    lost and counts it against ``data.max_bad_fraction``, so the job decides there whether the data
    is good enough. A shard with no whole sample (not a tar, or cut inside its first sample), or a
    caption that is not UTF-8, raises :class:`DatasetError` naming the shard.
    """
    manifest = read_manifest(dataset)
    if split not in manifest["splits"]:
        have = sorted(manifest["splits"])
        raise KeyError(f"{manifest_location(dataset)} has no split {split!r}; has {have}")
    captions: list[str] = []
    for shard in manifest["splits"][split]["shards"]:
        url = shard_location(dataset, shard["name"])
        whole = 0
        try:
            for _, parts in iter_tar_samples(url):
                whole += 1
                if "txt" in parts:
                    captions.append(parts["txt"].decode("utf-8").strip())
        except DatasetError:
            if whole == 0:
                raise
        except UnicodeDecodeError as err:
            raise DatasetError(
                f"{url}: corrupt shard ({type(err).__name__}: {err}); check it with `aigc data verify`"
            ) from None
    return captions
