"""Token-budget packing into padding-free rows, padded batches, and the resumable batch sampler."""

from __future__ import annotations

import bisect
import random
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler

from bamba_ft.data.tokenize import IGNORE_INDEX


def pack_batches(lengths: Sequence[int], max_tokens: int, seed: int) -> list[list[int]]:
    """Group example indices into batches of at most `max_tokens` tokens (best-fit decreasing), in random order.

    Best-fit decreasing over the whole epoch fills batches to ~99% for SFT-like length mixes; the batch order
    (and the order inside a batch) is shuffled so long and short examples do not come in runs.
    """
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)  # ties in length are broken randomly, so each epoch groups examples differently
    order.sort(key=lambda i: -lengths[i])
    room: list[tuple[int, int]] = []  # (free tokens, batch id), sorted
    batches: list[list[int]] = []
    for i in order:
        n = lengths[i]
        if n > max_tokens:
            raise ValueError(f"example {i} has {n} tokens, more than the batch budget {max_tokens}")
        k = bisect.bisect_left(room, (n, -1))
        if k == len(room):
            batches.append([i])
            free, b = max_tokens - n, len(batches) - 1
        else:
            free, b = room.pop(k)
            batches[b].append(i)
            free -= n
        if free > 0:
            bisect.insort(room, (free, b))
    for b in batches:
        rng.shuffle(b)
    rng.shuffle(batches)
    return batches


def padded_batches(n: int, batch_size: int, seed: int, shuffle: bool) -> list[list[int]]:
    order = list(range(n))
    if shuffle:
        random.Random(seed).shuffle(order)
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


LOSS_INDEX = "loss_index"


def loss_index(labels: torch.Tensor) -> torch.Tensor:
    """Flat positions, in the (rows x tokens) layout of `labels`, of the tokens whose next token is a target.

    The collators compute it on the CPU: selecting the loss's rows with it on the GPU needs no device-to-host
    sync, as a boolean mask would (twice: forward and backward), each sync stalling the host that queues kernels.
    On a GPU tensor it syncs once (the loss computes it so for batches built without the collators).
    """
    target = torch.zeros_like(labels, dtype=torch.bool)
    target[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return target.flatten().nonzero().squeeze(1)


def collate_packed(examples: list[dict]) -> dict:
    """One padding-free row: the keys of transformers' DataCollatorWithFlattening (seq_idx, flash kwargs), and
    `loss_index`.

    position_ids, seq_idx and cu_seq_lens are int32 (transformers gives int64 position_ids): the kernels take
    int32, and a 1M-token row's position_ids then take 4 MB instead of 8 on every copy. The config caps
    data.max_tokens_per_batch at 2^31-1, so no value overflows.
    """
    lengths = [len(e["input_ids"]) for e in examples]
    ids = [t for e in examples for t in e["input_ids"]]
    labels = [t for e in examples for t in e["labels"]]
    cu = torch.tensor([0] + lengths, dtype=torch.int64).cumsum(0).to(torch.int32)
    longest = max(lengths)
    labels = torch.tensor([labels])
    return {
        "input_ids": torch.tensor([ids]),
        "labels": labels,
        LOSS_INDEX: loss_index(labels),
        "position_ids": torch.cat([torch.arange(n, dtype=torch.int32) for n in lengths])[None],
        "seq_idx": torch.repeat_interleave(torch.arange(len(lengths), dtype=torch.int32), torch.tensor(lengths))[None],
        "cu_seq_lens_q": cu,
        "cu_seq_lens_k": cu,
        "max_length_q": longest,
        "max_length_k": longest,
    }


def collate_padded(examples: list[dict], pad_id: int, left: bool = False) -> dict:
    """Right-padded (or left-padded) rows with an attention mask, and `loss_index`; padding carries no loss."""
    width = max(len(e["input_ids"]) for e in examples)
    ids, labels, mask = [], [], []
    for e in examples:
        n = len(e["input_ids"])
        pad = width - n
        row_ids = e["input_ids"] + [pad_id] * pad
        row_labels = e["labels"] + [IGNORE_INDEX] * pad
        row_mask = [1] * n + [0] * pad
        if left:
            row_ids, row_labels, row_mask = row_ids[n:] + row_ids[:n], row_labels[n:] + row_labels[:n], row_mask[n:] + row_mask[:n]
        ids.append(row_ids)
        labels.append(row_labels)
        mask.append(row_mask)
    labels = torch.tensor(labels)
    return {"input_ids": torch.tensor(ids), "labels": labels, "attention_mask": torch.tensor(mask),
            LOSS_INDEX: loss_index(labels)}


class BatchPlan(Sampler[list[int]]):
    """Yields each epoch's batches (lists of example indices) for this rank; restartable mid-epoch.

    Every rank builds the same epoch plan from the seed and takes every world-th batch, so all ranks run the
    same number of steps: training drops the remainder; evaluation (`pad=True`) keeps every batch and tops
    ranks up with padding batches of negative indices (`-1 - i`), which `MaskedRows` serves without labels,
    so each example counts exactly once. `skip` makes the next epoch start after batches already done.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        packing: bool,
        max_tokens: int,
        batch_size: int,
        seed: int,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        pad: bool = False,
    ) -> None:
        self.lengths = list(lengths)
        self.packing, self.max_tokens, self.batch_size = packing, max_tokens, batch_size
        self.seed, self.shuffle, self.rank, self.world_size, self.pad = seed, shuffle, rank, world_size, pad
        self.epoch = 0
        self.skip = 0
        self._resume_at: tuple[int, int] | None = None
        self._cached: tuple[int, list[list[int]]] | None = None
        self.left_out = 0  # batches of this epoch no rank takes: the remainder over world_size (training, no padding)
        self._every_rank: list[list[int]] = []  # the epoch's batches that some rank trains

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume_from(self, epoch: int, batches_done: int) -> None:
        """Skip the batches a checkpoint had done, if the loop continues that epoch. Lightning decides: a checkpoint
        written after an epoch's last batch restarts some runs in that (then empty) epoch and others in the next,
        depending on where the save happened; the epoch it announces through `set_epoch` before iterating says which."""
        self.epoch = epoch
        self._resume_at = (epoch, batches_done)

    @property
    def sampler(self) -> BatchPlan:
        """Lightning calls `set_epoch` at each epoch start on a batch sampler's `.sampler`, not on the batch
        sampler itself; exposing the plan there gives every epoch its own shuffle (seed + epoch)."""
        return self

    def plan(self) -> list[list[int]]:
        if self._cached is None or self._cached[0] != self.epoch:
            self._cached = (self.epoch, self._build_plan())
        return self._cached[1]

    def _build_plan(self) -> list[list[int]]:
        seed = self.seed + self.epoch
        if self.packing:
            batches = pack_batches(self.lengths, self.max_tokens, seed if self.shuffle else self.seed)
        else:
            batches = padded_batches(len(self.lengths), self.batch_size, seed, self.shuffle)
        self._every_rank = batches
        if self.world_size == 1:
            return batches
        if not self.pad:  # every rank must take as many steps: the remainder waits for another epoch's shuffle
            self.left_out = len(batches) % self.world_size
            self._every_rank = batches[: len(batches) - self.left_out]  # rank r takes every world_size-th from r
            return batches[self.rank :: self.world_size][: len(batches) // self.world_size]
        mine = batches[self.rank :: self.world_size]
        rounds = -(-len(batches) // self.world_size)
        return mine + [[-1 - i for i in batches[0]]] * (rounds - len(mine))

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.plan()
        skip, self.skip = self.skip, 0
        if self._resume_at is not None:
            epoch, done = self._resume_at
            self._resume_at = None
            skip = done if epoch == self.epoch else skip
        yield from batches[skip:]

    def __len__(self) -> int:
        return len(self.plan())

    def efficiency(self) -> float:
        """Real tokens / token budget over this epoch's packed batches, those of every rank."""
        self.plan()
        batches = self._every_rank
        used = sum(self.lengths[i] for b in batches for i in b if i >= 0)
        return used / max(1, len(batches) * self.max_tokens)


class MaskedRows(torch.utils.data.Dataset):
    """Rows by index; a negative index -1 - i serves row i with every label ignored (a padding batch)."""

    def __init__(self, rows) -> None:  # noqa: ANN001
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        if index >= 0:
            return self.rows[index]
        row = dict(self.rows[-1 - index])
        row["labels"] = [IGNORE_INDEX] * len(row["labels"])
        return row
