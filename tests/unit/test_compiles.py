"""CompileWatch and AllocatorWatch: what a stretch of work compiled, and what the CUDA caching allocator did in it
(the benchmark's per-step records)."""

from __future__ import annotations

import sys
import types

import torch

from bamba_ft.jobs.allocs import AllocatorWatch
from bamba_ft.jobs.compiles import CompileWatch


def test_counts_new_torch_compile_graphs_and_only_new_ones() -> None:
    torch._dynamo.reset()
    f = torch.compile(lambda x: x * 2 + 1, backend="eager", dynamic=False)
    with CompileWatch() as watch:
        f(torch.ones(3))
        assert watch.take() == {CompileWatch.GRAPH: 1}
        f(torch.ones(3))
        assert watch.take() == {}
        f(torch.ones(3, 2))  # a new shape, static: compiled again
        assert watch.take() == {CompileWatch.GRAPH: 1}


def test_counts_triton_compilations_by_kernel_and_restores_the_hook(monkeypatch) -> None:  # noqa: ANN001
    seen = []

    def previous(**kwargs) -> None:  # noqa: ANN003
        seen.append(kwargs["fn"].name)

    knobs = types.SimpleNamespace(runtime=types.SimpleNamespace(jit_cache_hook=previous))
    monkeypatch.setitem(sys.modules, "triton", types.SimpleNamespace(knobs=knobs))

    def compile_kernel(name: str) -> None:  # what Triton does before compiling a kernel it has not got
        assert not knobs.runtime.jit_cache_hook(key=(), repr=name, fn=types.SimpleNamespace(name=name), compile={},
                                                is_manual_warmup=False, already_compiled=False)

    with CompileWatch() as watch:
        for name in ("scan", "scan", "conv"):
            compile_kernel(name)
        assert watch.take() == {"scan": 2, "conv": 1}
        assert watch.take() == {}
    assert knobs.runtime.jit_cache_hook is previous and seen == ["scan", "scan", "conv"]


def test_allocator_watch_reports_the_counters_that_moved_since_the_last_take() -> None:
    stats = {"num_device_alloc": 5, "num_device_free": 1, "num_alloc_retries": 0, "allocated_bytes.all.current": 9}
    watch = AllocatorWatch(torch.device("cuda"), stats=lambda device: stats)
    assert watch.take() == {}
    stats |= {"num_device_alloc": 9, "num_alloc_retries": 1}
    assert watch.take() == {"mallocs": 4, "retries": 1}
    stats["num_device_free"] = 3
    assert watch.take() == {"frees": 2}
    assert AllocatorWatch(torch.device("cpu")).take() == {}  # no CUDA allocator, nothing to report
