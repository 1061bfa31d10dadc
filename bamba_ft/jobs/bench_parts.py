"""Host and device time of each part of a decoder layer (`bench.layer_parts=true`): which parts a faster step
must make cheaper, and whether the host (issuing kernels) or the device (running them) bounds each.

One bamba_ft model (LoRA) runs one forward of a timed step's packed batch, recording the inputs every part
receives; then each part alone runs forward and backward on those inputs (`b.warmup_steps` untimed, `b.steps`
timed, median):
- host ms: time to issue the part's work while the GPU is held busy (`torch.cuda._sleep`), so none of it waits;
- device ms: CUDA-event time of the same work issued behind a busy GPU, so the host is ahead throughout;
- wall ms: issued and waited for.
On the CPU there is no separate device: host and device are one, and only wall ms is reported. The whole
model's row is wall time only: its thousands of kernels fill the GPU's launch queue, so the host cannot issue
them all ahead of a busy GPU.

Where the fused CUDA conv+scan runs, it is timed twice, with the scan's chunk states recomputed in backward and
kept from the forward (`model.scan_states`), and each run's kernels are listed with their device time per
forward and backward (torch's profiler over `b.steps` calls).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from bamba_ft.config.schema import BenchConfig, ModelConfig, PeftConfig, ScanStates
from bamba_ft.jobs.bench_batches import make_steps, to_batch
from bamba_ft.jobs.bench_sweeps import median_ms
from bamba_ft.jobs.bench_variants import (
    VARIANTS,
    build_variant,
    cuda_kernels,
    graphs_as_run,
    release,
    sync_device,
)
from bamba_ft.jobs.runtime import autocast_for, to_device
from bamba_ft.model.families import family_of
from bamba_ft.model.mixer import scan_states
from bamba_ft.model.objective import mean_loss
from bamba_ft.ops.loss import causal_lm
from bamba_ft.ops.mamba2 import conv_scan, fused_conv_scan_runs, resolve_backend

CYCLES_PER_MS = 2_000_000  # GPU clock cycles per ms (about; only needs to hold the GPU longer than the issuing)


def layer_parts(model_cfg: ModelConfig, peft_cfg: PeftConfig, b: BenchConfig, device: torch.device, seed: int,
                vocab: int) -> dict:
    """{"tokens": packed tokens, "parts": [{"part", "host_ms", "device_ms", "wall_ms"}, ...]}, plus "scan_kernels"
    ({policy: [[kernel, device ms, launches] per forward and backward, ...]}) where the fused conv+scan runs."""
    v = VARIANTS["bamba_ft"]
    model = build_variant(v, model_cfg, peft_cfg, device, seed)["model"]
    steps = make_steps(b, vocab, seed)
    with graphs_as_run(v, model, steps, device):  # the conv+scan as training runs it: graphs for a float8 base only
        result = _layer_parts(model, to_device(to_batch(steps[-1], True, False), device), b, device)
    del model
    release(device)
    return result


def _layer_parts(model: nn.Module, batch: dict, b: BenchConfig, device: torch.device) -> dict:
    lm = causal_lm(model)
    parts = _parts(lm)
    inputs = _record_inputs(model, lm, batch, parts, device)
    rows = []
    for name, module in parts.items():
        if name in inputs:
            rows.append({"part": name, **_time(_forward_backward(module, *inputs[name], lm, device), b, device)})
    mixer = parts.get("mixer")
    kernels = {}
    if mixer is not None and fused_conv_scan_runs(mixer, resolve_backend(mixer.backend, device)):
        run = _conv_scan(mixer, inputs["mixer"], batch, lm, device)
        for policy, part in ((ScanStates.RECOMPUTE, "conv+scan"), (ScanStates.KEEP, "conv+scan, states kept")):
            with scan_states(lm, policy):
                rows.append({"part": part, **_time(run, b, device)})
                kernels[policy.value] = kernel_times(run, b.steps, device)
    rows.append({"part": "whole model, loss included",
                 **_time(_model_step(model, lm, batch, device), b, device, split=False)})
    result = {"tokens": int(batch["input_ids"].numel()), "parts": rows}
    return result | ({"scan_kernels": kernels} if kernels else {})


def kernel_times(fn: Callable[[], None], calls: int, device: torch.device) -> list[list]:
    """[kernel name, device ms per call, launches per call] of each CUDA kernel `fn` runs, over `calls` profiled
    calls, longest first."""
    from torch.profiler import ProfilerActivity, profile

    sync_device(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        sync_device(device)
    return sorted((list(row) for row in cuda_kernels(prof.key_averages(), calls)), key=lambda r: -r[1])


def _parts(lm: nn.Module) -> dict[str, nn.Module]:
    """The first Mamba layer and its parts, then the first attention layer, by name."""
    family = family_of(lm)
    layers = list(lm.model.layers)
    parts: dict[str, nn.Module] = {}
    mamba = next((layer for layer in layers if any(isinstance(m, family.mixer_class) for m in layer.children())), None)
    if mamba is not None:
        mixer = next(m for m in mamba.children() if isinstance(m, family.mixer_class))
        parts["Mamba decoder layer"] = mamba
        parts["mixer"] = mixer
        parts.update({f"mixer {n}": getattr(mixer, n) for n in ("in_proj", "norm", "out_proj") if hasattr(mixer, n)})
        parts.update({n: m for n, m in mamba.named_children() if "norm" in n or n in ("feed_forward", "mlp")})
    attention = next((layer for layer in layers if hasattr(layer, "self_attn")), None)
    if attention is not None:
        parts["attention decoder layer"] = attention
    return parts


def _record_inputs(model: nn.Module, lm: nn.Module, batch: dict, parts: dict[str, nn.Module],
                   device: torch.device) -> dict[str, tuple[tuple, dict]]:
    seen: dict[str, tuple[tuple, dict]] = {}

    def keep(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            seen.setdefault(name, (args, kwargs))
        return hook

    hooks = [m.register_forward_pre_hook(keep(n), with_kwargs=True) for n, m in parts.items()]
    try:
        with torch.no_grad(), autocast_for(lm, device):
            mean_loss(model, batch)
    finally:
        for h in hooks:
            h.remove()
    return seen


def _leaf(value: object) -> object:
    """A float tensor input as a new leaf that wants a gradient (so backward stops at the part)."""
    if torch.is_tensor(value) and value.is_floating_point():
        return value.detach().requires_grad_()
    return value


def _with_backward(forward: Callable[[], torch.Tensor]) -> Callable[[], None]:
    """`forward` then its backward from one random output gradient, drawn on the first call and reused."""
    grad: list[torch.Tensor] = []

    def run() -> None:
        out = forward()
        if not grad:
            grad.append(torch.randn_like(out))
        out.backward(grad[0])

    return run


def _forward_backward(module: nn.Module, args: tuple, kwargs: dict, lm: nn.Module, device: torch.device) -> Callable:
    args = tuple(_leaf(a) for a in args)
    kwargs = {k: _leaf(v) if k == "hidden_states" else v for k, v in kwargs.items()}

    def forward() -> torch.Tensor:
        with autocast_for(lm, device):
            out = module(*args, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    return _with_backward(forward)


def _conv_scan(mixer: nn.Module, inputs: tuple[tuple, dict], batch: dict, lm: nn.Module,
               device: torch.device) -> Callable:
    args, kwargs = inputs
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    with torch.no_grad(), autocast_for(lm, device):
        projected = mixer.in_proj(hidden)
    _, xbc, dt = projected.split([mixer.intermediate_size, mixer.conv_dim, mixer.num_heads], dim=-1)
    xbc, dt = xbc.detach().requires_grad_(), dt.detach().requires_grad_()
    seq_idx = batch["seq_idx"].to(torch.int32)
    return _with_backward(lambda: conv_scan(mixer, xbc, dt, seq_idx))


def _model_step(model: nn.Module, lm: nn.Module, batch: dict, device: torch.device) -> Callable:
    def run() -> None:
        with autocast_for(lm, device):
            loss = mean_loss(model, batch)
        loss.backward()
        model.zero_grad(set_to_none=True)

    return run


def _time(fn: Callable[[], None], b: BenchConfig, device: torch.device, split: bool = True) -> dict:
    """Median wall ms (after `b.warmup_steps`), and on CUDA with `split` the median host and device ms of `b.steps`
    more calls (module docstring)."""
    wall = median_ms(fn, b, device)
    row = {"wall_ms": wall, "host_ms": None, "device_ms": None}
    if split and device.type == "cuda":
        hosts, devices = zip(*(_issued_behind_busy_gpu(fn, device, busy_ms=50 + 3 * wall) for _ in range(b.steps)))
        row.update(host_ms=statistics.median(hosts), device_ms=statistics.median(devices))
    return row


def _issued_behind_busy_gpu(fn: Callable[[], None], device: torch.device, busy_ms: float) -> tuple[float, float]:
    """(ms the host took to issue `fn`, ms of CUDA-event time of its work), issued while the GPU sleeps."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    sync_device(device)
    torch.cuda._sleep(int(busy_ms * CYCLES_PER_MS))
    t0 = time.perf_counter()
    start.record()
    fn()
    end.record()
    host = 1e3 * (time.perf_counter() - t0)
    sync_device(device)
    return host, start.elapsed_time(end)


def layer_parts_lines(result: dict) -> list[str]:
    """The markdown table of `layer_parts`."""
    def ms(v: float | None) -> str:
        return "" if v is None else f"{v:.2f}"

    lines = ["", f"decoder layer parts alone, forward + backward, on a packed batch of {result['tokens']:,} tokens "
                 "(host: issuing the work; device: running it; wall: both, waited for)",
             "", "| part | host ms | device ms | wall ms |", "|---|---|---|---|"]
    lines += [f"| {r['part']} | {ms(r['host_ms'])} | {ms(r['device_ms'])} | {ms(r['wall_ms'])} |"
              for r in result["parts"]]
    return lines + scan_kernel_lines(result.get("scan_kernels") or {})


def scan_kernel_lines(kernels: dict[str, list[list]], width: int = 70) -> list[str]:
    """The conv+scan's kernels side by side for each scan_states policy: device ms (launches) per forward and
    backward, in the first policy's order, then a total."""
    if not kernels:
        return []
    policies = list(kernels)
    names = list(dict.fromkeys(name for policy in policies for name, *_ in kernels[policy]))
    by = {p: {name: (ms, n) for name, ms, n in kernels[p]} for p in policies}

    def cell(policy: str, name: str) -> str:
        ms, n = by[policy].get(name, (None, None))
        return "" if ms is None else f"{ms:.3f} ({n:g})"

    lines = ["", "conv+scan kernels, device ms (launches) per forward and backward, by model.scan_states", "",
             "| kernel | " + " | ".join(policies) + " |", "|---|" + "---|" * len(policies)]
    lines += [f"| {name[:width]} | " + " | ".join(cell(p, name) for p in policies) + " |" for name in names]
    lines.append("| total | " + " | ".join(f"{sum(ms for _, ms, _ in kernels[p]):.3f}" for p in policies) + " |")
    return lines
