"""The benchmark's batches: random token ids in lognormal (or fixed) sequence lengths, shared by every variant
of a run, packed or padded as each variant trains; the first warm-up steps shaped so that Triton compiles its
length specialisations before timing (`cover_specialisation`).
"""

from __future__ import annotations

import math

import torch

from bamba_ft.config.schema import BenchConfig
from bamba_ft.data.packing import LOSS_INDEX, collate_packed, collate_padded

MAX_REDRAWS = 100  # a step whose packed length the run has seen is drawn again at most this often


def sample_lengths(b: BenchConfig, n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    if b.workload == "fixed":
        return [b.median_len] * n
    # lognormal with the given median; sigma 0.8 gives an SFT-like spread (p10 ~ 0.36x, p90 ~ 2.8x the median)
    z = torch.randn(n, generator=g, dtype=torch.float64)
    return [int(min(b.max_len, max(8, round(b.median_len * math.exp(0.8 * float(v)))))) for v in z]


# What the lengths derived from a packed length T divide it by, where nothing says otherwise: the scan's chunk
# size of Bamba-9B and most Mamba-2 hybrids (256), and the SMs of an H100 or H200 (132), by which mamba-ssm's norm
# backward spreads its rows (`cover_lengths`).
DEFAULT_DIVISORS = (256, 132)


def make_steps(b: BenchConfig, vocab: int, seed: int, seen: set[int] | None = None,
               divisors: tuple[int, ...] = DEFAULT_DIVISORS) -> list[list[list[int]]]:
    """Warm-up plus timed steps, each `seqs_per_step` sequences of random token ids (same for every variant).

    With `seen` (the packed lengths a run has used so far; updated), a lognormal step whose packed length is in
    it is drawn again, so that repeated runs in one process keep meeting shapes they have not run before.
    The first warm-up steps (up to four) cover Triton's specialisations of the packed length and of lengths
    derived from it, ceil(T / d) for each of `divisors` (`cover_specialisation`).
    """
    n_steps, k = b.warmup_steps + b.steps, b.seqs_per_step
    lengths = sample_lengths(b, n_steps * k, seed)
    per_step = [lengths[i * k : (i + 1) * k] for i in range(n_steps)]
    if b.workload == "fixed":
        return random_tokens(per_step, vocab, seed + 1)
    targets = cover_targets(divisors, k * b.max_len)
    for i in range(n_steps):
        for attempt in range(MAX_REDRAWS + 1):
            if attempt:
                per_step[i] = sample_lengths(b, k, seed + 7919 * attempt + i)
            target = targets[i] if i < min(b.warmup_steps, len(targets)) else None
            if target is not None:
                cover_specialisation(per_step[i], target, b.max_len)
            fixed = isinstance(target, int)  # the same length in every repeat, on purpose
            if seen is None or sum(per_step[i]) not in seen or fixed:
                break
        if seen is not None:
            seen.add(sum(per_step[i]))
    return random_tokens(per_step, vocab, seed + 1)


MULTIPLE, NOT_MULTIPLE = "multiple of 16", "not a multiple of 16"


def cover_lengths(divisors: tuple[int, ...], limit: int) -> tuple[int | None, int | None]:
    """The shortest packed lengths T up to `limit` at which ceil(T / d) is a multiple of 16 for every d in
    `divisors`: one with T not a multiple of 16, one with T a multiple (None where there is none)."""
    found: list[int | None] = [None, None]
    for t in range(16, limit + 1):
        if found[t % 16 == 0] is None and all(-(-t // d) % 16 == 0 for d in divisors):
            found[t % 16 == 0] = t
            if None not in found:
                break
    return found[0], found[1]


def cover_targets(divisors: tuple[int, ...], limit: int) -> list[str | int | None]:
    """What the first warm-up steps are made into: a packed length that is a multiple of 16, one that is not,
    then the two `cover_lengths` (None: left as drawn)."""
    return [MULTIPLE, NOT_MULTIPLE, *cover_lengths(divisors, limit)]


def cover_specialisation(step: list[int], target: str | int, max_len: int) -> None:
    """Shape a warm-up step to `target` (`cover_targets`), so that the first warm-up steps meet every
    specialisation Triton compiles for the packed length T and the lengths derived from it.

    Triton specialises a kernel's integer arguments on their divisibility by 16, and mamba-ssm's kernels take T
    with lengths derived from it: the chunk count ceil(T / chunk_size), and in the norm's backward the rows per
    program ceil(T / SMs) (for normalised groups of 2,048 channels or more; smaller groups spread over more
    programs). On an H200, timed steps recompiled there: a 3,962-token step (16 chunks of 256) the
    state-passing kernels (1.95 s against 0.37 s for the next batch of similar size), a 4,139-token step the
    norm's backward (32 rows per program on 132 SMs; 0.69 s, a 4,970-token step 0.39 s). Where no such length
    fits in a step (`max_len` x sequences) the step is left as drawn, and a timed step may then still compile
    (`compiled_each` in the row says so).
    """
    if isinstance(target, str):
        cover_length_specialisation(step, multiple=target == MULTIPLE, max_len=max_len)
    else:
        resize_step(step, target, max_len)


def resize_step(step: list[int], tokens: int, max_len: int) -> None:
    """Scale the sequence lengths of `step` to `tokens` in all (each in 1..`max_len`), keeping their proportions
    to within a token."""
    total = sum(step)
    step[:] = [min(max_len, max(1, n * tokens // total)) for n in step]
    i = 0
    while (rest := tokens - sum(step)) != 0:  # rounding: one token at a time, where there is room
        if (rest > 0 and step[i] < max_len) or (rest < 0 and step[i] > 1):
            step[i] += 1 if rest > 0 else -1
        i = (i + 1) % len(step)


def cover_length_specialisation(step: list[int], multiple: bool, max_len: int) -> None:
    """Make the packed length of `step` a multiple of 16 (`multiple`) or not, changing its last sequence by fewer
    than 16 tokens (longer, or shorter where it would pass `max_len`).

    mamba-ssm's kernels compile once more the first time a packed length is a multiple of 16 (seconds for the
    whole set: a 4,704-token step once took 9.4 s on an H200, the steps around it 0.37-0.76 s).
    """
    rest = sum(step) % 16
    if multiple and rest:
        change = 16 - rest if step[-1] + 16 - rest <= max_len else -rest
    elif not multiple and not rest:
        change = 1 if step[-1] < max_len else -1
    else:
        return
    if step[-1] + change >= 1:
        step[-1] += change


def random_tokens(per_step: list[list[int]], vocab: int, seed: int) -> list[list[list[int]]]:
    g = torch.Generator().manual_seed(seed)
    return [[torch.randint(3, vocab, (n,), generator=g).tolist() for n in step] for step in per_step]


def to_batch(seqs: list[list[int]], packed: bool, stock: bool) -> dict:
    examples = [{"input_ids": s, "labels": [-100] + s[1:]} for s in seqs]
    if not packed:
        batch = collate_padded(examples, pad_id=0)
        return {k: v for k, v in batch.items() if k != LOSS_INDEX} if stock else batch
    batch = collate_packed(examples)
    if stock:  # transformers' padding-free keys (DataCollatorWithFlattening): the same set
        batch = {k: batch[k] for k in ("input_ids", "labels", "position_ids", "seq_idx", "cu_seq_lens_q",
                                       "cu_seq_lens_k", "max_length_q", "max_length_k")}
    return batch
