"""Triton autotuners that take the first configuration that works (used by the GPU tests' conftest)."""

from __future__ import annotations

INF = float("inf")


def first_fit(autotuner) -> None:  # noqa: ANN001
    """Make a `triton.runtime.autotuner.Autotuner` pick, for each new key, the first configuration that compiles
    and runs, without compiling or timing the configurations after it.

    Triton benchmarks every pruned configuration of a new key through the autotuner's `do_bench` and keeps the
    fastest; a configuration that fails to compile (out of shared memory, say) times as infinite. Here `do_bench`
    runs the kernel once and reports 0 for the first configuration that gets that far, and infinity without
    running anything for every later one, so the first working configuration wins.
    """
    state = {"found": False}
    prune = autotuner.prune_configs

    def prune_configs(kwargs: dict) -> list:  # called once per new key, before its configurations are timed
        state["found"] = False
        return prune(kwargs)

    def do_bench(kernel_call, quantiles=None, **_) -> list[float]:  # noqa: ANN001
        if state["found"]:
            return [INF, INF, INF]
        kernel_call()  # compiles and runs; a failure propagates to Triton, which times this config as infinite
        state["found"] = True
        return [0.0, 0.0, 0.0]

    autotuner.prune_configs = prune_configs
    autotuner.__dict__["do_bench"] = do_bench  # shadows Triton's cached `do_bench` property
    autotuner.cache_results = False  # never store a first fit on disk as the fastest (bamba_ft keeps autotuning)
