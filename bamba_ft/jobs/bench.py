"""`task=bench`: the stock transformers paths against bamba_ft's, on the same batches, in one process.

Variants (bench.variants):
- hf_padded: transformers + peft, padded batches, transformers' loss (what a stock-stack user runs);
- hf_padfree: transformers' own padding-free path (DataCollatorWithFlattening keys; its kernels when installed);
- hf_padfree_no_cudnn: the same with torch's cuDNN attention backend excluded (sdpa_kernel), which builds an
  execution plan for every new sequence shape;
- bamba_ft: bamba_ft's mixer, fused MLP, norms and LoRA, packed attention and chunked loss;
- bamba_ft_graphs: the same with the mixer's conv+scan replayed as CUDA graphs (`model.cuda_graphs=true`);
- bamba_ft_padded: the same on hf_padded's padded batches (same work as hf_padded, to compare the paths);
- bamba_ft_nf4 / bamba_ft_int8: the same on a torchao-quantized base (QLoRA).
Model FLOPs per token: 4 x (weights of all Linear layers): forward 2N plus input gradients 2N; LoRA's own
FLOPs, attention scores and the SSD scan are left out, so MFU here is a lower bound.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import statistics
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn

from bamba_ft.config.schema import BenchConfig, ModelConfig, PeftConfig, QuantConfig, TrainConfig
from bamba_ft.data.packing import collate_packed, collate_padded
from bamba_ft.errors import ConfigError, suggest
from bamba_ft.jobs.report import atomic_write_json, atomic_write_text
from bamba_ft.jobs.runtime import autocast_for, choose_device, to_device
from bamba_ft.model.build import build_model
from bamba_ft.model.lora import apply_peft
from bamba_ft.model.memory import activation_memory, apply_checkpointing
from bamba_ft.model.quant import base_weight_bytes
from bamba_ft.model.shapes import SHAPES
from bamba_ft.ops.loss import causal_lm, mean_loss

log = logging.getLogger(__name__)
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12}  # vendor datasheets, dense bf16


@dataclass(frozen=True)
class Variant:
    name: str
    stock: bool  # transformers' mixer, attention (sdpa) and loss
    packed: bool
    quant: str = "none"
    memory: str = "none"  # a bench.memory_modes entry: checkpointing form [+offload]
    graphs: bool = False  # bamba_ft's conv+scan replayed as CUDA graphs
    cudnn_attention: bool = True  # False: torch's SDPA may not pick cuDNN (which plans each new shape)


VARIANTS = {
    "hf_padded": Variant("hf_padded", stock=True, packed=False),
    "hf_padfree": Variant("hf_padfree", stock=True, packed=True),
    "hf_padfree_no_cudnn": Variant("hf_padfree_no_cudnn", stock=True, packed=True, cudnn_attention=False),
    "bamba_ft": Variant("bamba_ft", stock=False, packed=True),
    "bamba_ft_graphs": Variant("bamba_ft_graphs", stock=False, packed=True, graphs=True),
    "bamba_ft_padded": Variant("bamba_ft_padded", stock=False, packed=False),
    "bamba_ft_nf4": Variant("bamba_ft_nf4", stock=False, packed=True, quant="nf4"),
    "bamba_ft_int8": Variant("bamba_ft_int8", stock=False, packed=True, quant="int8"),
}


def split_mode(mode: str) -> tuple[str, bool]:
    """`all+offload` -> ("all", True): (model.gradient_checkpointing, model.activation_offload)."""
    form, _, offload = mode.partition("+")
    return form, offload == "offload"


def sample_lengths(b: BenchConfig, n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    if b.workload == "fixed":
        return [b.median_len] * n
    # lognormal with the given median; sigma 0.8 gives an SFT-like spread (p10 ~ 0.36x, p90 ~ 2.8x the median)
    z = torch.randn(n, generator=g, dtype=torch.float64)
    return [int(min(b.max_len, max(8, round(b.median_len * math.exp(0.8 * float(v)))))) for v in z]


def make_steps(b: BenchConfig, vocab: int, seed: int) -> list[list[list[int]]]:
    """Warm-up plus timed steps, each `seqs_per_step` sequences of random token ids (same for every variant)."""
    n_steps = b.warmup_steps + b.steps
    lengths = sample_lengths(b, n_steps * b.seqs_per_step, seed)
    g = torch.Generator().manual_seed(seed + 1)
    seqs = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]
    return [seqs[i * b.seqs_per_step : (i + 1) * b.seqs_per_step] for i in range(n_steps)]


def to_batch(seqs: list[list[int]], packed: bool, stock: bool) -> dict:
    examples = [{"input_ids": s, "labels": [-100] + s[1:]} for s in seqs]
    if not packed:
        return collate_padded(examples, pad_id=0)
    batch = collate_packed(examples)
    if stock:  # transformers' padding-free keys (DataCollatorWithFlattening): the same set
        batch = {k: batch[k] for k in ("input_ids", "labels", "position_ids", "seq_idx", "cu_seq_lens_q",
                                       "cu_seq_lens_k", "max_length_q", "max_length_k")}
    return batch


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


def _profile(model: nn.Module, loss_fn, batch: dict, opt: torch.optim.Optimizer, device: torch.device,  # noqa: ANN001
             path: Path, offload: bool) -> str:
    """Two profiled training steps; the per-kernel table (sorted by device time) goes to `path`."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    _sync(device)
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(2):
            with autocast_for(causal_lm(model), device), activation_memory(model, offload):
                loss = loss_fn(model, batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        _sync(device)
        wall = (time.perf_counter() - t0) / 2
    averages = prof.key_averages()
    # kernel rows only: operator rows repeat the time of the kernels they launched
    kernels = sum(e.self_device_time_total for e in averages if e.device_type == DeviceType.CUDA) / 2e3  # ms/step
    cpu = sum(e.self_cpu_time_total for e in averages) / 2e3
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    path.parent.mkdir(parents=True, exist_ok=True)
    head = (f"per step (profiled, so slower than measured): wall {1e3 * wall:.1f} ms, device kernels {kernels:.1f} ms "
            f"(busy {100 * kernels / (1e3 * wall):.0f}%), host ops {cpu:.1f} ms\n\n")
    path.write_text(head + averages.table(sort_by=key, row_limit=60, max_name_column_width=90))
    return str(path)


def build_variant(v: Variant, model_cfg: ModelConfig, peft_cfg: PeftConfig, device: torch.device,
                  seed: int) -> dict:
    """{"model": the model of variant `v` with its adapters, in train mode, plus what loading it measured}."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    form, offload = split_mode(v.memory)
    mcfg = replace(model_cfg, mixer="hf" if v.stock else "auto", attn_implementation="sdpa" if v.stock else "auto",
                   gradient_checkpointing=form, activation_offload=offload, cuda_graphs=v.graphs)
    torch.manual_seed(seed)
    model = build_model(mcfg, QuantConfig(method=v.quant), device)
    model = apply_peft(model, peft_cfg, fused=not v.stock)
    model.train()
    loaded = {"model": model, "base_weight_gib": base_weight_bytes(model) / 2**30}
    if device.type == "cuda":  # quantized bases are built layer by layer: this stays near the quantized size
        loaded["load_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return loaded


def measure(v: Variant, model: nn.Module, steps: list, b: BenchConfig, device: torch.device,
            out_dir: Path = Path(".")) -> dict:
    """Train `model` on `steps` (a fresh optimizer); step time, tokens/s, peak memory and adapter coverage."""
    result: dict = {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    n_linear = linear_weights(causal_lm(model))
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:  # a step that ran out of memory before may have left gradients
        p.grad = None
    offload = split_mode(v.memory)[1]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")
    loss_fn = _stock_loss if v.stock else mean_loss
    times, tokens = [], []
    untimed = b.warmup_steps + (b.steps if b.rehearse else 0)
    if b.rehearse:  # the timed batches once more, untimed, before they are timed
        steps = steps[: b.warmup_steps] + steps[b.warmup_steps :] * 2
    for i, seqs in enumerate(steps):
        batch = to_device(to_batch(seqs, v.packed, v.stock), device)
        _sync(device)
        t0 = time.perf_counter()
        with autocast_for(causal_lm(model), device), activation_memory(model, offload):
            loss = loss_fn(model, batch)
        loss.backward()
        if i == 0:
            result["adapters_with_grad"], result["adapters"] = _adapter_coverage(model)
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        if i >= untimed:
            times.append(time.perf_counter() - t0)
            tokens.append(sum(len(s) for s in seqs))
        if not math.isfinite(float(loss.detach())):
            raise RuntimeError(f"non-finite loss at step {i}")
    if b.profile:
        result["profile"] = _profile(model, loss_fn, to_device(to_batch(steps[-1], v.packed, v.stock), device),
                                     opt, device, out_dir / f"profile_{v.name}{_suffix(v.memory)}.txt", offload)
    step = statistics.median(times)
    tps = statistics.median(t / s for t, s in zip(tokens, times))
    result.update(step_ms=1000 * step, tokens_per_sec=tps, tokens_per_step=statistics.mean(tokens),
                  final_loss=float(loss.detach()), linear_params=n_linear)
    peak = _peak_flops(device)
    if peak:
        result["mfu"] = 4 * n_linear * tps / peak
    if device.type == "cuda":
        result["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        if offload and hasattr(torch.cuda.memory, "host_memory_stats"):  # pinned host memory the offload held
            result["host_pinned_gib"] = torch.cuda.memory.host_memory_stats().get("allocated_bytes.current", 0) / 2**30
    del opt
    return result


def _suffix(mode: str) -> str:
    return "" if mode == "none" else "_" + mode.replace("+", "_")


def _guarded(result: dict, fn, *args) -> dict:  # noqa: ANN001, ANN002
    """`fn(*args)`'s measurements added to `result`, or the error it hit (a path that cannot run here is a result)."""
    try:
        result.update(fn(*args))
    except torch.cuda.OutOfMemoryError:
        result["error"] = "out of memory"
    except Exception as e:
        result["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return result


def _release(device: torch.device) -> None:
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
    _guarded(result, build_variant, v, model_cfg, peft_cfg, device, seed)
    model = result.pop("model", None)
    if model is not None:
        with _attention_backends(v):
            _guarded(result, measure, v, model, steps, b, device, out_dir)
    del model
    _release(device)
    return result


def _attention_backends(v: Variant) -> contextlib.AbstractContextManager:
    if v.cudnn_attention:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    others = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH, SDPBackend.OVERRIDEABLE]
    return sdpa_kernel(others)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _adapter_coverage(model: nn.Module) -> tuple[int, int]:
    """(adapted modules whose lora_B got a non-zero gradient, adapted modules)."""
    bs = [p for n, p in model.named_parameters() if "lora_B" in n]
    return sum(1 for p in bs if p.grad is not None and bool(p.grad.abs().max() > 0)), len(bs)


def variant(name: str, key: str = "bench.variants") -> Variant:
    if name not in VARIANTS:
        raise ConfigError(f"{key}: unknown '{name}'.{suggest(name, VARIANTS)} Valid: {', '.join(VARIANTS)}")
    return VARIANTS[name]


def seq_scaling(lengths: list[int], model_cfg: ModelConfig, peft_cfg: PeftConfig, b: BenchConfig,
                device: torch.device, seed: int, vocab: int) -> Iterator[dict]:
    """One sequence per step at each length, for each of `bench.seq_scaling_variants` under each of
    `bench.memory_modes`; out of memory is a result, and ends that mode's lengths.

    One model per variant serves every mode and length (building a 9B model costs more than its steps): the
    modes switch its layers' checkpointing and the offload hooks. Yields one row per length as it is measured.
    """
    for name in b.seq_scaling_variants:
        v = variant(name, "bench.seq_scaling_variants")
        built = _guarded({}, build_variant, v, model_cfg, peft_cfg, device, seed)
        model = built.pop("model", None)
        for mode in b.memory_modes:
            if model is not None:
                apply_checkpointing(model, split_mode(mode)[0])
            for n in lengths:
                bb = replace(b, workload="fixed", median_len=n, max_len=n, seqs_per_step=1, warmup_steps=1,
                             steps=b.seq_scaling_steps, rehearse=False, profile=False)
                row = {"variant": v.name, "memory_mode": mode, "seq_len": n} | built
                if model is not None:
                    _guarded(row, measure, replace(v, memory=mode), model, make_steps(bb, vocab, seed), bb, device)
                yield row  # recorded before the release, which a device fault can make raise
                _release(device)
                if "error" in row:
                    break  # longer sequences will not fit either
        del model
        _release(device)


def longest_trained(rows: list[dict]) -> dict[str, int | None]:
    """{"variant mode": the longest sequence that trained (None: not even the shortest)} of a scaling sweep."""
    out: dict[str, int | None] = {}
    for r in rows:
        key = f"{r['variant']} {r['memory_mode']}"
        out.setdefault(key, None)
        if "error" not in r:
            out[key] = max(out[key] or 0, r["seq_len"])
    return out


def mixer_only(model_cfg: ModelConfig, b: BenchConfig, device: torch.device, seed: int) -> dict:
    """One mixer, forward + backward on a padded batch (right padding, attention mask): transformers' own
    forward against bamba_ft's, on the same module and input. Median of `b.steps` runs after warm-up."""
    from transformers import BambaForCausalLM

    from bamba_ft.model.build import load_config
    from bamba_ft.ops.mamba2 import available_backend, mixer_forward

    torch.manual_seed(seed)
    config = load_config(replace(model_cfg, init="random"))
    config.num_hidden_layers, config.attn_layer_indices = 1, []
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    mixer = BambaForCausalLM(config).model.layers[0].mamba.to(device, dtype).train()
    lengths = sample_lengths(b, b.seqs_per_step, seed)
    width = max(lengths)
    mask = torch.tensor([[1] * n + [0] * (width - n) for n in lengths], device=device)
    h = torch.randn(len(lengths), width, config.hidden_size, device=device, dtype=dtype, requires_grad=True)

    def time_it(fn) -> float:  # noqa: ANN001
        times = []
        for i in range(b.warmup_steps + b.steps):
            _sync(device)
            t0 = time.perf_counter()
            fn().float().pow(2).mean().backward()
            _sync(device)
            if i >= b.warmup_steps:
                times.append(time.perf_counter() - t0)
        return 1000 * statistics.median(times)

    backend = available_backend(device)
    stock = time_it(lambda: mixer(h, attention_mask=mask))
    ours = time_it(lambda: mixer_forward(mixer, h, attention_mask=mask, backend=backend))
    return {"batch": [len(lengths), width], "real_tokens": sum(lengths), "transformers_ms": stock,
            "bamba_ft_ms": ours, "bamba_ft_backend": backend, "speedup": stock / ours}


def data_pipeline(n: int) -> dict:
    """Tokenize and pack `n` generated chat examples on the CPU."""
    from bamba_ft.config.schema import DataConfig
    from bamba_ft.data.builtin import build_char_tokenizer
    from bamba_ft.data.module import BambaDataModule

    tok = build_char_tokenizer()
    dm = BambaDataModule(DataConfig(builtin_train_examples=n, builtin_val_examples=10, max_tokens_per_batch=4096,
                                    max_seq_len=512, num_proc=1), tok)
    t0 = time.perf_counter()
    dm.prepare()
    t1 = time.perf_counter()
    plan = dm.make_plan(dm.train_set, shuffle=True)
    batches = plan.plan()
    t2 = time.perf_counter()
    return {"examples": n, "tokenize_s": t1 - t0, "pack_s": t2 - t1, "examples_per_s": n / (t2 - t0),
            "tokens": dm.stats["train"].tokens, "batches": len(batches), "packing_efficiency": plan.efficiency()}


def _row(r: dict, ref: dict | None) -> list[str]:
    if "error" in r:
        return [r["variant"], r["memory_mode"], r["error"], "", "", "", "", ""]
    ratio = f"{r['tokens_per_sec'] / ref['tokens_per_sec']:.2f}x" if ref and "tokens_per_sec" in ref else "-"
    return [r["variant"], r["memory_mode"], f"{r['tokens_per_sec']:,.0f}", ratio,
            f"{r['step_ms']:.0f}", f"{r.get('peak_gib', float('nan')):.1f}", f"{100 * r['mfu']:.1f}%" if "mfu" in r else "-",
            f"{r['adapters_with_grad']}/{r['adapters']}"]


def markdown(results: dict) -> str:
    lines = [f"{results['device']} | torch {results['versions'].get('torch')} | transformers "
             f"{results['versions'].get('transformers')} | mamba-ssm {results['versions'].get('mamba-ssm', '-')} | "
             f"causal-conv1d {results['versions'].get('causal-conv1d', '-')}"]
    b = results["bench"]
    shapes = "each timed batch run once before (repeated shapes)" if b.get("rehearse") else "each a new packed length"
    lines += [f"{b['warmup_steps']} warm-up steps, {b['steps']} timed steps ({shapes}), median reported", ""]
    header = ["variant", "memory", "real tokens/s", "vs hf_padfree", "step ms", "peak GiB", "MFU", "adapters w/ grad"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results["runs"]:
        ref = next((x for x in results["runs"] if x["variant"] == "hf_padfree"
                    and x["memory_mode"] == r["memory_mode"]), None)
        lines.append("| " + " | ".join(_row(r, ref)) + " |")
    if results.get("seq_scaling"):
        lines += ["", "| variant | memory | seq len | tokens/s | peak GiB |", "|---|---|---|---|---|"]
        for r in results["seq_scaling"]:
            val = r.get("error") or f"{r['tokens_per_sec']:,.0f}"
            peak = f"{r['peak_gib']:.1f}" if "peak_gib" in r and "error" not in r else ""
            lines.append(f"| {r['variant']} | {r['memory_mode']} | {r['seq_len']} | {val} | {peak} |")
        lines += ["", "longest sequence trained: " + ", ".join(
            f"{k} {v:,}" if v else f"{k} none" for k, v in results["longest_trained"].items())]
    if results.get("mixer_only"):
        m = results["mixer_only"]
        lines += ["", f"one mixer, forward+backward, padded batch {m['batch'][0]}x{m['batch'][1]}: transformers "
                      f"{m['transformers_ms']:.1f} ms, bamba_ft ({m['bamba_ft_backend']}) {m['bamba_ft_ms']:.1f} ms "
                      f"({m['speedup']:.2f}x)"]
    if results.get("data_pipeline"):
        d = results["data_pipeline"]
        lines += ["", f"data pipeline: {d['examples']} examples tokenized+packed in {d['tokenize_s'] + d['pack_s']:.1f} s "
                      f"({d['examples_per_s']:,.0f} examples/s), packing efficiency {100 * d['packing_efficiency']:.1f}%"]
    return "\n".join(lines)


def run(cfg: TrainConfig) -> dict:
    from bamba_ft.jobs.model_card import library_versions

    b = cfg.bench
    device = choose_device(cfg.trainer.accelerator)
    mcfg = cfg.model if cfg.model.init == "random" else replace(cfg.model, init="random")
    if mcfg.shape is None:
        mcfg = replace(mcfg, shape="bamba-9b" if device.type == "cuda" else "tiny")
    vocab = SHAPES[mcfg.shape]["vocab_size"]
    for name in b.variants:  # a misspelt name fails before anything is measured
        variant(name)
    for name in b.seq_scaling_variants if b.seq_scaling else []:
        variant(name, "bench.seq_scaling_variants")
    steps = make_steps(b, vocab, cfg.trainer.seed)
    results: dict = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "shape": mcfg.shape, "versions": library_versions(), "bench": asdict(b), "peft": asdict(cfg.peft),
        "date": time.strftime("%Y-%m-%d"), "runs": [],
    }
    out = Path(b.output) if Path(b.output).is_absolute() else Path(cfg.output_dir) / b.output
    for mode in b.memory_modes:
        for name in b.variants:
            r = run_variant(replace(variant(name), memory=mode), mcfg, cfg.peft, steps, b, device, cfg.trainer.seed,
                            Path(cfg.output_dir))
            log.info("bench %s: %s", name, json.dumps(r))
            results["runs"].append(r)
            atomic_write_json(out, results)  # what a long benchmark has measured survives its interruption
    if b.seq_scaling:
        results["seq_scaling"] = []
        for row in seq_scaling(list(b.seq_scaling), mcfg, cfg.peft, b, device, cfg.trainer.seed, vocab):
            log.info("bench seq_len %d: %s", row["seq_len"], json.dumps(row))
            results["seq_scaling"].append(row)
            results["longest_trained"] = longest_trained(results["seq_scaling"])
            atomic_write_json(out, results)
    if b.data_pipeline_examples:
        results["data_pipeline"] = data_pipeline(b.data_pipeline_examples)
    if b.mixer_only:
        results["mixer_only"] = mixer_only(mcfg, b, device, cfg.trainer.seed)
    atomic_write_json(out, results)
    md = markdown(results)
    atomic_write_text(out.with_suffix(".md"), md + "\n")
    print(md)
    print(f"\nresults: {out} and {out.with_suffix('.md')}")
    return results

