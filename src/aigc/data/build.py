"""Build a dataset folder: source -> train/val split -> shards -> manifest, swapped in atomically.

The whole dataset is written into a hidden sibling folder (``.<name>.building-<pid>``) and renamed
to its final name only after the manifest is written, so an existing dataset survives a failed
rebuild untouched and a half-built folder never carries the final name.
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aigc import project_root
from aigc.config import DataConfig
from aigc.data.manifest import FORMAT, DatasetError, compute_digest, write_manifest
from aigc.data.shards import SPLITS, ShardInfo, ShardWriter
from aigc.data.sources import choose_val_keys, open_source

__all__ = ["BuildSummary", "build_dataset", "dataset_path"]

log = logging.getLogger("aigc.data")
Progress = Callable[[str], None]


@dataclass
class BuildSummary:
    """What a build produced."""

    path: Path
    name: str
    counts: dict[str, int]  # samples per split
    shards: dict[str, int]  # shards per split
    skipped: dict[str, int]  # per reason: unreadable, missing_caption, failed_status
    digest: str
    seconds: float


def dataset_path(cfg: DataConfig) -> Path:
    """``<project root>/<cfg.root>/<cfg.name>`` (``cfg.root`` may be absolute)."""
    root = Path(cfg.root).expanduser()
    return (root if root.is_absolute() else project_root() / root) / cfg.name


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _remove_stale(out: Path) -> None:
    """Remove temp folders that builds of ``out`` killed earlier left behind."""
    for tmp in out.parent.glob(f".{glob.escape(out.name)}.*-*"):
        kind, _, pid = tmp.name.rpartition("-")
        ours = kind in (f".{out.name}.building", f".{out.name}.old")
        if ours and pid.isdigit() and not _pid_alive(int(pid)):
            log.info("removing %s left by an interrupted build", tmp)
            shutil.rmtree(tmp, ignore_errors=True)


def _swap_in(tmp: Path, out: Path) -> None:
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except OSError:
        if old.exists():
            os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


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
    """Build the shard folder ``out_dir`` (default :func:`dataset_path`) from ``cfg``'s source.

    Refuses an existing folder unless ``overwrite``; ``progress`` gets a line per shard written.
    Raises :class:`DatasetError` (naming the path) on bad input or when no sample is usable.
    """
    start = time.perf_counter()
    say = progress or (lambda _msg: None)
    out = Path(out_dir).expanduser().absolute() if out_dir is not None else dataset_path(cfg)
    if out.exists() and not overwrite:
        raise DatasetError(f"{out} already exists; pass --overwrite (overwrite=True) to rebuild it")
    if out.exists() and not out.is_dir():
        raise DatasetError(f"{out} exists and is not a folder")
    source = open_source(cfg)
    candidates = source.candidates()
    val_keys = choose_val_keys(candidates, cfg.val_fraction, cfg.split_seed)
    say(f"{cfg.source}: {len(candidates)} samples to shard into {out}")

    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(out)
    tmp = out.with_name(f".{out.name}.building-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()

    def on_shard(split: str, info: ShardInfo) -> None:
        say(f"  wrote {info.name}: {info.num_samples} samples, {info.bytes / 1024:.1f} KiB")

    writers = {s: ShardWriter(tmp, s, cfg.samples_per_shard, cfg.max_shard_bytes, on_shard) for s in SPLITS}
    try:
        for sample in source.samples():
            writers["val" if sample.key in val_keys else "train"].write(sample)
        infos = {split: w.close() for split, w in writers.items()}
        counts = {split: sum(i.num_samples for i in shards) for split, shards in infos.items()}
        if sum(counts.values()) == 0:
            where = cfg.source_path or cfg.source
            raise DatasetError(f"{where}: no usable samples (skipped: {source.skipped})")
        manifest = _manifest(cfg, source.describe(), infos, dict(source.skipped))
        write_manifest(tmp, manifest)
        _swap_in(tmp, out)
    except BaseException:
        for w in writers.values():
            w.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return BuildSummary(
        path=out,
        name=cfg.name,
        counts=counts,
        shards={split: len(shards) for split, shards in infos.items()},
        skipped=dict(source.skipped),
        digest=manifest["digest"],
        seconds=time.perf_counter() - start,
    )
