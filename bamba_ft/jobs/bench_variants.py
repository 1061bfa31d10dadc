"""The benchmark's variants, and how one variant is built and measured (its batches: bench_batches).

Variants (bench.variants):
- hf_padded: transformers + peft, padded batches, transformers' loss (what a stock-stack user runs);
- hf_padfree: transformers' own padding-free path (DataCollatorWithFlattening keys; its kernels when installed);
- hf_padfree_no_cudnn: the same with torch's cuDNN attention backend excluded (sdpa_kernel), which builds an
  execution plan for every new sequence shape;
- bamba_ft: bamba_ft's mixer, fused MLP, norms and LoRA, packed attention and chunked loss, with the mixer's
  conv+scan replayed as CUDA graphs where training's `model.cuda_graphs=auto` would (see `why_no_graphs`: a float8
  base on one GPU, without checkpointing or offload): what `recipe=sft` runs;
- bamba_ft_graphs / bamba_ft_no_graphs: the same with the graphs always / never (`model.cuda_graphs=true/false`;
  no_graphs shares bamba_ft's model, the graphs switched off per measurement);
- bamba_ft_keep_states: the same without graphs, the SSD scan keeping its chunk states for backward in every
  layer (`model.scan_states=keep`; it shares bamba_ft's model, switched per measurement);
- bamba_ft_padded: the same on hf_padded's padded batches (same work as hf_padded, to compare the paths);
- bamba_ft_nf4 / bamba_ft_int8: the same on a torchao-quantized base (QLoRA);
- bamba_ft_fp8: the same with the frozen base's matmuls in float8 (`quant.method=fp8`; needs compute capability 8.9+);
- bamba_ft_fp8_graphs / bamba_ft_fp8_no_graphs: bamba_ft_fp8 with the conv+scan's CUDA graphs always / never.
Each variant runs under a `bench.memory_modes` entry (a model.gradient_checkpointing form, optionally
`+offload`); a built model serves every mode, which switches its layers' checkpointing and the offload hooks.
Model FLOPs per token: 4 x (weights of all Linear layers): forward 2N plus input gradients 2N; LoRA's own
FLOPs, attention scores and the SSD scan are left out, so MFU here is a lower bound.
"""

from __future__ import annotations

import contextlib
import gc
import math
import re
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from bamba_ft.config.schema import BenchConfig, Mixer, ModelConfig, PeftConfig, QuantConfig
from bamba_ft.jobs import bench_ranks as ranks
from bamba_ft.jobs.allocs import AllocatorWatch
from bamba_ft.jobs.bench_batches import to_batch
from bamba_ft.jobs.compiles import CompileWatch
from bamba_ft.jobs.runtime import autocast_for, to_device
from bamba_ft.model.build import build_model
from bamba_ft.model.lora import apply_peft
from bamba_ft.model.memory import activation_memory, apply_checkpointing
from bamba_ft.model.mixer import graphs_installed, on_mixers, prepare_graphs, scan_states, why_no_graphs
from bamba_ft.model.objective import mean_loss
from bamba_ft.model.quant import base_weight_bytes
from bamba_ft.ops.loss import causal_lm

OOM = "OOM"
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12}  # vendor datasheets, dense bf16


@dataclass(frozen=True)
class Variant:
    name: str
    stock: bool  # transformers' mixer, attention (sdpa) and loss
    packed: bool
    quant: str = "none"
    memory: str = "none"  # a bench.memory_modes entry: checkpointing form [+offload]
    graphs: str = "auto"  # bamba_ft's conv+scan replayed as CUDA graphs: auto (as training's auto) | true | false
    scan_states: str | None = None  # model.scan_states for this variant (None: the run's)
    cudnn_attention: bool = True  # False: torch's SDPA may not pick cuDNN (which plans each new shape)


VARIANTS = {
    "hf_padded": Variant("hf_padded", stock=True, packed=False),
    "hf_padfree": Variant("hf_padfree", stock=True, packed=True),
    "hf_padfree_no_cudnn": Variant("hf_padfree_no_cudnn", stock=True, packed=True, cudnn_attention=False),
    "bamba_ft": Variant("bamba_ft", stock=False, packed=True),
    "bamba_ft_graphs": Variant("bamba_ft_graphs", stock=False, packed=True, graphs="true"),
    "bamba_ft_no_graphs": Variant("bamba_ft_no_graphs", stock=False, packed=True, graphs="false"),
    "bamba_ft_keep_states": Variant("bamba_ft_keep_states", stock=False, packed=True, scan_states="keep",
                                    graphs="false"),
    "bamba_ft_padded": Variant("bamba_ft_padded", stock=False, packed=False),
    "bamba_ft_nf4": Variant("bamba_ft_nf4", stock=False, packed=True, quant="nf4"),
    "bamba_ft_int8": Variant("bamba_ft_int8", stock=False, packed=True, quant="int8"),
    "bamba_ft_fp8": Variant("bamba_ft_fp8", stock=False, packed=True, quant="fp8"),
    "bamba_ft_fp8_graphs": Variant("bamba_ft_fp8_graphs", stock=False, packed=True, quant="fp8", graphs="true"),
    "bamba_ft_fp8_no_graphs": Variant("bamba_ft_fp8_no_graphs", stock=False, packed=True, quant="fp8",
                                      graphs="false"),
}


def split_mode(mode: str) -> tuple[str, bool]:
    """`all+offload` -> ("all", True): (model.gradient_checkpointing, model.activation_offload)."""
    form, _, offload = mode.partition("+")
    return form, offload == "offload"


def linear_weights(model: nn.Module) -> int:
    """Weights of the base model's Linear layers (LoRA's own A and B excluded)."""
    return sum(m.weight.numel() for n, m in model.named_modules() if isinstance(m, nn.Linear) and "lora_" not in n)


def _peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def _stock_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    return model(**batch, use_cache=False).loss


# What a profiled step's kernels do, by name (case-insensitive; the first family that matches takes a kernel).
KERNEL_FAMILIES = (
    ("matmul", r"gemm|nvjet|cutlass|xmma|wgmma|cublas|splitkreduce"),
    ("Mamba-2 scan (mamba-ssm)", r"^_chunk_|^_state_passing|^_bmm_chunk"),
    ("conv (causal-conv1d)", r"causal_conv1d"),
    ("attention", r"flash|fmha|attention"),
    ("norms", r"rms_?norm|layer_?norm"),
    ("compiled (inductor: SwiGLU, loss)", r"^triton_"),
    ("copies", r"copy|memcpy|catarray"),
    ("fills", r"fill|memset"),
    ("reductions, cumsums", r"reduce|scan_innermost|scan_outer"),
    ("optimizer", r"multi_tensor|adam"),
    ("other elementwise", r"elementwise"),
)


def kernel_families(kernels: list[tuple[str, float]]) -> dict[str, float]:
    """Device ms per `KERNEL_FAMILIES` entry (and "other") from (kernel name, ms) pairs, largest first."""
    totals: dict[str, float] = {}
    for name, ms in kernels:
        family = next((f for f, pattern in KERNEL_FAMILIES if re.search(pattern, name, re.IGNORECASE)), "other")
        totals[family] = totals.get(family, 0.0) + ms
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def _families_table(families: dict[str, float]) -> str:
    total = sum(families.values()) or 1.0
    rows = [f"| {f} | {ms:.1f} | {100 * ms / total:.0f}% |" for f, ms in families.items()]
    return "\n".join(["| kernels | ms per step | share |", "|---|---|---|", *rows]) + "\n\n"


def cuda_kernels(averages, calls: int) -> list[tuple[str, float, float]]:  # noqa: ANN001
    """(kernel name, device ms per call, launches per call) of each CUDA kernel in a profiler's `key_averages()`
    over `calls` calls of the profiled work (operator rows, which repeat their kernels' time, left out)."""
    from torch.autograd import DeviceType

    return [(e.key, e.self_device_time_total / 1e3 / calls, e.count / calls) for e in averages
            if e.device_type == DeviceType.CUDA]


def _profile(model: nn.Module, loss_fn, batch: dict, opt: torch.optim.Optimizer, device: torch.device,  # noqa: ANN001
             path: Path, offload: bool) -> tuple[str, dict[str, float]]:
    """Two profiled training steps; the kernels' device time per family (`kernel_families`) and the per-kernel
    table (sorted by device time) go to `path`. Returns the path and the families' ms per step."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync_device(device)
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(2):
            with autocast_for(causal_lm(model), device), activation_memory(model, offload):
                loss = loss_fn(model, batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        sync_device(device)
        wall = (time.perf_counter() - t0) / 2
    averages = prof.key_averages()
    per_kernel = [(name, ms) for name, ms, _ in cuda_kernels(averages, calls=2)]
    kernels = sum(ms for _, ms in per_kernel)  # ms per step
    families = kernel_families(per_kernel)
    cpu = sum(e.self_cpu_time_total for e in averages) / 2e3
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    path.parent.mkdir(parents=True, exist_ok=True)
    tokens = int(batch["input_ids"].numel()) if "input_ids" in batch else None
    head = (f"per step of the last timed batch ({tokens} token positions; profiled, so slower than measured): "
            f"wall {1e3 * wall:.1f} ms, device kernels {kernels:.1f} ms "
            f"(busy {100 * kernels / (1e3 * wall):.0f}%), host ops {cpu:.1f} ms\n\n")
    head += _families_table(families) if families else ""
    path.write_text(head + averages.table(sort_by=key, row_limit=60, max_name_column_width=90))
    return str(path), families


def build_variant(v: Variant, model_cfg: ModelConfig, peft_cfg: PeftConfig, device: torch.device,
                  seed: int) -> dict:
    """{"model": the model of variant `v` with its adapters, in train mode, plus what loading it measured}."""
    before = 0
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)  # models of other variants kept for later repeats
    form, offload = split_mode(v.memory)
    # graphs=false builds as auto: such a variant shares the auto variant's model, measure switches them off
    graphs = "false" if v.stock else "true" if v.graphs == "true" else "auto"
    mcfg = replace(model_cfg, mixer=Mixer.HF.value if v.stock else Mixer.AUTO.value,
                   attn_implementation="sdpa" if v.stock else "auto", gradient_checkpointing=form,
                   activation_offload=offload, cuda_graphs=graphs)
    torch.manual_seed(seed)
    model = build_model(mcfg, QuantConfig(method=v.quant), device, graphs_auto=True)  # measure switches them
    model = apply_peft(model, peft_cfg, fused=not v.stock)
    model.train()
    loaded = {"model": model, "base_weight_gib": base_weight_bytes(model) / 2**30}
    if device.type == "cuda":  # quantized bases are built layer by layer: this stays near the quantized size
        loaded["load_peak_gib"] = (torch.cuda.max_memory_allocated(device) - before) / 2**30
        loaded["resident_bytes"] = torch.cuda.memory_allocated(device) - before
    return loaded


def measure(v: Variant, model: nn.Module, steps: list, b: BenchConfig, device: torch.device,
            out_dir: Path = Path("."), resident_bytes: int | None = None) -> dict:
    """Train `model` on `steps` (a fresh optimizer) under `v.memory`; step time, tokens/s, peak memory and adapter
    coverage.

    `resident_bytes`: what the model itself holds on the device; memory held by other models kept for later
    repeats is then left out of the peak, so it reads as in a process holding this model alone.
    """
    result: dict = {}
    others = 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        others = start - (start if resident_bytes is None else resident_bytes)
    form, offload = split_mode(v.memory)
    apply_checkpointing(model, form)  # the model may have served another memory mode before
    n_linear = linear_weights(causal_lm(model))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")
    loss_fn = _stock_loss if v.stock else mean_loss
    step_fn = ranks.step_module(model, loss_fn, device, find_unused=v.stock)  # DDP under torchrun
    result["cuda_graphs"] = graphs_installed(model)
    if result["cuda_graphs"]:  # every bucket the steps reach, captured before any step (as training does at its start)
        t0 = time.perf_counter()
        result["graphs_captured"] = prepare_graphs(model, _longest_row(steps), next(causal_lm(model).parameters()).dtype)
        sync_device(device)
        result["graph_capture_s"] = time.perf_counter() - t0
    times, issued, tokens, compiled, allocator = [], [], [], [], []
    allocs = AllocatorWatch(device)
    untimed = b.warmup_steps + (b.steps if b.rehearse else 0)
    if b.rehearse:  # the timed batches once more, untimed, before they are timed
        steps = steps[: b.warmup_steps] + steps[b.warmup_steps :] * 2
    with CompileWatch() as watch:
        for i, seqs in enumerate(steps):
            batch = to_device(to_batch(seqs, v.packed, v.stock), device)
            sync_device(device)
            watch.take()
            allocs.take()
            t0 = time.perf_counter()
            with autocast_for(causal_lm(model), device), activation_memory(model, offload):
                loss = step_fn(batch)
            loss.backward()
            if i == 0:
                result["adapters_with_grad"], result["adapters"] = _adapter_coverage(model)
            opt.step()
            opt.zero_grad(set_to_none=True)
            t_issued = time.perf_counter()  # the host has enqueued the whole step
            sync_device(device)
            if i >= untimed:
                times.append(time.perf_counter() - t0)
                issued.append(t_issued - t0)
                tokens.append(sum(len(s) for s in seqs))
                compiled.append(watch.take())
                allocator.append(allocs.take())
            if not math.isfinite(float(loss.detach())):
                raise RuntimeError(f"non-finite loss at step {i}")
    if b.profile:
        result["profile"], families = _profile(model, loss_fn, to_device(to_batch(steps[-1], v.packed, v.stock), device),
                                               opt, device, out_dir / f"profile_{v.name}{_suffix(v.memory)}.txt", offload)
        if families:
            result["profile_kernel_ms"] = families
    step = statistics.median(times)
    tps = statistics.median(t / s for t, s in zip(tokens, times))
    result.update(step_ms=1000 * step, tokens_per_sec=tps, tokens_per_step=statistics.mean(tokens),
                  final_loss=float(loss.detach()), linear_params=n_linear,
                  step_ms_each=[round(1000 * t, 2) for t in times], tokens_each=tokens,
                  compiled_each=compiled)  # per timed step {kernel: compilations}: once per process, in its time
    if device.type == "cuda":  # on a CPU the host runs each step itself: there is no enqueueing to record
        # per timed step, when the host had enqueued it (near its wall time: the device waited for the host), and
        # the caching allocator's cudaMallocs, cudaFrees and retries
        result["issued_ms_each"] = [round(1000 * t, 2) for t in issued]
        result["allocator_each"] = allocator
    peak = _peak_flops(device)
    if peak:
        result["mfu"] = 4 * n_linear * tps / peak
    if device.type == "cuda":
        result["peak_gib"] = (torch.cuda.max_memory_allocated(device) - others) / 2**30
        if offload and hasattr(torch.cuda.memory, "host_memory_stats"):  # pinned host memory the offload held
            result["host_pinned_gib"] = torch.cuda.memory.host_memory_stats().get("allocated_bytes.current", 0) / 2**30
    del opt
    return result


def _suffix(mode: str) -> str:
    return "" if mode == "none" else "_" + mode.replace("+", "_")


def guarded(result: dict, fn, *args) -> dict:  # noqa: ANN001, ANN002
    """`fn(*args)`'s measurements added to `result`, or the error it hit (a path that cannot run here is a result).

    Out of memory is recorded as OOM; leaving the handler drops the traceback and the activations it held.
    """
    try:
        result.update(fn(*args))
    except torch.OutOfMemoryError:
        result["error"] = OOM
    except Exception as e:
        result["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return result


def release(device: torch.device, collect: bool = True) -> None:
    """Give cached device memory back; `collect` first frees what only a full collection finds (dropped models,
    an error's traceback), at about 0.5 s of host time with transformers loaded."""
    if collect:
        gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        # Pinned blocks that offload left cached are sized per length (rounded up to a power of two) and not
        # reused by longer rows: without this a sweep to 262k tokens would hold ~120 GiB of host memory.
        # torch names the call differently across versions; none available leaves the cache as it is.
        for name in ("_accelerator_emptyHostCache", "_host_emptyCache"):
            if hasattr(torch._C, name):
                getattr(torch._C, name)()
                break


def run_variant(v: Variant, model_cfg: ModelConfig, peft_cfg: PeftConfig, steps: list, b: BenchConfig,
                device: torch.device, seed: int, out_dir: Path = Path(".")) -> dict:
    """Build the model for `v`, run the steps, return the measurements (or the error it hit)."""
    result: dict = {"variant": v.name, "memory_mode": v.memory}
    guarded(result, build_variant, v, model_cfg, peft_cfg, device, seed)
    model = result.pop("model", None)
    if model is not None:
        measure_into(result, v, model, steps, b, device, out_dir)
    del model
    release(device)
    return result


def starting_state(model: nn.Module, device: torch.device) -> dict:
    """What every measurement of `model` starts from (`measure_into`'s `start`): its trainable weights as built,
    copied to host memory (the device's peak stays the model's own), and the random generators' states (dropout).

    One built model serves every memory mode, repeat and sweep point, and each measurement trains it: without
    this, what a mode reports (its final_loss) would depend on the measurements run before it."""
    return {"weights": {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad},
            "rng": torch.get_rng_state(),
            "device_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def _restore(model: nn.Module, start: dict, device: torch.device) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in start["weights"].items():
            params[name].copy_(value)
    torch.set_rng_state(start["rng"])
    if start["device_rng"] is not None:
        torch.cuda.set_rng_state(start["device_rng"], device)


def measure_into(row: dict, v: Variant, model: nn.Module, steps: list, b: BenchConfig, device: torch.device,
                 out_dir: Path = Path("."), resident_bytes: int | None = None, start: dict | None = None) -> dict:
    """`measure` under `v`'s attention backends, its results (or error) added to `row`; a failed step's
    gradients are dropped so that the model serves the next measurement. `start` (`starting_state`): the weights
    and random states the model is reset to first, so that the measurement does not depend on those before it."""
    if start is not None:
        _restore(model, start, device)
    with _attention_backends(v), scan_states(model, v.scan_states), graphs_as_run(v, model, steps, device):
        guarded(row, measure, v, model, steps, b, device, out_dir, resident_bytes)
    if "error" in row:
        model.zero_grad(set_to_none=True)
    return row


def graphs_as_run(v: Variant, model: nn.Module, steps: list, device: torch.device) -> contextlib.AbstractContextManager:
    """Inside the block `model`'s conv+scan replays its CUDA graphs only where `v` measures with them (`graphs_run`):
    a model built with graphs=auto carries them even where training would leave them off."""
    return contextlib.nullcontext() if graphs_run(v, model, steps, device) else on_mixers(model, conv_scan_graphs=None)


def graphs_run(v: Variant, model: nn.Module, steps: list, device: torch.device) -> bool:
    """Whether `v` measures `model` with its conv+scan CUDA graphs (where it was built with them): always for
    graphs=true, never for false, and for auto where training's model.cuda_graphs=auto would (`why_no_graphs`)."""
    if v.graphs == "false" or not graphs_installed(model):
        return False
    form, offload = split_mode(v.memory)
    no_graphs = why_no_graphs(device, v.packed, _longest_row(steps), form, offload, ranks.world_size(), v.quant)
    return v.graphs == "true" or no_graphs is None


def _longest_row(steps: list) -> int:
    """The most tokens any of `steps` packs into its row."""
    return max(sum(len(s) for s in seqs) for seqs in steps)


def _attention_backends(v: Variant) -> contextlib.AbstractContextManager:
    if v.cudnn_attention:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    others = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH, SDPBackend.OVERRIDEABLE]
    return sdpa_kernel(others)


def sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _adapter_coverage(model: nn.Module) -> tuple[int, int]:
    """(adapted modules whose lora_B got a finite, non-zero gradient, adapted modules)."""
    bs = [p for n, p in model.named_parameters() if "lora_B" in n]
    return sum(1 for p in bs if p.grad is not None and bool(torch.isfinite(p.grad).all())
               and bool(p.grad.abs().max() > 0)), len(bs)
