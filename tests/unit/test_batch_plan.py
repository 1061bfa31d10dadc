"""The batch plan under Lightning's epoch loop: each epoch its own order, reproducible from seed and epoch."""

from __future__ import annotations

import random

from lightning.fabric.utilities.data import _set_sampler_epoch
from torch.utils.data import DataLoader

from bamba_ft.data.packing import BatchPlan


def _loader(plan: BatchPlan) -> DataLoader:
    return DataLoader(list(range(len(plan.lengths))), batch_sampler=plan, collate_fn=lambda b: b)


def test_lightning_epoch_hook_reaches_the_plan() -> None:
    """Lightning's fit loop calls `_set_sampler_epoch(loader, epoch)` at every epoch start; the plan must see it."""
    lengths = [random.Random(i).randint(5, 300) for i in range(200)]
    plan = BatchPlan(lengths, packing=True, max_tokens=1024, batch_size=8, seed=3)
    loader = _loader(plan)
    epochs = []
    for epoch in range(3):
        _set_sampler_epoch(loader, epoch)
        epochs.append(list(loader))
    assert plan.epoch == 2
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2] and epochs[0] != epochs[2]
    for batches in epochs:  # every epoch still holds every example once
        assert sorted(i for b in batches for i in b) == list(range(200))


def test_epoch_order_is_reproducible_and_skip_resumes_it() -> None:
    lengths = [random.Random(i).randint(5, 300) for i in range(200)]
    a = BatchPlan(lengths, packing=False, max_tokens=1024, batch_size=8, seed=3)
    b = BatchPlan(lengths, packing=False, max_tokens=1024, batch_size=8, seed=3)
    a.set_epoch(4)
    full = list(a)
    b.set_epoch(4)
    b.skip = 5  # a resume 5 batches into epoch 4
    assert list(b) == full[5:]


def test_resume_skips_only_in_the_epoch_the_checkpoint_was_in() -> None:
    """A checkpoint after an epoch's last batch: Lightning may continue in the (empty) rest of that epoch or start
    the next; the skip applies only to the epoch it was recorded in."""
    lengths = [random.Random(i).randint(5, 300) for i in range(64)]
    plan = BatchPlan(lengths, packing=False, max_tokens=1024, batch_size=8, seed=3)
    n = len(plan)
    plan.resume_from(0, n)
    plan.set_epoch(1)  # Lightning moved on to epoch 1
    plan.set_epoch(1)
    expected = BatchPlan(lengths, packing=False, max_tokens=1024, batch_size=8, seed=3)
    expected.set_epoch(1)
    assert list(plan) == list(expected)
    plan.resume_from(1, 3)  # mid-epoch: Lightning continues epoch 1
    assert list(plan) == list(expected)[3:]
    assert list(plan) == list(expected)  # the next pass over the epoch is whole again


def test_epochs_keep_about_two_thirds_of_batch_mates_on_lognormal_lengths() -> None:
    """What README says of the in-memory epoch shuffle: a new batch order, batch-mates only partly changed."""
    rng = random.Random(0)
    lengths = [min(512, int(rng.lognormvariate(5, 0.7))) for _ in range(5000)]
    plan = BatchPlan(lengths, packing=True, max_tokens=4096, batch_size=8, seed=3)
    mates = []
    for epoch in (0, 1):
        plan.set_epoch(epoch)
        mates.append({i: frozenset(b) - {i} for b in plan.plan() for i in b})
    kept = sum(len(mates[0][i] & mates[1][i]) for i in mates[0]) / sum(len(m) for m in mates[0].values())
    assert 0.55 <= kept <= 0.75  # "about two thirds"


def test_ranks_take_equal_shares_and_the_plan_counts_the_remainder() -> None:
    """9 batches over 2 ranks: 4 each, 1 left out (the data module warns with this count)."""
    plans = [BatchPlan([10] * 72, packing=False, max_tokens=1024, batch_size=8, seed=3, rank=r, world_size=2)
             for r in (0, 1)]
    assert [len(p) for p in plans] == [4, 4] and [p.left_out for p in plans] == [1, 1]
    taken = {i for p in plans for b in p.plan() for i in b}
    assert len(taken) == 64 and taken < set(range(72))
    even = BatchPlan([10] * 64, packing=False, max_tokens=1024, batch_size=8, seed=3, rank=0, world_size=2)
    assert len(even) == 4 and even.left_out == 0


def test_every_epoch_leaves_out_as_many_packed_batches_as_the_first() -> None:
    """The data module warns from the first epoch's plan that N batches 'of each epoch' are not trained. That holds
    because best-fit decreasing packs by length alone: an epoch's shuffle only reorders equal lengths, so every
    epoch makes as many batches, while which of them are left out changes."""
    rng = random.Random(0)
    lengths = [min(512, int(rng.lognormvariate(5, 0.7))) for _ in range(2000)]
    plan = BatchPlan(lengths, packing=True, max_tokens=1024, batch_size=8, seed=3, world_size=4)
    counts, dropped = set(), []
    for epoch in range(6):
        plan.set_epoch(epoch)
        counts.add((len(plan), plan.left_out))
        dropped.append(frozenset(i for b in plan._every_rank for i in b))
    assert len(counts) == 1 and next(iter(counts))[1] > 0, counts  # a remainder, the same in every epoch
    assert len(set(dropped)) == 6  # but other rows left out each epoch


def test_packing_efficiency_is_over_every_ranks_batches() -> None:
    lengths = [10 * (1 + i % 7) for i in range(200)]
    one = BatchPlan(lengths, packing=True, max_tokens=128, batch_size=8, seed=3)
    ranks = [BatchPlan(lengths, packing=True, max_tokens=128, batch_size=8, seed=3, rank=r, world_size=2) for r in (0, 1)]
    assert ranks[0].efficiency() == ranks[1].efficiency()  # one figure for the run, not one rank's
    taken = [b for p in ranks for b in p.plan()]
    assert ranks[0].efficiency() == sum(lengths[i] for b in taken for i in b) / (len(taken) * 128)
    if not ranks[0].left_out:
        assert ranks[0].efficiency() == one.efficiency()
