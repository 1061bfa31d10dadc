"""The benchmark's sweeps: token budgets per step, one long sequence per step, one mixer alone."""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from dataclasses import replace

import torch

from bamba_ft.config.schema import BenchConfig, ModelConfig, PeftConfig
from bamba_ft.data.packing import pack_batches
from bamba_ft.errors import ConfigError
from bamba_ft.jobs.bench_batches import make_steps, random_tokens, sample_lengths
from bamba_ft.jobs.bench_variants import (
    OOM,
    VARIANTS,
    build_variant,
    guarded,
    measure_into,
    release,
    starting_state,
    sync_device,
)

BUDGET_VARIANTS = ("bamba_ft", "hf_padfree")


def budget_steps(b: BenchConfig, budget: int, vocab: int, seed: int) -> list[list[list[int]]]:
    """Warm-up plus timed steps of lognormal sequences packed into `budget` tokens each, as training packs them
    with data.max_tokens_per_batch (best-fit decreasing over a pool a little larger than the steps need)."""
    n_steps = b.warmup_steps + b.steps
    capped = replace(b, max_len=min(b.max_len, budget))  # as data.max_seq_len <= data.max_tokens_per_batch
    lengths: list[int] = []
    while sum(lengths) < (n_steps + 1) * budget:
        lengths += sample_lengths(capped, 64, seed + len(lengths))
    batches = pack_batches(lengths, budget, seed)[:n_steps]
    return random_tokens([[lengths[i] for i in batch] for batch in batches], vocab, seed + 1)


def token_budgets(model_cfg: ModelConfig, peft_cfg: PeftConfig, b: BenchConfig, device: torch.device, seed: int,
                  vocab: int) -> Iterator[dict]:
    """bamba_ft and transformers' padding-free path at each of `b.token_budgets` (ascending) tokens per step, under
    each of `bench.memory_modes`; one model per stack serves every mode and budget.

    Steps are packed to the budget (`budget_steps`) and timed as training meets them (no rehearsal). A budget
    that runs out of memory is recorded as OOM and its memory freed; larger budgets of that model and mode are
    recorded as OOM without running.
    """
    for name in BUDGET_VARIANTS:
        built = guarded({}, build_variant, VARIANTS[name], model_cfg, peft_cfg, device, seed)
        model = built.pop("model", None)
        start = None if model is None else starting_state(model, device)  # each budget and mode trains from it
        for mode in b.memory_modes:
            v = replace(VARIANTS[name], memory=mode)
            oom_at = None
            for budget in sorted(b.token_budgets):
                row = {"variant": name, "memory_mode": mode, "token_budget": budget} | built
                if oom_at is not None:
                    row["error"] = f"{OOM} (not run: {oom_at} tokens per step already ran out of memory)"
                elif model is not None:
                    bb = replace(b, rehearse=False, profile=False)
                    measure_into(row, v, model, budget_steps(bb, budget, vocab, seed), bb, device, start=start)
                    oom_at = budget if row.get("error") == OOM else None
                release(device, collect="error" in row)
                yield row
        del model
        release(device)


def seq_scaling(lengths: list[int], model_cfg: ModelConfig, peft_cfg: PeftConfig, b: BenchConfig,
                device: torch.device, seed: int, vocab: int) -> Iterator[dict]:
    """One sequence per step at each length, for each of `bench.seq_scaling_variants` under each of
    `bench.memory_modes`; out of memory is a result, and ends that mode's lengths.

    One model per variant serves every mode and length (building a 9B model costs more than its steps): the
    modes switch its layers' checkpointing and the offload hooks. Yields one row per length as it is measured.
    """
    for name in b.seq_scaling_variants:
        built = guarded({}, build_variant, VARIANTS[name], model_cfg, peft_cfg, device, seed)
        model = built.pop("model", None)
        start = None if model is None else starting_state(model, device)  # each length and mode trains from it
        for mode in b.memory_modes:
            v = replace(VARIANTS[name], memory=mode)
            for n in lengths:
                bb = replace(b, workload="fixed", median_len=n, max_len=n, seqs_per_step=1, warmup_steps=1,
                             steps=b.seq_scaling_steps, rehearse=False, profile=False)
                row = {"variant": name, "memory_mode": mode, "seq_len": n} | built
                if model is not None:
                    measure_into(row, v, model, make_steps(bb, vocab, seed), bb, device, start=start)
                yield row  # recorded before the release, which a device fault can make raise
                release(device)
                if "error" in row:
                    break  # longer sequences will not fit either
        del model
        release(device)


def mixer_only(model_cfg: ModelConfig, b: BenchConfig, device: torch.device, seed: int) -> dict:
    """One mixer, forward + backward on a padded batch (right padding, attention mask): transformers' own
    forward against bamba_ft's, on the same module and input. Median of `b.steps` runs after warm-up."""
    from transformers import BambaForCausalLM

    from bamba_ft.model.build import load_config
    from bamba_ft.ops.kernels import available_backend
    from bamba_ft.ops.mamba2 import mixer_forward

    torch.manual_seed(seed)
    config = load_config(replace(model_cfg, init="random"))
    if config.model_type != "bamba":
        raise ConfigError(f"bench.mixer_only=true times Bamba's mixer alone; model.shape={model_cfg.shape} is a "
                          f"{config.model_type} model. Fix: bench.mixer_only=false (the full-model variants run).")
    config.num_hidden_layers, config.attn_layer_indices = 1, []
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    mixer = BambaForCausalLM(config).model.layers[0].mamba.to(device, dtype).train()
    lengths = sample_lengths(b, b.seqs_per_step, seed)
    width = max(lengths)
    mask = torch.tensor([[1] * n + [0] * (width - n) for n in lengths], device=device)
    h = torch.randn(len(lengths), width, config.hidden_size, device=device, dtype=dtype, requires_grad=True)

    def time_it(fn) -> float:  # noqa: ANN001
        return median_ms(lambda: fn().float().pow(2).mean().backward(), b, device)

    backend = available_backend(device)
    stock = time_it(lambda: mixer(h, attention_mask=mask))
    ours = time_it(lambda: mixer_forward(mixer, h, attention_mask=mask, backend=backend))
    return {"batch": [len(lengths), width], "real_tokens": sum(lengths), "transformers_ms": stock,
            "bamba_ft_ms": ours, "bamba_ft_backend": backend.value, "speedup": stock / ours}


def matmul_ceiling(model_cfg: ModelConfig, b: BenchConfig, device: torch.device, tokens: int) -> dict:
    """The base model's Linear layers alone at `tokens` tokens: forward (x @ W.T) and input gradient (g @ W) of every
    distinct (in, out) shape, median of `b.steps` timings after `b.warmup_steps`, times how often the model has
    it. LoRA, the scan, norms, attention and the optimizer are left out, so no training step of this model with
    these matmuls is faster: the ratio of a variant's tokens/s to this one is how close it comes."""
    from collections import Counter

    from bamba_ft.model.build import empty_model, load_config
    from bamba_ft.model.families import family_for

    config = load_config(replace(model_cfg, init="random"))
    model = empty_model(family_for(config.model_type).causal_lm_class, config)
    shapes = Counter((m.in_features, m.out_features) for m in model.modules() if isinstance(m, torch.nn.Linear))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    per_shape, forward, grad = [], 0.0, 0.0
    for (k, n), count in sorted(shapes.items()):
        x = torch.randn(tokens, k, device=device, dtype=dtype)
        w = torch.randn(n, k, device=device, dtype=dtype)
        g = torch.randn(tokens, n, device=device, dtype=dtype)
        f_ms, g_ms = median_ms(lambda x=x, w=w: x @ w.t(), b, device), median_ms(lambda g=g, w=w: g @ w, b, device)
        per_shape.append({"in": k, "out": n, "count": count, "forward_ms": f_ms, "input_grad_ms": g_ms})
        forward, grad = forward + count * f_ms, grad + count * g_ms
        del x, w, g
    step = forward + grad
    return {"tokens": tokens, "dtype": str(dtype).removeprefix("torch."), "forward_ms": forward,
            "input_grad_ms": grad, "step_ms": step, "tokens_per_sec": 1000 * tokens / step, "shapes": per_shape}


def median_ms(fn, b: BenchConfig, device: torch.device) -> float:  # noqa: ANN001
    """Median wall ms of `b.steps` calls of `fn`, each waited for, after `b.warmup_steps` untimed ones."""
    times = []
    for i in range(b.warmup_steps + b.steps):
        sync_device(device)
        t0 = time.perf_counter()
        fn()
        sync_device(device)
        if i >= b.warmup_steps:
            times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)
