"""The GPU tests' first-fit autotuning (tests/gpu/autotune.py), run in Triton's interpreter on the CPU."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from bamba_ft.ops.kernels import autotuners, keep_autotuning
from tests.gpu.autotune import first_fit


def test_first_fit_runs_configs_in_order_until_one_works_and_no_later_one(monkeypatch: pytest.MonkeyPatch) -> None:
    triton = pytest.importorskip("triton", reason="Triton is not installed (it comes with CUDA builds of torch)")
    import triton.language as tl
    from triton.runtime.errors import OutOfResources

    ran: list[int] = []

    def config(block: int, fails: bool = False) -> triton.Config:
        def hook(nargs: dict) -> None:
            ran.append(block)
            if fails:  # stands in for a configuration that does not compile (out of shared memory, say)
                raise OutOfResources(1, 0, "shared memory")

        return triton.Config({"BLOCK": block}, pre_hook=hook)

    with triton.knobs.runtime.scope():  # the interpreter for this kernel only (decided when it is defined)
        triton.knobs.runtime.interpret = True

        @triton.autotune(configs=[config(8, fails=True), config(16), config(32), config(64)], key=["n"])
        @triton.jit
        def double(x_ptr, out_ptr, n, BLOCK: tl.constexpr):  # noqa: N803
            offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
            mask = offsets < n
            tl.store(out_ptr + offsets, 2 * tl.load(x_ptr + offsets, mask=mask), mask=mask)

        def run(n: int) -> torch.Tensor:
            x = torch.arange(n, dtype=torch.float32)
            out = torch.empty_like(x)
            double[lambda meta: (triton.cdiv(n, meta["BLOCK"]),)](x, out, n)
            torch.testing.assert_close(out, 2 * x)
            return out

        module = types.ModuleType("first_fit_kernels")
        module.double = double
        monkeypatch.setitem(sys.modules, module.__name__, module)
        assert autotuners(("first_fit_kernels",)) == [double]
        first_fit(double)
        run(100)
        assert ran == [8, 16, 16]  # 8 fails, 16 works (once tried, once the call itself); 32 and 64 never run
        ran.clear()
        run(100)
        assert ran == [16]  # the key is cached
        ran.clear()
        run(37)
        assert ran == [8, 16, 16]  # a new key: first fit again


class _Tuner:
    """What `keep_autotuning` reads of a Triton autotuner (Triton >= 3.4: `check_disk_cache`, `cache_results`)."""

    def __init__(self, cache_results: bool = False) -> None:
        self.cache_results = cache_results

    def check_disk_cache(self) -> None: ...


def test_keep_autotuning_switches_on_the_disk_cache_unless_the_environment_says_0(monkeypatch: pytest.MonkeyPatch) -> None:
    class OldTriton:  # before 3.4: no autotune cache on disk
        pass

    monkeypatch.delenv("TRITON_CACHE_AUTOTUNING", raising=False)
    tuners = [_Tuner(), _Tuner(cache_results=True), OldTriton()]
    assert keep_autotuning(tuners) == 1
    assert [t.cache_results for t in tuners[:2]] == [True, True] and not hasattr(tuners[2], "cache_results")
    monkeypatch.setenv("TRITON_CACHE_AUTOTUNING", "0")
    off = _Tuner()
    assert keep_autotuning([off]) == 0 and off.cache_results is False


def test_first_fit_never_stores_its_pick_as_the_fastest() -> None:
    tuner = _Tuner(cache_results=True)
    tuner.prune_configs = lambda kwargs: []
    first_fit(tuner)
    assert tuner.cache_results is False


def test_a_run_on_the_kernels_backend_is_told_what_its_first_steps_wait_for() -> None:
    """The first step on CUDA compiles and autotunes mamba-ssm's kernels for a minute or more; the model line says
    so there, and nowhere else (the torch backend, the CPU)."""
    from bamba_ft.config.schema import Mixer
    from bamba_ft.model.build import first_use_note

    note = first_use_note(Mixer.KERNELS, torch.device("cuda"))
    assert note and "compile mamba-ssm's Triton kernels" in note and "later process" in note
    assert first_use_note(Mixer.TORCH, torch.device("cuda")) is None
    assert first_use_note(Mixer.TORCH, torch.device("cpu")) is None
