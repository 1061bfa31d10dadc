"""What the CUDA caching allocator did during a stretch of work: the segments it took from the driver, gave back,
and the allocations it retried after emptying its cache.

Every step of variable-length packed batches asks for blocks of new sizes. When no cached block fits, the
allocator takes a new segment from the driver (cudaMalloc); when the driver has no memory left, it frees every
cached block, which waits for the device, and tries again. The benchmark records these per timed step, so that a
slow step can be told apart from one that waited on the allocator.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# torch.cuda.memory_stats keys, and the names the benchmark rows use for them.
COUNTERS = {"num_device_alloc": "mallocs", "num_device_free": "frees", "num_alloc_retries": "retries"}


class AllocatorWatch:
    """`take()` returns the counters that moved since the last `take()` (or construction), e.g. {"mallocs": 3};
    {} off CUDA."""

    def __init__(self, device: torch.device, stats: Callable[[torch.device], dict] | None = None) -> None:
        self._stats = stats if stats is not None else (torch.cuda.memory_stats if device.type == "cuda" else None)
        self._device = device
        self._last = self._read()

    def _read(self) -> dict[str, int]:
        if self._stats is None:
            return {}
        got = self._stats(self._device)
        return {name: int(got.get(key, 0)) for key, name in COUNTERS.items()}

    def take(self) -> dict[str, int]:
        now = self._read()
        moved = {k: v - self._last.get(k, 0) for k, v in now.items() if v != self._last.get(k, 0)}
        self._last = now
        return moved
