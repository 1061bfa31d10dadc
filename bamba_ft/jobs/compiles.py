"""Which just-in-time compilations a stretch of work paid for: Triton kernels and torch.compile graphs.

A step that meets a new specialisation of a Triton kernel (an integer argument that becomes a multiple of 16,
say) compiles it there, once per process; a timed step that does so measures the compiler as well. The benchmark
records what each timed step compiled, so that such steps can be told apart from the steady state.
"""

from __future__ import annotations

from collections import Counter
from types import TracebackType


def _dynamo_graphs() -> int:
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return 0
    return int(counters["stats"]["unique_graphs"])


class CompileWatch:
    """Inside the block, counts Triton's JIT compilations by kernel name and torch.compile's new graphs.

    `take()` returns what was compiled since the last `take()` (or the block's start) as {name: count}, the
    graphs under the key "torch.compile graph". Without Triton only graphs are counted.
    """

    GRAPH = "torch.compile graph"

    def __init__(self) -> None:
        self._knobs = None
        self._before = None
        self._names: Counter[str] = Counter()
        self._graphs = 0

    def __enter__(self) -> CompileWatch:
        try:
            from triton import knobs
        except ImportError:  # no Triton, or one without knobs (older than 3.4): graphs only
            knobs = None
        if knobs is not None:
            self._knobs, self._before = knobs, knobs.runtime.jit_cache_hook
            knobs.runtime.jit_cache_hook = self._hook
        self._graphs = _dynamo_graphs()
        return self

    def __exit__(self, kind: type | None, error: BaseException | None, tb: TracebackType | None) -> None:
        if self._knobs is not None:
            self._knobs.runtime.jit_cache_hook = self._before

    def _hook(self, **kwargs) -> bool | None:  # noqa: ANN003
        # Called by Triton before it compiles a kernel it has not compiled for these arguments in this process;
        # a true return would skip the compilation, so the previous hook's answer is passed on.
        fn = kwargs.get("fn")
        self._names[getattr(fn, "name", None) or str(kwargs.get("repr", "?"))] += 1
        return self._before(**kwargs) if self._before is not None else None

    def take(self) -> dict[str, int]:
        got = dict(self._names)
        self._names.clear()
        graphs = _dynamo_graphs()
        if graphs > self._graphs:
            got[self.GRAPH] = graphs - self._graphs
        self._graphs = graphs
        return got
