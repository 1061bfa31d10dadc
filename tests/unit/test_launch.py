"""bamba_ft.ops.launch on stand-ins for Triton's autotune/heuristics/jit stack (no GPU, no Triton needed).

The stand-ins follow the call protocol of Triton's runtime (`kernel[grid](...)` -> `run(*args, grid=..., warmup=...,
**kwargs)`; an autotuner adds its best config's kwargs and runs its pre-hook; heuristics add computed kwargs;
the JIT function binds all parameters in order and launches the compiled kernel with them). The cached path
must launch the same compiled kernel with the same grid and values as the stack does, and go back to the stack
whenever the argument signature or a heuristic changes. tests/gpu/test_launch_cuda.py checks the real thing.
"""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import pytest
import torch

from bamba_ft.ops import launch


class Compiled:
    def __init__(self, key: tuple, log: list) -> None:
        self.key, self.log = key, log
        self.function, self.packed_metadata = object(), object()

    def run(self, g0, g1, g2, stream, function, packed, meta, enter, exit_, *values):  # noqa: ANN001, ANN002
        assert function is self.function and packed is self.packed_metadata
        self.log.append(("launch", self.key, (g0, g1, g2), list(values)))

    def launch_metadata(self, grid, stream, *values):  # noqa: ANN001, ANN002
        return None


class Jit:
    """Binds parameters like Triton; one compiled kernel per (specialisation, constexpr values)."""

    def __init__(self, fn, log: list) -> None:  # noqa: ANN001
        sig = inspect.signature(fn)
        self.params = [SimpleNamespace(name=p.name, default=p.default, is_constexpr=p.annotation == "constexpr")
                       for p in sig.parameters.values()]
        self.arg_names = [p.name for p in self.params]
        self.log, self.compiled = log, {}
        self.__name__ = fn.__name__

    def __getitem__(self, grid):  # noqa: ANN001, ANN204
        return lambda *a, **kw: self.run(*a, grid=grid, warmup=False, **kw)

    def run(self, *args, grid, warmup, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN201
        bound = dict(zip(self.arg_names, args))
        for p in self.params[len(args):]:
            bound[p.name] = kwargs[p.name] if p.name in kwargs else p.default
        spec = tuple((v.dtype, v.data_ptr() % 16 == 0) if torch.is_tensor(v) else
                     v if p.is_constexpr else (v == 1, v % 16 == 0) if isinstance(v, int) else v
                     for p, v in zip(self.params, bound.values()))
        options = tuple(sorted((k, v) for k, v in kwargs.items() if k not in bound))
        key = (spec, options)
        compiled = self.compiled.setdefault(key, Compiled(key, self.log))
        g = grid(bound) if callable(grid) else grid
        compiled.run(*(tuple(g) + (1,) * (3 - len(g))), 0, compiled.function, compiled.packed_metadata, None, None,
                     None, *bound.values())
        return compiled


class Autotuner:
    def __init__(self, fn, configs: list, key: list[str]) -> None:  # noqa: ANN001
        self.fn, self.configs, self.keys, self.arg_names = fn, configs, key, fn.arg_names
        self.cache: dict = {}

    def __getitem__(self, grid):  # noqa: ANN001, ANN204
        return lambda *a, **kw: self.run(*a, grid=grid, warmup=False, **kw)

    def run(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201
        nargs = {**dict(zip(self.arg_names, args)), **kwargs}
        key = tuple(nargs[k] for k in self.keys)
        config = self.cache.setdefault(key, self.configs[sum(key) % len(self.configs)])  # "tuning"
        self.best_config = config
        if config.pre_hook is not None:
            config.pre_hook({**nargs, **config.all_kwargs()})
        return self.fn.run(*args, **kwargs, **config.all_kwargs())


class Heuristics:
    def __init__(self, fn, values: dict) -> None:  # noqa: ANN001
        self.fn, self.values, self.arg_names = fn, values, fn.arg_names

    def __getitem__(self, grid):  # noqa: ANN001, ANN204
        return lambda *a, **kw: self.run(*a, grid=grid, warmup=False, **kw)

    def run(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201
        for v, heur in self.values.items():
            kwargs[v] = heur({**dict(zip(self.arg_names, args)), **kwargs})
        return self.fn.run(*args, **kwargs)


def config(block: int, hook=None):  # noqa: ANN001, ANN201
    kw = {"BLOCK": block, "num_warps": 4}
    return SimpleNamespace(pre_hook=hook, all_kwargs=lambda: dict(kw))


def _kernel(x_ptr, out_ptr, n, stride, dim, HAS_OUT: constexpr, BLOCK: constexpr, BIG: constexpr,  # noqa: ANN001, F821
            scale=1.0):
    pass


@pytest.fixture
def stack(monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    monkeypatch.setattr(launch, "_device", lambda: 0)
    monkeypatch.setattr(launch, "_stream", lambda device: 0)
    monkeypatch.setattr(launch, "_knobs", lambda: SimpleNamespace(launch_enter_hook=None, launch_exit_hook=None))
    log: list = []
    zeroed: list = []
    jit = Jit(_kernel, log)
    heur = Heuristics(jit, {"BIG": lambda a: a["n"] >= 1024 and a["BLOCK"] > 0})
    tuner = Autotuner(heur, [config(16, lambda a: zeroed.append(a["out_ptr"])), config(32)], key=["dim"])
    return SimpleNamespace(cached=launch.CachedLaunch(tuner), plain=tuner, log=log, zeroed=zeroed)


def _grid(meta: dict) -> tuple[int]:
    return (-(-meta["n"] // meta["BLOCK"]),)


def _call(kernel, x, out, n, dim):  # noqa: ANN001, ANN202
    kernel[_grid](x, out, n, x.stride(0), dim, HAS_OUT=out is not None)


def test_repeat_launches_match_the_stack(stack) -> None:  # noqa: ANN001
    x, out = torch.zeros(64, 8), torch.zeros(64)
    calls = [(x, out, 512, 8), (x, out, 480, 8), (x, out, 500, 8), (x, out, 1040, 8), (x, out, 512, 9), (torch.zeros(64 * 8 + 1)[1:].view(64, 8), out, 512, 8),
             (x, None, 512, 8), (x, out, 1, 8), (x, out, 512, 8)]
    for args in calls:  # every call twice: the second may take the cached path
        for _ in range(2):
            _call(stack.cached, *args)
    cached_log = list(stack.log)
    stack.log.clear()
    for args in calls:
        for _ in range(2):
            _call(stack.plain, *args)
    assert cached_log == stack.log  # same compiled kernels, grids and argument values, in the same order
    assert stack.cached.hits > 0
    assert len(stack.zeroed) == 2 * sum(2 for c in calls if c[3] == 8)  # pre-hook on both paths, config of dim 8


def test_signature_changes_go_through_triton(stack) -> None:  # noqa: ANN001
    x, out = torch.zeros(64, 8), torch.zeros(64)
    _call(stack.cached, x, out, 512, 8)
    _call(stack.cached, x, out, 528, 8)  # same specialisation (divisible by 16), same heuristic: cached
    assert stack.cached.hits == 1
    _call(stack.cached, x, out, 520, 8)  # same heuristic, not divisible by 16: recorded anew
    _call(stack.cached, x, out, 512, 9)  # autotuning key: by value
    _call(stack.cached, torch.zeros(64 * 8 + 1)[1:].view(64, 8), out, 512, 8)  # misaligned pointer, same strides
    assert stack.cached.hits == 1
    # 1040 has the signature of 512 (divisible by 16), but the heuristic BIG differs: not the recorded entry
    _call(stack.cached, x, out, 1040, 9)
    assert stack.cached.hits == 1
    _call(stack.cached, x, out, 1040, 9)
    assert stack.cached.hits == 2


def test_off_inside_triton_launches(stack) -> None:  # noqa: ANN001
    x, out = torch.zeros(64, 8), torch.zeros(64)
    with launch.triton_launches():
        for _ in range(3):
            _call(stack.cached, x, out, 512, 8)
    assert stack.cached.hits == 0 and not stack.cached.entries


def test_unknown_argument_types_and_failures_fall_back(stack, caplog: pytest.LogCaptureFixture) -> None:  # noqa: ANN001
    x, out = torch.zeros(64, 8), torch.zeros(64)
    stack.cached[_grid](x, out, 512, x.stride(0), 8, HAS_OUT=True, scale=object())  # the key cannot read it
    assert not stack.cached.entries
    _call(stack.cached, x, out, 512, 8)
    entry = next(iter(stack.cached.entries.values()))[0]
    entry.compiled = None  # a broken entry: the launch raises, Triton launches, the fast path is off from then on
    stack.log.clear()
    _call(stack.cached, x, out, 512, 8)
    assert stack.cached.failed and "Triton launches it" in caplog.text and len(stack.log) == 1
    _call(stack.cached, x, out, 512, 8)
    assert len(stack.log) == 2


def test_cache_launches_wraps_launched_kernels_only() -> None:
    log: list = []
    module = type("M", (), {})()
    module.__dict__.update(_a_kernel=Jit(_kernel, log), helper=Jit(_kernel, log), other=42)
    assert launch.cache_launches(module) == 1
    assert isinstance(module._a_kernel, launch.CachedLaunch) and isinstance(module.helper, Jit)
    assert launch.cache_launches(module) == 0  # once
