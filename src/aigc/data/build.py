"""Build a dataset folder: source -> train/val split -> shards -> manifest, swapped in atomically.

The whole dataset is written through :class:`~aigc.data.staging.StagedFolder`: into a hidden
sibling folder, renamed to its final name only after the manifest is written, so an existing
dataset survives a failed rebuild untouched and a half-built folder never carries the final name.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aigc.config import DataConfig
from aigc.data.location import dataset_path
from aigc.data.manifest import FORMAT, DatasetError, compute_digest, write_manifest
from aigc.data.shards import SPLITS, ShardInfo, ShardWriter
from aigc.data.sources import choose_val_keys, open_source
from aigc.data.staging import StagedFolder

__all__ = ["BuildSummary", "build_dataset"]

Progress = Callable[[str], None]


@dataclass
class BuildSummary:
    """What a build (or an encode) produced."""

    path: Path
    name: str
    counts: dict[str, int]  # samples per split
    shards: dict[str, int]  # shards per split
    skipped: dict[str, int]  # per reason: unreadable, missing_caption, failed_status
    digest: str
    seconds: float


def _manifest(
    cfg: DataConfig, source: dict[str, Any], infos: dict[str, list[ShardInfo]], skipped: dict[str, int]
) -> dict[str, Any]:
    splits = {
        split: {"num_samples": sum(s.num_samples for s in shards), "shards": [s.to_json() for s in shards]}
        for split, shards in infos.items()
    }
    return {
        "format": FORMAT,
        "name": cfg.name,
        "source": source,
        "image_size": cfg.image_size,
        "channels": cfg.channels,
        "split_seed": cfg.split_seed,
        "val_fraction": cfg.val_fraction,
        "samples_per_shard": cfg.samples_per_shard,
        "max_shard_bytes": cfg.max_shard_bytes,
        "splits": splits,
        "skipped": skipped,
        "digest": compute_digest(splits),
    }


def build_dataset(
    cfg: DataConfig,
    out_dir: str | Path | None = None,
    progress: Progress | None = None,
    overwrite: bool = False,
) -> BuildSummary:
    """Build the shard folder ``out_dir`` (default the project's folder for ``cfg``,
    :func:`~aigc.data.location.dataset_path`) from ``cfg``'s source.

    Refuses an existing folder unless ``overwrite``; ``progress`` gets a line per shard written.
    Raises :class:`DatasetError` (naming the path) on bad input or when no sample is usable.
    """
    start = time.perf_counter()
    say = progress or (lambda _msg: None)
    out = Path(out_dir).expanduser().absolute() if out_dir is not None else dataset_path(cfg)
    staging = StagedFolder(out, overwrite=overwrite)  # refuses an existing folder before any work
    source = open_source(cfg)
    candidates = source.candidates()
    val_keys = choose_val_keys(candidates, cfg.val_fraction, cfg.split_seed)
    say(f"{cfg.source}: {len(candidates)} samples to shard into {out}")

    def on_shard(split: str, info: ShardInfo) -> None:
        say(f"  wrote {info.name}: {info.num_samples} samples, {info.bytes / 1024:.1f} KiB")

    # Exits in reverse: an error aborts the writers (drops their open .tar.tmp), then the staging
    # folder goes; a clean exit swaps the folder in after the manifest is written.
    with staging as tmp, ExitStack() as writing:
        size, max_bytes = cfg.samples_per_shard, cfg.max_shard_bytes
        writers = {s: writing.enter_context(ShardWriter(tmp, s, size, max_bytes, on_shard)) for s in SPLITS}
        for sample in source.samples():
            writers["val" if sample.key in val_keys else "train"].write(sample)
        infos = {split: w.close() for split, w in writers.items()}
        counts = {split: sum(i.num_samples for i in shards) for split, shards in infos.items()}
        if sum(counts.values()) == 0:
            where = cfg.source_path or cfg.source
            raise DatasetError(f"{where}: no usable samples (skipped: {source.skipped})")
        manifest = _manifest(cfg, source.describe(), infos, dict(source.skipped))
        write_manifest(tmp, manifest)
    return BuildSummary(
        path=out,
        name=cfg.name,
        counts=counts,
        shards={split: len(shards) for split, shards in infos.items()},
        skipped=dict(source.skipped),
        digest=manifest["digest"],
        seconds=time.perf_counter() - start,
    )
