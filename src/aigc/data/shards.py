"""Write samples into numbered WebDataset tar shards, atomically and byte-reproducibly.

A shard is written to ``<name>.tar.tmp``, fsynced, and renamed to ``<name>.tar`` only when it is
complete, so a crash (even SIGKILL) never leaves a short tar under a final name. Tar members get
fixed metadata (mtime 0, uid/gid 0, mode 0644, no user names) and a fixed order, so the same
samples always give byte-identical shards and the same sha256. Shards are read back by
:mod:`aigc.data.loader_read`, the one reader of the format.
"""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from aigc.data.manifest import DatasetError, sha256_file
from aigc.data.sample import Sample

__all__ = ["SPLITS", "ShardInfo", "ShardWriter", "shard_name"]

SPLITS = ("train", "val")
_FORMAT = tarfile.PAX_FORMAT
_END_OF_ARCHIVE = 2 * tarfile.BLOCKSIZE  # two zero blocks tarfile writes on close


def shard_name(split: str, index: int) -> str:
    """``train-000000.tar``: the split and a 6-digit index from 0."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if index < 0:
        raise ValueError(f"shard index must be >= 0, got {index}")
    return f"{split}-{index:06d}.tar"


@dataclass(frozen=True)
class ShardInfo:
    """One finished shard, as listed in the manifest."""

    name: str
    num_samples: int
    bytes: int
    sha256: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


def _padded(n: int) -> int:
    return -(-n // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable; not possible on every platform, where it is skipped.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class ShardWriter:
    """Writes the samples of one split to ``<folder>/<split>-NNNNNN.tar``.

    A shard is closed when it holds ``samples_per_shard`` samples, or before a sample that would
    make the file exceed ``max_shard_bytes`` (a shard always holds at least one sample, so one
    sample larger than the limit gets a shard of its own). ``on_shard(split, info)`` is called
    after each shard is renamed to its final name. Use as a context manager: an exception aborts
    (removes the open ``.tar.tmp``), a normal exit closes.
    """

    def __init__(
        self,
        folder: str | Path,
        split: str,
        samples_per_shard: int = 100,
        max_shard_bytes: int = 64 * 2**20,
        on_shard: Callable[[str, ShardInfo], None] | None = None,
    ) -> None:
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
        shard_name(split, 0)  # validates the split
        self.folder = Path(folder)
        self.split = split
        self.samples_per_shard = samples_per_shard
        self.max_shard_bytes = max_shard_bytes
        self.on_shard = on_shard
        self.shards: list[ShardInfo] = []
        self._file: io.BufferedWriter | None = None
        self._tar: tarfile.TarFile | None = None
        self._count = 0
        self._closed = False
        self._keys: set[str] = set()

    @property
    def num_samples(self) -> int:
        """Samples written so far, in finished and open shards."""
        return sum(s.num_samples for s in self.shards) + self._count

    def _paths(self) -> tuple[Path, Path]:
        final = self.folder / shard_name(self.split, len(self.shards))
        return final, final.with_name(final.name + ".tmp")

    def write(self, sample: Sample) -> None:
        """Append one sample; keys must be unique within the writer."""
        if self._closed:
            raise RuntimeError("ShardWriter is closed")
        if sample.key in self._keys:
            raise DatasetError(f"duplicate sample key {sample.key!r} in split {self.split}")
        self._keys.add(sample.key)
        members = [(_tarinfo(name, len(data)), data) for name, data in sample.members()]
        size = sum(
            len(info.tobuf(_FORMAT, "utf-8", "surrogateescape")) + _padded(len(data))
            for info, data in members
        )
        if self._tar is not None and self._count > 0:
            # The file size after close: payload + end blocks, padded to tarfile's record size.
            projected = -(-(self._tar.offset + size + _END_OF_ARCHIVE) // tarfile.RECORDSIZE)
            if projected * tarfile.RECORDSIZE > self.max_shard_bytes:
                self._finish()
        if self._tar is None:
            _, tmp = self._paths()
            self.folder.mkdir(parents=True, exist_ok=True)
            # Both stay open across write() calls; _finish() and abort() close them.
            self._file = open(tmp, "wb")  # noqa: SIM115
            self._tar = tarfile.open(  # noqa: SIM115
                fileobj=self._file, mode="w", format=_FORMAT, encoding="utf-8"
            )
        for info, data in members:
            self._tar.addfile(info, io.BytesIO(data))
        self._count += 1
        if self._count >= self.samples_per_shard:
            self._finish()

    def _finish(self) -> None:
        assert self._tar is not None and self._file is not None
        final, tmp = self._paths()
        self._tar.close()  # writes the end-of-archive blocks; leaves our file object open
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        info = ShardInfo(final.name, self._count, tmp.stat().st_size, sha256_file(tmp))
        os.replace(tmp, final)
        _fsync_dir(self.folder)
        self.shards.append(info)
        self._tar, self._file, self._count = None, None, 0
        if self.on_shard is not None:
            self.on_shard(self.split, info)

    def close(self) -> list[ShardInfo]:
        """Finish the open shard (if any) and return every shard written."""
        if not self._closed:
            if self._tar is not None:
                self._finish()
            self._closed = True
        return list(self.shards)

    def abort(self) -> None:
        """Drop the open shard's ``.tar.tmp``; finished shards stay."""
        if self._file is not None:
            self._file.close()
            self._paths()[1].unlink(missing_ok=True)
        self._tar, self._file, self._count = None, None, 0
        self._closed = True

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
