"""The loader's sample assignment as pure functions: disjoint, covering, equal batch counts."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from aigc.data.loader_split import (
    Piece,
    SlotPlan,
    batches_per_epoch,
    epoch_shard_order,
    global_offsets,
    plan_epoch,
    plan_remaining,
    plan_slot,
)


def _check_plan(plan: list[list[SlotPlan]], sizes: list[int], world: int, workers: int, b: int) -> None:
    """Every invariant the loader relies on; returns nothing, asserts everything."""
    total = sum(sizes)
    n = batches_per_epoch(total, world, b)
    assert len(plan) == world and all(len(slots) == workers for slots in plan)
    seen: Counter = Counter()
    for rank, slots in enumerate(plan):
        # Equal batch counts on every rank: the workers' batches add up to n.
        assert sum(s.batches for s in slots) == n, (rank, [s.batches for s in slots])
        for w, slot in enumerate(slots):
            assert (slot.rank, slot.worker) == (rank, w)
            # Every real sample fits into the slot's own batches (no sample is dropped) ...
            assert slot.num_samples <= slot.batches * b
            # ... and a slot with batches has samples to pad from.
            assert slot.batches == 0 or slot.num_samples > 0
            for p in slot.pieces:
                assert 0 <= p.start < p.stop <= sizes[p.shard]
                seen.update((p.shard, i) for i in range(p.start, p.stop))
        if total:
            rank_samples = sum(s.num_samples for s in slots)
            assert rank_samples >= 1
            assert rank_samples >= total // world - b  # padding stays within about a batch
    # Disjoint (each position once) and covering (every position).
    assert all(c == 1 for c in seen.values()), [k for k, c in seen.items() if c > 1][:5]
    assert set(seen) == {(s, i) for s, size in enumerate(sizes) for i in range(size)}


def _random_cases(count: int, seed: int = 0):
    rng = random.Random(seed)
    cases = []
    while len(cases) < count:
        shards = rng.randint(0, 14)
        sizes = [rng.choice([0, rng.randint(1, 7), rng.randint(1, 120)]) for _ in range(shards)]
        world, workers, b = rng.randint(1, 5), rng.randint(1, 4), rng.choice([1, 3, 8, 16, 64])
        if 0 < sum(sizes) < world:
            continue
        cases.append((sizes, world, workers, b))
    return cases


@pytest.mark.parametrize("case", _random_cases(400))
def test_random_layouts_are_disjoint_covering_and_equal(case) -> None:
    sizes, world, workers, b = case
    _check_plan(plan_epoch(sizes, world, workers, b), sizes, world, workers, b)
    order = epoch_shard_order(len(sizes), seed=3, epoch=1, shuffle=True)
    _check_plan(plan_epoch(sizes, world, workers, b, order), sizes, world, workers, b)


@pytest.mark.parametrize(
    ("sizes", "world", "workers", "b"),
    [
        ([37, 10, 23, 5, 41], 2, 1, 8),  # odd number of uneven shards
        ([37, 10, 23, 5, 41], 2, 2, 4),
        ([37, 10, 23], 2, 2, 8),  # fewer shards than ranks x workers
        ([5], 4, 3, 2),  # one shard for twelve slots
        ([100] * 16 + [17], 3, 2, 64),  # the digits layout on three ranks
        ([1000, 1, 1, 1], 2, 2, 16),  # one huge shard
    ],
)
def test_named_layouts(sizes, world, workers, b) -> None:
    _check_plan(plan_epoch(sizes, world, workers, b), sizes, world, workers, b)


def _shards_of_rank(slots: list[SlotPlan]) -> set[int]:
    return {p.shard for s in slots for p in s.pieces}


@pytest.mark.parametrize(
    ("sizes", "world", "workers", "b"),
    [
        ([37, 10, 23, 5, 41], 2, 1, 8),
        ([100] * 16 + [17], 4, 1, 64),
        ([100] * 16 + [17], 2, 1, 64),
        ([50] * 8, 2, 2, 25),
    ],
)
def test_whole_shards_per_rank_when_sizes_allow(sizes, world, workers, b) -> None:
    plan = plan_epoch(sizes, world, workers, b)
    _check_plan(plan, sizes, world, workers, b)
    ranks = [_shards_of_rank(slots) for slots in plan]
    for i in range(world):
        for j in range(i + 1, world):
            assert not ranks[i] & ranks[j], f"ranks {i} and {j} share shards {ranks[i] & ranks[j]}"
    # And every piece is a whole shard.
    assert all(p.start == 0 and p.stop == sizes[p.shard] for slots in plan for s in slots for p in s.pieces)


def test_whole_shards_per_worker_when_sizes_allow() -> None:
    sizes = [50] * 8
    plan = plan_epoch(sizes, world=2, workers=2, batch_size=25)
    workers = [{p.shard for p in s.pieces} for slots in plan for s in slots]
    assert all(len(w) == 2 for w in workers)
    assert len(set().union(*workers)) == 8


def test_fewer_shards_than_slots_splits_by_sample() -> None:
    sizes = [37, 10, 23]
    plan = plan_epoch(sizes, world=2, workers=2, batch_size=8)
    _check_plan(plan, sizes, 2, 2, 8)
    slots = [s for slots in plan for s in slots]
    assert all(s.num_samples > 0 for s in slots)  # all four slots get work
    shared = Counter(p.shard for s in slots for p in s.pieces)
    assert max(shared.values()) >= 2  # some shard is read by two slots, each keeping its own positions


def test_batch_count_formula() -> None:
    assert batches_per_epoch(1617, 1, 64) == 26
    assert batches_per_epoch(1617, 2, 64) == 13
    assert batches_per_epoch(116, 2, 8) == 8
    assert batches_per_epoch(0, 4, 8) == 0
    assert batches_per_epoch(1, 4, 8) == 1
    with pytest.raises(ValueError):
        batches_per_epoch(10, 0, 8)


def test_empty_split_yields_nothing_anywhere() -> None:
    plan = plan_epoch([], world=2, workers=2, batch_size=4)
    assert all(s.batches == 0 and not s.pieces for slots in plan for s in slots)
    plan = plan_epoch([0, 0], world=3, workers=1, batch_size=4)
    assert all(s.batches == 0 for slots in plan for s in slots)


def test_fewer_samples_than_ranks_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="fewer than the 4 ranks"):
        plan_epoch([1, 2], world=4, workers=1, batch_size=8)


def test_shard_order_is_seeded_by_seed_and_epoch() -> None:
    a = epoch_shard_order(20, seed=0, epoch=0, shuffle=True)
    assert a == epoch_shard_order(20, seed=0, epoch=0, shuffle=True)
    assert sorted(a) == list(range(20))
    assert a != epoch_shard_order(20, seed=0, epoch=1, shuffle=True)
    assert a != epoch_shard_order(20, seed=1, epoch=0, shuffle=True)
    assert epoch_shard_order(5, seed=0, epoch=7, shuffle=False) == [0, 1, 2, 3, 4]


def test_assignment_changes_across_epochs() -> None:
    sizes = [10] * 12
    plans = [plan_epoch(sizes, 2, 1, 4, epoch_shard_order(12, 0, e, True)) for e in range(2)]
    assert _shards_of_rank(plans[0][0]) != _shards_of_rank(plans[1][0])


def test_plan_slot_matches_plan_epoch_and_checks_bounds() -> None:
    sizes = [37, 10, 23, 5, 41]
    plan = plan_epoch(sizes, 2, 2, 8)
    assert plan_slot(sizes, 2, 2, 8, rank=1, worker=1) == plan[1][1]
    with pytest.raises(ValueError, match="outside"):
        plan_slot(sizes, 2, 2, 8, rank=2, worker=0)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="permutation"):
        plan_epoch([1, 2, 3], 1, 1, 1, order=[0, 0, 1])
    with pytest.raises(ValueError, match="workers"):
        plan_epoch([1, 2, 3], 1, 0, 1)
    assert Piece(0, 3, 10).size == 7


@pytest.mark.parametrize("case", _random_cases(150, seed=11))
def test_the_rest_of_an_epoch_is_planned_disjoint_covering_and_equal(case) -> None:
    """Elastic resume: after an arbitrary subset was trained on, the rest is shared out over any
    world size; each unseen sample once, no seen one again, equal batch counts per rank."""
    sizes, world, workers, b = case
    rng = random.Random(f"{sizes}/{world}")
    total = sum(sizes)
    seen = [rng.random() < rng.random() for _ in range(total)]
    left = total - sum(seen)
    plan = plan_remaining(sizes, seen, world, workers, b, epoch_shard_order(len(sizes), 3, 1, True))
    if 0 < left < world:  # too few for the ranks: the first seen samples fill in, as few as needed
        again = [i for i in range(total) if seen[i]][: world - left]
        seen = [s and i not in again for i, s in enumerate(seen)]
        left = world
    offsets = global_offsets(sizes)
    trained = Counter()
    n = batches_per_epoch(left, world, b)
    for rank in plan:
        assert sum(s.batches for s in rank) == n
        for slot in rank:
            assert slot.num_samples <= slot.batches * b
            assert slot.batches == 0 or slot.num_samples > 0
            for p in slot.pieces:
                assert 0 <= p.start < p.stop <= sizes[p.shard]
                positions = list(p.positions())
                assert positions == sorted(positions) and len(positions) == p.size
                trained.update(offsets[p.shard] + i for i in positions)
    assert set(trained.values()) <= {1}
    assert sorted(trained) == [i for i in range(total) if not seen[i]]


def test_nothing_seen_plans_the_whole_epoch_and_everything_seen_plans_nothing() -> None:
    sizes = [5, 9, 2]
    order = epoch_shard_order(3, 0, 2, True)
    fresh = plan_remaining(sizes, [False] * 16, 2, 2, 3, order)
    assert fresh == plan_epoch(sizes, 2, 2, 3, order)  # contiguous pieces carry no keep
    done = plan_remaining(sizes, [True] * 16, 3, 1, 3, order)
    assert all(slot.batches == 0 and not slot.pieces for rank in done for slot in rank)
    with pytest.raises(ValueError, match="split has 16"):
        plan_remaining(sizes, [False] * 15, 2, 1, 3)


def test_a_piece_that_skips_positions_keeps_them() -> None:
    seen = [False, True, False, False, True, False]  # shard 0 positions 1 and 4 were trained on
    (slot,) = plan_remaining([6], seen, 1, 1, 8)[0]
    assert slot.pieces == (Piece(0, 0, 6, (0, 2, 3, 5)),)
    assert slot.num_samples == 4 and list(slot.pieces[0].positions()) == [0, 2, 3, 5]


def test_fewer_unseen_samples_than_ranks_trains_as_few_seen_ones_again_as_it_must() -> None:
    seen = [True] * 9 + [False]  # one sample left, three ranks
    plan = plan_remaining([4, 6], seen, 3, 1, 2)
    trained = sorted(
        i + 4 * (p.shard == 1) for rank in plan for s in rank for p in s.pieces for i in p.positions()
    )
    assert trained == [0, 1, 9]  # the unseen one, and the first two seen ones again
