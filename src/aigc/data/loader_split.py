"""Which samples each (rank, DataLoader worker) reads in an epoch, and how many batches it yields.

Pure functions over the manifest's per-shard sample counts; no I/O, so they are unit-tested alone.

The rule (one rule for every layout):

* Every rank yields exactly ``n = ceil(N / (world * batch_size))`` full batches per epoch for a split
  of ``N`` samples (:func:`batches_per_epoch`), whatever the shard sizes, workers or epoch.
* The epoch's shards (shuffled by seed + epoch for training, in manifest order otherwise) are grouped
  into balanced whole-shard groups, one per rank and within it one per worker (largest first into
  the lightest group), and laid end to end group by group, numbering the samples ``0..N-1``. That
  sequence is cut into ``world`` consecutive ranges, one per rank, each holding at most
  ``n * batch_size`` samples; a rank's range is cut again into one range per worker (worker ``w``
  yields ``n // workers`` batches, plus one for the first ``n % workers``, and holds at most that many
  batches' worth). Cuts snap to shard boundaries wherever that keeps every part within its capacity
  (and ranks roughly balanced), so with enough shards each rank and each worker reads whole shards
  of its own. Where a cut must fall inside a shard (fewer shards than ranks x workers, or shard sizes
  that do not fit), the two neighbouring slots both open that shard and each keeps only its own
  positions: the split is then by sample, still disjoint.
* Hence over an epoch the ranks together cover the whole split and no sample is on two ranks. A
  slot whose samples do not fill its batches pads them by repeating its own samples (duplicates
  within a rank, never across ranks); see :mod:`aigc.data.loader` for how padding is marked.

Resuming an epoch at another world size (elastic training): the checkpoint holds which samples of
the epoch were trained on (a bitmap over the split's global sample indices, see
:func:`global_offsets`). :func:`plan_remaining` applies the same rule to the samples not yet seen
(each shard reduced to its unseen positions, in the same shard order), so the rest of the epoch is
shared out over the new world and every sample of the epoch is trained on once. A piece of such a
plan may skip positions (``Piece.keep``): the shuffle buffer took samples out of order.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

__all__ = [
    "Piece",
    "SlotPlan",
    "batches_per_epoch",
    "epoch_shard_order",
    "global_offsets",
    "plan_epoch",
    "plan_remaining",
    "plan_slot",
]


@dataclass(frozen=True)
class Piece:
    """Positions ``[start, stop)`` (sample order inside the tar) of shard number ``shard``; only the
    positions in ``keep`` when it is given (a resumed epoch's unseen samples, see the module docstring)."""

    shard: int
    start: int
    stop: int
    keep: tuple[int, ...] | None = None

    @property
    def size(self) -> int:
        return self.stop - self.start if self.keep is None else len(self.keep)

    def positions(self) -> range | tuple[int, ...]:
        """The positions read, in tar order."""
        return range(self.start, self.stop) if self.keep is None else self.keep


@dataclass(frozen=True)
class SlotPlan:
    """What one (rank, worker) slot reads in an epoch and how many batches it must yield."""

    rank: int
    worker: int
    pieces: tuple[Piece, ...]
    batches: int

    @property
    def num_samples(self) -> int:
        """Real samples assigned (before any padding)."""
        return sum(p.size for p in self.pieces)


def batches_per_epoch(num_samples: int, world: int, batch_size: int) -> int:
    """Batches every rank yields for a split: ``ceil(num_samples / (world * batch_size))``."""
    if world < 1 or batch_size < 1:
        raise ValueError(f"world ({world}) and batch_size ({batch_size}) must be >= 1")
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    return -(-num_samples // (world * batch_size))


def epoch_shard_order(num_shards: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    """Shard indices in the order they are laid end to end this epoch (seeded by seed and epoch)."""
    order = list(range(num_shards))
    if shuffle:
        random.Random(f"shards/{seed}/{epoch}").shuffle(order)
    return order


def _cut(total: int, boundaries: set[int], caps: list[int], los: list[int], ideal: list[int]) -> list[int]:
    """Cut ``[0, total)`` into ``len(caps)`` consecutive parts, part ``i`` holding ``los[i]..caps[i]``.

    Returns the cut points ``c_0 = 0 <= c_1 <= ... <= c_p = total``. Each inner cut snaps to the
    boundary nearest ``ideal[i]`` that keeps this part and all later parts feasible, else lies at
    ``ideal[i]`` clamped into that window. Needs ``sum(los) <= total <= sum(caps)`` and ``los <= caps``.
    """
    p = len(caps)
    cuts = [0]
    for i in range(1, p):
        prev = cuts[-1]
        lo = max(prev + los[i - 1], total - sum(caps[i:]))
        hi = min(prev + caps[i - 1], total - sum(los[i:]))
        target = min(max(ideal[i], lo), hi)
        near = [b for b in boundaries if lo <= b <= hi]
        cuts.append(min(near, key=lambda b: (abs(b - target), b)) if near else target)
    cuts.append(total)
    return cuts


def _lpt_bins(shards: list[int], sizes: list[int], bins: int) -> list[list[int]]:
    """Greedy balanced partition (largest first into the lightest bin); each bin keeps input order."""
    rank_of = {s: i for i, s in enumerate(shards)}
    totals = [0] * bins
    members: list[list[int]] = [[] for _ in range(bins)]
    for shard in sorted(shards, key=lambda s: (-sizes[s], rank_of[s])):
        b = min(range(bins), key=lambda i: (totals[i], i))
        totals[b] += sizes[shard]
        members[b].append(shard)
    return [sorted(m, key=rank_of.__getitem__) for m in members]


def _layout(order: list[int], sizes: list[int], world: int, workers: int) -> list[int]:
    """Reorder the shards so balanced whole-shard groups lie end to end: rank groups, each made of
    worker groups. The cuts then find shard boundaries near the balanced points where they exist."""
    out: list[int] = []
    for group in _lpt_bins(order, sizes, world):
        for sub in _lpt_bins(group, sizes, workers):
            out.extend(sub)
    return out


def _pieces(order: list[int], sizes: list[int], start: int, stop: int) -> tuple[Piece, ...]:
    """The shard pieces covering positions ``[start, stop)`` of the end-to-end sequence."""
    out = []
    offset = 0
    for shard in order:
        lo, hi = max(start, offset), min(stop, offset + sizes[shard])
        if lo < hi:
            out.append(Piece(shard, lo - offset, hi - offset))
        offset += sizes[shard]
    return tuple(out)


def plan_epoch(
    sizes: list[int], world: int, workers: int, batch_size: int, order: list[int] | None = None
) -> list[list[SlotPlan]]:
    """The plan of every slot: ``plan[rank][worker]``; see the module docstring for the rule.

    ``sizes`` are the per-shard sample counts from the manifest; ``order`` the shard order of this
    epoch (default: manifest order). Every rank's worker batches add up to :func:`batches_per_epoch`.
    A worker whose share is empty yields no batches (its quota goes to a sibling with samples).
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if any(s < 0 for s in sizes):
        raise ValueError(f"shard sizes must be >= 0, got {sizes}")
    order = list(range(len(sizes))) if order is None else list(order)
    if sorted(order) != list(range(len(sizes))):
        raise ValueError(f"order {order} is not a permutation of {len(sizes)} shards")
    order = _layout(order, sizes, world, workers)
    total = sum(sizes)
    n = batches_per_epoch(total, world, batch_size)
    if 0 < total < world:
        raise ValueError(
            f"split has {total} samples, fewer than the {world} ranks: every rank needs at least "
            "one sample to pad from and stay in step"
        )
    bounds, offset = set(), 0
    for shard in order:
        offset += sizes[shard]
        bounds.add(offset)

    # Ranks: equal capacity n*B; a rank keeps at least ~(N/world - B) samples so padding stays small.
    cap = n * batch_size
    lo = max(1, total // world - batch_size) if total else 0
    ideal = [total * r // world for r in range(world + 1)]
    rank_cuts = _cut(total, bounds, [cap] * world, [lo] * world, ideal)
    return [
        _plan_rank(r, order, sizes, rank_cuts[r], rank_cuts[r + 1], n, workers, batch_size, bounds)
        for r in range(world)
    ]


def _plan_rank(
    rank: int,
    order: list[int],
    sizes: list[int],
    start: int,
    stop: int,
    n: int,
    workers: int,
    batch_size: int,
    bounds: set[int],
) -> list[SlotPlan]:
    # Worker w yields q[w] batches (they add up to n); its share is proportional to q[w] and at most
    # q[w]*B samples, so every sample of the rank fits into its worker's batches.
    m = stop - start
    quota = [n // workers + (w < n % workers) for w in range(workers)]
    acc = [sum(quota[:w]) for w in range(workers + 1)]
    ideal = [m * acc[w] // n if n else 0 for w in range(workers + 1)]
    los = [max(0, ideal[w + 1] - ideal[w] - batch_size) for w in range(workers)]
    local = {b - start for b in bounds if start < b < stop}
    cuts = _cut(m, local, [q * batch_size for q in quota], los, ideal)
    counts = [cuts[w + 1] - cuts[w] for w in range(workers)]
    # A worker left without samples cannot pad: its batches go to the sibling with the most samples.
    for w in range(workers):
        if counts[w] == 0 and quota[w] > 0:
            best = max(range(workers), key=lambda v: counts[v])
            quota[best] += quota[w]
            quota[w] = 0
    return [
        SlotPlan(rank, w, _pieces(order, sizes, start + cuts[w], start + cuts[w + 1]), quota[w])
        for w in range(workers)
    ]


def plan_slot(
    sizes: list[int],
    world: int,
    workers: int,
    batch_size: int,
    rank: int,
    worker: int,
    order: list[int] | None = None,
) -> SlotPlan:
    """The plan of one slot (what a DataLoader worker computes for itself)."""
    if not (0 <= rank < world and 0 <= worker < workers):
        raise ValueError(f"slot (rank {rank}, worker {worker}) outside world {world} x workers {workers}")
    return plan_epoch(sizes, world, workers, batch_size, order)[rank][worker]


def global_offsets(sizes: list[int]) -> list[int]:
    """Global index of each shard's first sample: shard ``i``'s position ``p`` is sample
    ``offsets[i] + p`` of the split (manifest order). One more entry at the end: the split's size."""
    out = [0]
    for n in sizes:
        out.append(out[-1] + n)
    return out


def plan_remaining(
    sizes: list[int],
    seen,
    world: int,
    workers: int,
    batch_size: int,
    order: list[int] | None = None,
) -> list[list[SlotPlan]]:
    """The plan of every slot for the rest of an epoch: the samples not marked in ``seen`` (a bool
    sequence over the split's global indices, :func:`global_offsets`), shared out over ``world``
    ranks by the rule of :func:`plan_epoch`. Every rank yields ``batches_per_epoch(unseen, world,
    batch_size)`` batches; pieces carry ``keep`` where they skip seen positions.

    Fewer unseen samples than ranks (a checkpoint just before an epoch's end, resumed on more
    ranks): every rank needs a sample to stay in step, so the first ``world - unseen`` seen samples
    are trained on again (at most ``world - 1`` samples twice, rather than a job that cannot resume)."""
    offsets = global_offsets(sizes)
    seen = np.array(seen, dtype=bool)
    if seen.shape != (offsets[-1],):
        raise ValueError(f"seen marks {seen.shape} samples but the split has {offsets[-1]}")
    short = world - int((~seen).sum())
    if 0 < short < world:
        seen[np.flatnonzero(seen)[:short]] = False
    left = [tuple(np.flatnonzero(~seen[offsets[i] : offsets[i + 1]]).tolist()) for i in range(len(sizes))]
    plan = plan_epoch([len(p) for p in left], world, workers, batch_size, order)
    return [[_real_slot(slot, left) for slot in rank] for rank in plan]


def _real_slot(slot: SlotPlan, left: list[tuple[int, ...]]) -> SlotPlan:
    """A plan over the unseen positions (pieces index ``left[shard]``) -> pieces of tar positions."""
    pieces = []
    for piece in slot.pieces:
        kept = left[piece.shard][piece.start : piece.stop]
        contiguous = kept[-1] - kept[0] + 1 == len(kept)
        pieces.append(Piece(piece.shard, kept[0], kept[-1] + 1, None if contiguous else kept))
    return SlotPlan(slot.rank, slot.worker, tuple(pieces), slot.batches)
