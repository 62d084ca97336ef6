"""Streaming loader: WebDataset-layout tar shards -> batches, split by rank and DataLoader worker.

:class:`ShardDataModule` reads ``manifest.json`` of a dataset folder (a local path or an fsspec URL)
and serves ``train_dataloader()`` / ``val_dataloader()``. Each batch is a dict::

    {"image": FloatTensor (B, C, H, W) in [-1, 1], "caption": list[str], "label": LongTensor (B,),
     "key": list[str], "valid": BoolTensor (B,), "index": LongTensor (B,)}

``index`` is each sample's global index in its split (shard offset in manifest order + position in
the tar, :func:`aigc.data.loader_split.global_offsets`): what a checkpoint records as trained on.

A latent dataset (:mod:`aigc.data.latents`, made by ``aigc data encode``) gives the same dict with
the stored latents under ``"image"``: float32 ``(B, c, h, w)`` (KL) or int64 codes ``(B, h, w)`` (VQ).

Equal batch counts (DDP never hangs on uneven shards): every rank yields exactly
``batches_per_epoch(split) = ceil(N / (world * batch_size))`` full batches of ``batch_size``. How the
samples are shared out is in :mod:`aigc.data.loader_split`: ranks (and the DataLoader workers of a
rank) get disjoint samples, whole shards wherever the sizes allow, and together cover the split.

Padding: a worker whose share does not fill its batches repeats its own first samples of the epoch
(cyclically) to fill them. Repeats happen within a rank only, never across ranks, and are marked
``valid = False`` in the batch; every real sample is ``valid = True`` exactly once per epoch. For
validation, compute metrics over ``batch["valid"]`` only to count each val sample exactly once; for
training, the repeats are ordinary extra samples (use or mask them). Bad samples are skipped, so a
worker that lost some pads more; the batch count never changes.

Shuffling (train only): the shard order is shuffled with ``seed + epoch`` (so ranks get different
shards each epoch), and each worker passes its samples through a shuffle buffer of
``DataConfig.shuffle_buffer`` samples seeded by ``(seed, epoch, rank, worker)``. The epoch comes from
``trainer.current_epoch`` when the DataModule is attached to a Lightning trainer, else from
:meth:`ShardDataModule.set_epoch`. It reaches the DataLoader workers through one shared-memory cell
that the workers read each time an epoch starts, so the workers are persistent: forked once per
loader, not once per epoch (a fork per epoch stalled training every ~23 steps on the digits).

Decoded-sample cache: each process that reads shards (a DataLoader worker, or the main process when
``num_workers=0``) keeps the samples it decoded, up to ``DataConfig.decoded_cache_mb``, and later
epochs take them from memory instead of reading and decoding the tar again. The cache changes no
batch: samples, order, padding, bad-sample counts and mid-epoch resume are the same with it as
without it. A piece of a tar that could not be read to its end (truncated, missing) is never cached,
so its loss is found and reported again every epoch. Memory: up to the budget per reading process
and split; with shuffled shard orders every worker eventually sees every shard of its split.

Mid-epoch resume: at the world size the epoch started with, the stream skips the batches already
trained on (:meth:`ShardStream.resume_at`), so the run sees exactly the batches an uninterrupted run
would. At another world size (elastic training) it is given the epoch's trained-on samples instead
and shares out the rest over the new ranks (:func:`aigc.data.loader_split.plan_remaining`): every
sample of the epoch is still trained on once, in different batches.

Bad data: a truncated tar, an undecodable image, a missing caption or bad json is logged (shard URL
and key), skipped and counted per process (a DataLoader worker, or the main process when
``num_workers=0``). When that process's bad count exceeds ``max_bad_fraction`` of the samples it
was assigned this epoch, it raises :class:`BadDataError` naming the fraction, threshold and the worst
shards. Below the threshold the counts still reach the rank's main process:
:meth:`ShardStream.bad_per_shard` (and :meth:`ShardDataModule.bad_per_shard`) gives this epoch's
bad samples per shard over all the rank's DataLoader workers, for the trainer to report.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from aigc.config import DataConfig
from aigc.data.latents import latent_spec
from aigc.data.loader_read import BadDataError, BadSample, ReadStats, decode_sample, iter_piece, log
from aigc.data.loader_split import (
    Piece,
    batches_per_epoch,
    epoch_shard_order,
    global_offsets,
    plan_remaining,
    plan_slot,
)
from aigc.data.location import resolve_location
from aigc.data.manifest import read_manifest, shard_location
from aigc.data.version import version

__all__ = ["BadDataError", "ShardDataModule", "ShardStream", "rank_and_world"]

_SPLITS = ("train", "val")


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the world size: torch.distributed if initialised, else the
    ``RANK``/``WORLD_SIZE`` environment variables (Ray Train sets them), else ``(0, 1)``."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    try:
        rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ValueError(
            f"RANK={os.environ.get('RANK')!r} / WORLD_SIZE={os.environ.get('WORLD_SIZE')!r} are not integers"
        ) from None
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is outside WORLD_SIZE={world}")
    return rank, world


class ShardStream(IterableDataset):
    """The batches of one split for one rank; each DataLoader worker yields its own share.

    Iterating yields exactly ``len(self)`` batches per rank in total over the workers (use it with
    ``DataLoader(batch_size=None)``). ``stats`` holds the :class:`ReadStats` of the last epoch read in
    this process (the main process only sees them with ``num_workers=0``).
    """

    def __init__(
        self,
        urls: list[str],
        sizes: list[int],
        *,
        batch_size: int,
        channels: int,
        image_size: int,
        rank: int = 0,
        world: int = 1,
        shuffle: bool = False,
        shuffle_buffer: int = 0,
        seed: int = 0,
        max_bad_fraction: float = 0.0,
        loader_workers: int = 0,
        latent: dict[str, Any] | None = None,
        cache_bytes: int = 0,
    ) -> None:
        if len(urls) != len(sizes):
            raise ValueError(f"{len(urls)} shard URLs but {len(sizes)} sizes")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside world size {world}")
        self.urls, self.sizes = list(urls), list(sizes)
        self.batch_size, self.channels, self.image_size = batch_size, channels, image_size
        self.rank, self.world = rank, world
        self.shuffle, self.shuffle_buffer, self.seed = shuffle, shuffle_buffer, seed
        self.max_bad_fraction = max_bad_fraction
        # A latent dataset (aigc.data.latents): batches carry the stored arrays, not pixels.
        self.latent = latent
        # The epoch, in shared memory: persistent DataLoader workers hold copies of this object made
        # when they started, and read the epoch from here each time an epoch starts.
        self._epoch_cell = torch.zeros(1, dtype=torch.int64).share_memory_()
        # Decoded-sample cache of the process reading the shards: shard index -> one entry per
        # sample position (None until decoded); see the module docstring.
        self._cache: dict[int, list[tuple[str, tuple | None, str | None] | None]] = {}
        self._cache_left = int(cache_bytes)
        self.stats = ReadStats()
        self._offsets = global_offsets(self.sizes)
        self.resume_epoch: int | None = None
        self.resume_batches = 0
        self.resume_seen: np.ndarray | None = None  # bool (N,): the epoch's samples already trained on
        # Bad samples per shard this epoch, one row per DataLoader worker (``loader_workers``; one
        # row for the main process). A worker's ReadStats die with it, so it publishes its counts
        # here, in shared memory allocated before the workers start, and the rank's main process
        # sums the rows. Each worker writes only its own row: no lock.
        self._shard_index = {url: i for i, url in enumerate(self.urls)}
        self._bad_table = torch.zeros(max(1, loader_workers), len(self.urls), dtype=torch.int64)
        self._bad_table.share_memory_()
        self._bad_row = self._bad_table[0]

    def resume_at(self, epoch: int, batches_done: int, seen: np.ndarray | None = None) -> None:
        """Make the iteration of ``epoch`` start after its first ``batches_done`` batches (a run
        resumed mid-epoch then sees exactly the batches an uninterrupted run would have seen).

        With ``seen`` (bool over the split's global sample indices: the samples the epoch has
        trained on, on every rank), the epoch instead yields only the unseen samples, shared out
        over this stream's world (:func:`~aigc.data.loader_split.plan_remaining`): for a world size
        other than the one the epoch started with, where skipping batches would be wrong."""
        if seen is not None:
            seen = np.asarray(seen, dtype=bool)
            if seen.shape != (self._offsets[-1],):
                raise ValueError(f"seen marks {seen.shape} samples but the split has {self._offsets[-1]}")
        self.resume_epoch, self.resume_batches, self.resume_seen = int(epoch), int(batches_done), seen

    def _replanned(self, epoch: int) -> bool:
        return self.resume_epoch == epoch and self.resume_seen is not None

    @property
    def epoch(self) -> int:
        """The epoch whose shard order and shuffle the next iteration uses."""
        return int(self._epoch_cell[0])

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose shard order and shuffle the next iteration uses (seen by every
        DataLoader worker of this stream, persistent ones included, from their next epoch)."""
        self._epoch_cell[0] = int(epoch)

    def __len__(self) -> int:
        n = batches_per_epoch(sum(self.sizes), self.world, self.batch_size)
        if self.resume_seen is not None:
            # Lightning reads the length once, when fit starts, and ends an epoch when the batch
            # count reaches it or the data runs out, whichever is first. The resumed epoch counts
            # its batches from ``resume_batches`` (Lightning restored them), so the length must hold
            # them plus the rest; a longer length than an epoch's batches only lets the data end it.
            left = int((~self.resume_seen).sum())
            n = max(n, self.resume_batches + batches_per_epoch(left, self.world, self.batch_size))
        return n

    def bad_per_shard(self) -> torch.Tensor:
        """Samples skipped so far this epoch per shard (int64, ``(len(urls),)``, in ``urls`` order),
        over every DataLoader worker of this rank; read it in the process that iterates the loader."""
        return self._bad_table.sum(dim=0)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if worker >= len(self._bad_table):
            raise ValueError(
                f"ShardStream(loader_workers={len(self._bad_table)}) is read by DataLoader worker "
                f"{worker}: pass the DataLoader's num_workers as loader_workers"
            )
        self._bad_row = self._bad_table[worker]
        self._bad_row.zero_()  # a new epoch: this worker's row starts again (only it writes there)
        epoch = self.epoch  # read once: the main process may set the next one while this one runs
        order = epoch_shard_order(len(self.sizes), self.seed, epoch, self.shuffle)
        if self._replanned(epoch):
            plan = plan_remaining(self.sizes, self.resume_seen, self.world, workers, self.batch_size, order)
            slot = plan[self.rank][worker]
        else:
            slot = plan_slot(self.sizes, self.world, workers, self.batch_size, self.rank, worker, order)
        self.stats = stats = ReadStats(assigned=slot.num_samples)
        rng = random.Random(f"samples/{self.seed}/{epoch}/{self.rank}/{worker}")
        samples = self._samples(slot.pieces, stats)
        if self.shuffle and self.shuffle_buffer > 1:
            samples = _shuffled(samples, self.shuffle_buffer, rng)
        batches = self._batches(samples, slot.batches, stats)
        if self.resume_epoch == epoch and self.resume_batches and not self._replanned(epoch):
            # The DataLoader takes batches from its workers round-robin (worker w gives global
            # batches w, w + W, ...), so the first k batches hold ceil((k - w) / W) of worker w's.
            # They are read and dropped: decoding is the price of an exact position.
            skip = min(slot.batches, max(0, -(-(self.resume_batches - worker) // workers)))
            for _ in range(skip):
                next(batches)
        yield from batches
        if stats.num_bad:
            shards = ", ".join(f"{u} ({n})" for u, n in stats.bad.most_common(3))
            log.warning(
                "rank %d worker %d: skipped %d of %d samples; worst shards: %s",
                self.rank,
                worker,
                stats.num_bad,
                stats.assigned,
                shards,
            )

    def _samples(self, pieces, stats: ReadStats) -> Iterator[tuple[np.ndarray, str, int, str, int]]:
        """The decoded ``(image, caption, label, key, global index)`` of the pieces, in order; bad
        samples are counted (every epoch, cached or not) and skipped. A piece with ``keep`` is read
        over its whole range, and the positions it does not keep are passed over."""
        for piece in pieces:
            url = self.urls[piece.shard]
            base = self._offsets[piece.shard]
            keep = None if piece.keep is None else set(piece.keep)
            whole = Piece(piece.shard, piece.start, piece.stop)
            for position, (key, sample, reason) in enumerate(self._entries(whole, url, stats), piece.start):
                if keep is not None and position not in keep:
                    continue
                if sample is None:
                    stats.record_bad(url, key, reason)
                    self._settle(stats)
                    continue
                yield (*sample, base + position)
            self._settle(stats)

    def _entries(self, piece, url: str, stats: ReadStats) -> Iterator[tuple[str, tuple | None, str | None]]:
        """``(key, sample or None, reason it is bad or None)`` per sample of a piece of a tar: from
        the cache when it holds the whole piece, else read and decoded (and cached if it fits)."""
        cached = self._cache.get(piece.shard)
        if cached is not None:
            entries = cached[piece.start : piece.stop]
            if all(e is not None for e in entries):
                yield from entries
                return
        mode = "L" if self.channels == 1 else "RGB"
        fresh: list | None = [] if self._cache_left > 0 else None
        cost = 0
        for key, parts in iter_piece(url, piece.start, piece.stop, stats):
            try:
                image, caption, label = decode_sample(parts, mode, self.image_size, self.latent)
                entry = (key, (image, caption, label, key), None)
                cost += image.nbytes + len(caption) + 2 * len(key) + 200  # + ~200 B of Python objects
            except BadSample as err:
                entry = (key, None, str(err))
            if fresh is not None:
                fresh.append(entry)
                if cost > self._cache_left:
                    fresh = None  # does not fit: this piece stays uncached
            yield entry
        # Only a piece read to its end is kept: a short tar's loss is recorded by iter_piece, and
        # must be found again next epoch.
        if fresh is not None and len(fresh) == piece.stop - piece.start:
            slots = self._cache.setdefault(piece.shard, [None] * self.sizes[piece.shard])
            slots[piece.start : piece.stop] = fresh
            self._cache_left -= cost

    def _settle(self, stats: ReadStats) -> None:
        """After bad samples may have been counted: publish this worker's counts (see ``__init__``),
        then apply the threshold, which may raise."""
        for url, n in stats.bad.items():
            self._bad_row[self._shard_index[url]] = n
        stats.check(self.max_bad_fraction)

    def _batches(self, samples, num_batches: int, stats: ReadStats) -> Iterator[dict[str, Any]]:
        b, s, c = self.batch_size, self.image_size, self.channels
        pool: list[tuple[np.ndarray, str, int, str, int]] = []  # first samples of the epoch, for padding
        latent = self.latent
        for _ in range(num_batches):
            if latent is None:
                images = np.empty((b, s, s, c), dtype=np.uint8)  # (B, H, W, C), filled in place
            else:  # KL (B, c, h, w) float32 / VQ (B, h, w) int16
                images = np.empty((b, *latent["shape"]), dtype=latent["dtype"])
            captions, labels, keys, valid, index = [], [], [], [], []
            for i in range(b):
                sample = next(samples, None)
                real = sample is not None
                if not real:
                    if not pool:
                        raise BadDataError(
                            f"rank {self.rank}: a DataLoader worker has no readable sample to fill its "
                            f"{num_batches} batches ({stats.num_bad} bad of {stats.assigned}; "
                            f"shards: {', '.join(stats.bad) or 'none assigned'})"
                        )
                    sample = pool[(stats.padded) % len(pool)]
                    stats.padded += 1
                elif len(pool) < b:
                    pool.append(sample)
                image, caption, label, key, at = sample
                images[i] = image.reshape(s, s, c) if latent is None else image
                captions.append(caption)
                labels.append(label)
                keys.append(key)
                valid.append(real)
                index.append(at)
                stats.good += real
            stats.batches += 1
            # One conversion per batch: (B, H, W, C) uint8 -> (B, C, H, W) float32 in [-1, 1].
            # Latents go as stored: float32 as is, codes as int64 (what embeddings index with).
            if latent is None:
                # The permuting copy on the uint8 bytes first, then the conversion on contiguous
                # memory, which vectorises: 6.5 us a 64 px RGB sample against 9.1 for converting
                # while permuting (one core, bit-identical; benchmarks/loader.py times the loader).
                x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
                x = x.to(torch.float32).div_(127.5).sub_(1.0)
            else:
                x = torch.from_numpy(images)
                x = x.long() if latent["kind"] == "vq" else x
            yield {
                "image": x.contiguous(),
                "caption": captions,
                "label": torch.tensor(labels, dtype=torch.long),
                "key": keys,
                "valid": torch.tensor(valid, dtype=torch.bool),
                "index": torch.tensor(index, dtype=torch.long),
            }
        # The plan fits every assigned sample into the batches, so nothing should be left; running
        # the stream to its end also settles the last tar's accounting (short tar, bad fraction).
        leftover = sum(1 for _ in samples)
        if leftover:
            raise RuntimeError(f"rank {self.rank}: {leftover} samples did not fit the planned batches")


def _shuffled(samples: Iterator, size: int, rng: random.Random) -> Iterator:
    """A shuffle buffer: keep ``size`` samples, emit a random one as each new one arrives."""
    buf: list = []
    for sample in samples:
        if len(buf) < size:
            buf.append(sample)
            continue
        i = rng.randrange(size)
        buf[i], sample = sample, buf[i]
        yield sample
    rng.shuffle(buf)
    yield from buf


class _EpochDataLoader(DataLoader):
    """A DataLoader that tells its dataset the current epoch each time it is iterated."""

    def __init__(self, dataset: ShardStream, epoch_fn: Callable[[], int], **kwargs: Any) -> None:
        super().__init__(dataset, **kwargs)
        self._epoch_fn = epoch_fn

    def __iter__(self):
        self.dataset.set_epoch(self._epoch_fn())
        return super().__iter__()


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # workers decode small images; threads would only oversubscribe


class ShardDataModule(pl.LightningDataModule):
    """Train/val DataLoaders over the shards listed in a dataset's ``manifest.json``.

    ``cfg`` gives batch size, DataLoader workers per rank, shuffle buffer and ``max_bad_fraction``;
    ``location`` (a folder path or fsspec URL) overrides ``cfg.location`` and the default
    ``<project root>/<cfg.root>/<cfg.name>`` (:func:`aigc.data.location.resolve_location`). Rank
    and world size are read when a DataLoader is made (see :func:`rank_and_world`). ``seed`` seeds
    the shuffles (with the epoch).
    """

    def __init__(self, cfg: DataConfig, location: str | os.PathLike | None = None, *, seed: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        self.location = resolve_location(cfg, location)
        self.seed = seed
        self._epoch = 0
        self._manifest: dict[str, Any] | None = None
        self._resume: tuple[int, int, np.ndarray | None] | None = None
        self._streams: dict[str, ShardStream] = {}  # the stream each split's last loader reads

    @property
    def manifest(self) -> dict[str, Any]:
        """The dataset's manifest (read once)."""
        if self._manifest is None:
            manifest = read_manifest(self.location)
            if (manifest["image_size"], manifest["channels"]) != (self.cfg.image_size, self.cfg.channels):
                raise ValueError(
                    f"{self.location}: dataset has image_size {manifest['image_size']} and channels "
                    f"{manifest['channels']}, but the data config says image_size {self.cfg.image_size} "
                    f"and channels {self.cfg.channels}"
                )
            self._manifest = manifest
        return self._manifest

    @property
    def data_version(self) -> str:
        """The dataset's data version (:func:`aigc.data.version.version`: DVC's md5 of the folder
        when DVC tracks it, else the manifest digest)."""
        return version(self.location)

    def prepare_data(self) -> None:
        self.manifest  # noqa: B018 - fail early with a clear error if the dataset is missing

    def set_epoch(self, epoch: int) -> None:
        """The epoch used for shuffling when no trainer is attached."""
        self._epoch = int(epoch)

    def resume_at(self, epoch: int, batches_done: int, seen: np.ndarray | None = None) -> None:
        """Resume the train split mid-epoch: ``epoch`` starts after its first ``batches_done``
        batches (read from a checkpoint's loop state). Exact with the same seed and world size; at
        another world size give ``seen``, the epoch's trained-on samples (:meth:`ShardStream.resume_at`)."""
        self._resume = (int(epoch), int(batches_done), seen)

    def _current_epoch(self) -> int:
        trainer = self.trainer
        return int(trainer.current_epoch) if trainer is not None else self._epoch

    def num_samples(self, split: str) -> int:
        """Samples of ``split`` listed in the manifest."""
        return sum(self._sizes(split))

    def batches_per_epoch(self, split: str) -> int:
        """Batches every rank yields per epoch of ``split`` (the same on all ranks)."""
        return batches_per_epoch(self.num_samples(split), rank_and_world()[1], self.cfg.batch_size)

    def _shards(self, split: str) -> list[dict[str, Any]]:
        if split not in _SPLITS:
            raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
        return list(self.manifest["splits"].get(split, {"shards": []})["shards"])

    def _sizes(self, split: str) -> list[int]:
        return [int(s["num_samples"]) for s in self._shards(split)]

    def shard_names(self, split: str) -> list[str]:
        """The shard file names of ``split``, in manifest order (the order of :meth:`bad_per_shard`)."""
        return [s["name"] for s in self._shards(split)]

    def bad_per_shard(self, split: str) -> torch.Tensor:
        """Samples of ``split`` skipped so far this epoch on this rank, per shard in manifest order
        (int64 ``(num_shards,)``; zeros before its loader is made). Sum it over ranks for the job's."""
        stream = self._streams.get(split)
        if stream is None:
            return torch.zeros(len(self._shards(split)), dtype=torch.int64)
        return stream.bad_per_shard()

    def dataset(self, split: str) -> ShardStream:
        """The :class:`ShardStream` of ``split`` for this process's rank."""
        rank, world = rank_and_world()
        shards = self._shards(split)
        train = split == "train"
        return ShardStream(
            [shard_location(self.location, s["name"]) for s in shards],
            [int(s["num_samples"]) for s in shards],
            batch_size=self.cfg.batch_size,
            channels=self.manifest["channels"],
            image_size=self.manifest["image_size"],
            rank=rank,
            world=world,
            shuffle=train,
            shuffle_buffer=self.cfg.shuffle_buffer if train else 0,
            seed=self.seed,
            max_bad_fraction=self.cfg.max_bad_fraction,
            loader_workers=self.cfg.num_workers,
            latent=latent_spec(self.manifest),
            cache_bytes=self.cfg.decoded_cache_mb * 2**20,
        )

    def _loader(self, split: str) -> DataLoader:
        workers = self.cfg.num_workers
        dataset = self.dataset(split)
        if split == "train" and self._resume is not None:
            dataset.resume_at(*self._resume)
        self._streams[split] = dataset
        return _EpochDataLoader(
            dataset,
            self._current_epoch,
            batch_size=None,
            num_workers=workers,
            worker_init_fn=_worker_init if workers else None,
            # Forked once, kept across epochs: they keep their decoded-sample caches, and the epoch
            # reaches them through the stream's shared cell (ShardStream.set_epoch).
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches; ``batches_per_epoch("train")`` of them on every rank."""
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        """Validation batches in manifest order; padded samples have ``valid == False``."""
        return self._loader("val")
