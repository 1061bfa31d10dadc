"""Cheaper launches of Triton kernels that are called again and again with arguments of the same kind.

Each `kernel[grid](...)` call through Triton's Python runtime binds and specialises every argument, looks up
the autotuner's choice, evaluates heuristics and builds launch metadata: on an H200 host that costs more than
a mamba-ssm scan kernel runs, and a Bamba-9B training step makes about a thousand such calls. `CachedLaunch`
wraps a Triton kernel (an `@triton.autotune` / `@triton.heuristics` / `@triton.jit` stack): the first call of
each argument signature goes through Triton, which compiles, autotunes and launches as usual, and records
what it decided (the compiled kernel and the meta-parameters); later calls with the same signature launch
that compiled kernel directly with the same arguments, running the autotuner config's pre-hook as Triton does.

The signature is what selects the compiled kernel and the config: per argument, a tensor's dtype and 16-byte
alignment, an integer's Triton specialisation (0, 1, divisible by 16, 32- or 64-bit), and the value of
every constexpr argument, autotuning key, float, bool and None. Heuristic meta-parameters are recomputed on
every call and must equal the recorded ones. Anything else (an argument of another type, a kernel that is not
such a stack, an error in the fast path) goes through Triton, and an error disables the fast path of that
kernel with one warning.

`cache_launches(module)` wraps the launched kernels of a module (globals named `*_kernel`) in place.
`triton_launches()` turns the fast path off for a while (the benchmark's stock-stack baselines, which call
the same mamba-ssm kernels, keep Triton's own launches).
"""

from __future__ import annotations

import functools
import inspect
import logging
import types
from collections.abc import Iterator
from contextlib import contextmanager

import torch

log = logging.getLogger(__name__)

_INT32, _INT64 = 2**31, 2**63
_enabled = True


@contextmanager
def triton_launches() -> Iterator[None]:
    """Wrapped kernels launched inside (forward and backward) go through Triton's own launch path."""
    global _enabled
    before, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = before


def _layers(kernel: object) -> tuple[list[object], object] | None:
    """([autotuner and heuristics layers, outermost first], the JIT function), or None if `kernel` is not such a
    stack."""
    layers = []
    while not (hasattr(kernel, "params") and hasattr(kernel, "run")):
        if not hasattr(kernel, "fn") or not (hasattr(kernel, "configs") or hasattr(kernel, "values")):
            return None
        layers.append(kernel)
        kernel = kernel.fn
    return layers, kernel


class _Uncacheable(Exception):
    pass


def _token(value: object, by_value: bool) -> object:
    if isinstance(value, torch.Tensor):
        return value.dtype, value.data_ptr() % 16 == 0
    if value is None or isinstance(value, (bool, float, str)):
        return value
    if isinstance(value, int):
        if by_value:
            return value
        width = 0 if -_INT32 <= value < _INT32 else 1 if value < _INT64 else 2
        return value == 0, value == 1, value % 16 == 0, width
    if isinstance(value, torch.dtype):
        return value
    raise _Uncacheable(type(value).__name__)


class _Entry:
    __slots__ = ("compiled", "configs", "heuristics", "pre_hooks")

    def __init__(self, compiled, configs, heuristics, pre_hooks) -> None:  # noqa: ANN001
        self.compiled, self.configs, self.heuristics, self.pre_hooks = compiled, configs, heuristics, pre_hooks


class CachedLaunch:
    """A Triton kernel whose repeated launches skip Triton's per-call Python work (module docstring)."""

    def __init__(self, kernel: object) -> None:
        self.kernel = kernel
        self.layers, self.jit = _layers(kernel)
        self.names = [p.name for p in self.jit.params]
        self.defaults = {p.name: p.default for p in self.jit.params if p.default is not inspect.Parameter.empty}
        keyed = {k for layer in self.layers for k in getattr(layer, "keys", ())}
        self.by_value = [p.is_constexpr or p.name in keyed for p in self.jit.params]
        self.position = {name: i for i, name in enumerate(self.names)}
        self.entries: dict[tuple, list[_Entry]] = {}
        self.failed = False
        self.hits = 0  # launches that took the cached path

    def __getattr__(self, name: str) -> object:  # the wrapped kernel's attributes (fn, configs, ...)
        return getattr(self.kernel, name)

    def __getitem__(self, grid):  # noqa: ANN001, ANN204
        if self.failed or not _enabled:
            return self.kernel[grid]
        return lambda *args, **kwargs: self.launch(grid, args, kwargs)

    def launch(self, grid, args: tuple, kwargs: dict) -> None:  # noqa: ANN001
        try:
            key = self._key(args, kwargs)
        except _Uncacheable:
            self.kernel[grid](*args, **kwargs)
            return
        for entry in self.entries.get(key, ()):
            try:
                if self._launch(entry, grid, args, kwargs):
                    return
            except Exception as e:  # noqa: BLE001
                self.failed = True
                log.warning("cached launch of %s failed (%s: %s); Triton launches it from now on.",
                            self.jit.__name__, type(e).__name__, e)
                self.kernel[grid](*args, **kwargs)
                return
        self.entries.setdefault(key, []).append(self._record(grid, args, kwargs))

    def _key(self, args: tuple, kwargs: dict) -> tuple:
        key = [_device()]
        key += [_token(v, self.by_value[i]) for i, v in enumerate(args)]
        for name in sorted(kwargs):
            i = self.position.get(name)
            key.append((name, _token(kwargs[name], i is None or self.by_value[i])))
        return tuple(key)

    def _record(self, grid, args: tuple, kwargs: dict) -> _Entry:  # noqa: ANN001
        """Launch through Triton and note the compiled kernel, each autotuner's config and the heuristics' values."""
        seen = {}
        run = self.jit.run

        def spy(*a, **kw):  # noqa: ANN002, ANN003, ANN202
            seen.update(kw)
            return run(*a, **kw)

        self.jit.run = spy
        try:
            compiled = self.kernel[grid](*args, **kwargs)
        finally:
            del self.jit.run
        compiled = compiled.result() if hasattr(compiled, "result") else compiled
        configs, hooks = [], []
        for layer in self.layers:
            if hasattr(layer, "configs"):
                config = layer.best_config
                configs.append(config.all_kwargs())
                hooks.append(config.pre_hook)
        heuristics = {name: seen[name] for layer in self.layers for name in getattr(layer, "values", {})}
        return _Entry(compiled, configs, heuristics, hooks)

    def _launch(self, entry: _Entry, grid, args: tuple, kwargs: dict) -> bool:  # noqa: ANN001
        """Launch `entry`'s kernel if the heuristics give the recorded values; False if they do not."""
        kw = dict(kwargs)
        configs, hooks = iter(entry.configs), iter(entry.pre_hooks)
        pre_hooks = []
        for layer in self.layers:
            if hasattr(layer, "configs"):
                kw.update(next(configs))
                hook = next(hooks)
                if hook is not None:
                    pre_hooks.append((hook, layer.arg_names))
            else:
                named = dict(zip(layer.arg_names, args))
                for name, heuristic in layer.values.items():
                    value = heuristic({**named, **kw})
                    if value != entry.heuristics[name]:
                        return False
                    kw[name] = value
        for hook, arg_names in pre_hooks:
            hook({**dict(zip(arg_names, args)), **kw})
        bound = dict(zip(self.names, args))
        for name in self.names[len(args):]:
            bound[name] = kw[name] if name in kw else self.defaults[name]
        if callable(grid):
            grid = grid(bound)
        values = bound.values()
        stream = _stream(_device())
        compiled, knobs = entry.compiled, _knobs()
        meta = None if knobs.launch_enter_hook is None else compiled.launch_metadata(grid, stream, *values)
        compiled.run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1, stream,
                     compiled.function, compiled.packed_metadata, meta, knobs.launch_enter_hook,
                     knobs.launch_exit_hook, *values)
        self.hits += 1
        return True


def _device() -> int:
    return torch.cuda.current_device()


def _stream(device: int) -> int:
    """The raw CUDA stream Triton launches on (the current torch stream)."""
    return torch._C._cuda_getCurrentRawStream(device)


@functools.cache
def _knobs():  # noqa: ANN202
    from triton import knobs

    return knobs.runtime


def cache_launches(module: types.ModuleType) -> int:
    """Wrap every launched Triton kernel among `module`'s globals (a kernel stack named `*_kernel`; device
    functions that kernels call must stay as they are) in a `CachedLaunch`, once; returns how many."""
    count = 0
    for name, value in list(vars(module).items()):
        if not name.endswith("_kernel") or isinstance(value, CachedLaunch) or _layers(value) is None:
            continue
        setattr(module, name, CachedLaunch(value))
        count += 1
    return count
