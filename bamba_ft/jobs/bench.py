"""`task=bench`: the stock transformers paths against bamba_ft's, on the same batches, in one process.

The variants (bench.variants), the batches they share and one measurement live in bench_variants.py. Each
variant runs under every `bench.memory_modes` entry, and a built model serves every mode.
`bench.repeats` measures every variant again after the others (interleaved, the order rotated by one place each
repeat), each run on fresh batches, and reuses the built models; `bench.rehearse` may list both warm-up regimes.
Sweeps live in bench_sweeps.py and the report (medians, ranges, ratios, the Headline line) in bench_report.py.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import time
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path

import torch

from bamba_ft.config.schema import BenchConfig, ModelConfig, PeftConfig, RunConfig, rehearse_settings
from bamba_ft.errors import ConfigError, suggest
from bamba_ft.jobs import bench_ranks as ranks
from bamba_ft.jobs import bench_sweeps as sweeps
from bamba_ft.jobs.bench_batches import DEFAULT_DIVISORS, make_steps
from bamba_ft.jobs.bench_variants import (
    OOM,
    VARIANTS,
    Variant,
    build_variant,
    guarded,
    measure_into,
    release,
    starting_state,
)
from bamba_ft.jobs.report import atomic_write_json, atomic_write_text
from bamba_ft.jobs.runtime import choose_device
from bamba_ft.model.families import family_for
from bamba_ft.model.shapes import SHAPES

log = logging.getLogger(__name__)


def schedule(b: BenchConfig) -> list[tuple[str, int, bool, str]]:
    """(memory mode, repeat, rehearse, variant) in run order: within each repeat every regime runs every variant,
    so slow drift of the machine reaches all variants alike, and each repeat starts one variant later
    (A B C, B C A, C A B, ...), so that no variant always runs in the same place, after the same other one."""
    return [(mode, rep, rehearse, name) for mode in b.memory_modes for rep in range(b.repeats)
            for rehearse in rehearse_settings(b) for name in rotated(b.variants, rep)]


def rotated(names: list[str], by: int) -> list[str]:
    k = by % len(names) if names else 0
    return list(names[k:]) + list(names[:k])


def _model_key(v: Variant) -> tuple:
    """What building a variant's model depends on: variants that differ only in batches, attention backend or
    memory mode, scan states or graphs switched off (which `measure` switches on the built model) share one."""
    return v.stock, v.quant, v.graphs == "true"


def run_interleaved(b: BenchConfig, model_cfg: ModelConfig, peft_cfg: PeftConfig, device: torch.device, seed: int,
                    vocab: int, out_dir: Path = Path(".")) -> Iterator[dict]:
    """Every measurement of `schedule(b)`, one row each as it is measured.

    Each model is built at its first use and freed after its last, so repeats and memory modes do not rebuild
    (with bench.keep_models=false: built for every measurement and freed after it); every measurement starts from
    its weights as built (`starting_state`). A measurement that runs out of memory while other models are resident
    records how much they held (`others_resident_gib`).
    Each (memory mode, repeat, regime) gets fresh batches, shared by its variants, with packed lengths the run has
    not used before (`step_sets`). So a mode's results (its final_loss) are the same wherever bench.memory_modes
    places it.
    """
    order = schedule(b)
    last_use = {_model_key(VARIANTS[name]): i for i, (_, _, _, name) in enumerate(order)}
    models: dict[tuple, dict] = {}
    steps = step_sets(b, vocab, seed, specialisation_divisors(model_cfg, device))
    first_regime = rehearse_settings(b)[0]
    for i, (mode, rep, rehearse, name) in enumerate(order):
        v = replace(VARIANTS[name], memory=mode)
        key = _model_key(v)
        if key not in models:
            models[key] = guarded({}, build_variant, v, model_cfg, peft_cfg, device, seed)
            if "model" in models[key]:
                models[key]["start"] = starting_state(models[key]["model"], device)
        built = models[key]
        row = {"variant": name, "memory_mode": mode, "rehearse": rehearse, "repeat": rep}
        row |= {k: x for k, x in built.items() if k not in ("model", "start")}
        if "model" in built:
            bb = replace(b, rehearse=rehearse, profile=b.profile and rep == 0 and rehearse == first_regime)
            measure_into(row, v, built["model"], steps[(mode, rep, rehearse)], bb, device, out_dir,
                         built.get("resident_bytes"), built["start"])
        built = None
        if row.get("error") == OOM and (others := sum(m.get("resident_bytes") or 0 for k, m in models.items() if k != key)):
            row["others_resident_gib"] = others / 2**30
        last = not b.keep_models or last_use[key] == i
        if last:
            del models[key]
        release(device, collect=last or "error" in row)
        yield row


def step_sets(b: BenchConfig, vocab: int, seed: int, divisors: tuple[int, ...] = DEFAULT_DIVISORS) -> dict[tuple, list]:
    """The batches of each (memory mode, repeat, regime), every packed length new to the run (`make_steps`' `seen`).

    Drawn before any is run, in one order whatever the order of bench.memory_modes (mode none first, as a run of
    it alone draws them, then the others by name), so a mode meets the same batches wherever it runs."""
    modes = sorted(b.memory_modes, key=lambda mode: (mode != "none", mode))
    keys = dict.fromkeys((mode, rep, rehearse) for mode, rep, rehearse, _ in schedule(replace(b, memory_modes=modes)))
    seen: set[int] = set()
    return {key: make_steps(b, vocab, seed + 1000 * k, seen, divisors) for k, key in enumerate(keys)}


def host_cpu(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The host's CPU model and core count: the host enqueues every kernel, and machines of one GPU kind have
    differed in how fast they do it."""
    cores = os.cpu_count() or 0
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        text = ""
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")),
                 platform.processor() or platform.machine())
    return f"{model}, {cores} cores"


def specialisation_divisors(model_cfg: ModelConfig, device: torch.device) -> tuple[int, ...]:
    """What mamba-ssm's kernels divide a packed length by (`bench_batches.cover_lengths`): the model's scan
    chunk size and the device's SMs (defaults where either is unknown)."""
    shape = SHAPES.get(model_cfg.shape or "", {})
    key = family_for(shape.get("model_type", "bamba")).config_keys["chunk_size"] if shape else None
    chunk = shape.get(key, DEFAULT_DIVISORS[0])
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else None
    return chunk, sms or DEFAULT_DIVISORS[1]


def _check_variants(b: BenchConfig) -> None:
    """A misspelt variant name (bench.variants, or bench.seq_scaling_variants when that sweep runs) fails before
    anything is measured."""
    named = [("bench.variants", n) for n in b.variants]
    named += [("bench.seq_scaling_variants", n) for n in (b.seq_scaling_variants if b.seq_scaling else [])]
    unknown = [(key, n) for key, n in named if n not in VARIANTS]
    if unknown:
        raise ConfigError([f"{key}: unknown '{n}'.{suggest(n, VARIANTS)} Valid: {', '.join(VARIANTS)}"
                           for key, n in unknown])


def run(cfg: RunConfig) -> dict:
    b = cfg.bench
    _check_variants(b)
    ranks.check_distributed(b)
    device = choose_device(cfg.trainer.accelerator)
    ranks.start(device)  # several ranks (torchrun): each on the GPU of its local rank
    try:
        return _run(cfg, b, device)
    finally:
        ranks.stop()


def _run(cfg: RunConfig, b: BenchConfig, device: torch.device) -> dict:
    from bamba_ft.jobs.bench_report import (
        budget_bests,
        headline,
        longest_trained,
        markdown,
        merge_ranks,
        summarize,
    )
    from bamba_ft.jobs.model_card import library_versions

    mcfg = cfg.model if cfg.model.init == "random" else replace(cfg.model, init="random")
    if mcfg.shape is None:
        mcfg = replace(mcfg, shape="bamba-9b" if device.type == "cuda" else "tiny")
    vocab, seed = SHAPES[mcfg.shape]["vocab_size"], cfg.trainer.seed
    results: dict = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "host": host_cpu(),
        "shape": mcfg.shape, "versions": library_versions(), "bench": asdict(b), "peft": asdict(cfg.peft),
        "rehearse": rehearse_settings(b), "date": time.strftime("%Y-%m-%d"), "runs": [],
        "world_size": ranks.world_size(),
    }
    out = Path(b.output) if Path(b.output).is_absolute() else Path(cfg.output_dir) / b.output
    for row in run_interleaved(b, mcfg, cfg.peft, device, seed, vocab, Path(cfg.output_dir)):
        every_rank = ranks.gather(row)
        if every_rank is None:  # ranks > 0: rank 0 reports
            continue
        row = merge_ranks(every_rank)
        log.info("bench %s: %s", row["variant"], json.dumps(row))
        results["runs"].append(row)
        atomic_write_json(out, results)  # what a long benchmark has measured survives its interruption
    if ranks.rank() != 0:
        return {}
    if b.token_budgets:
        results["token_budgets"] = []
        for row in sweeps.token_budgets(mcfg, cfg.peft, b, device, seed, vocab):
            log.info("bench token budget %d: %s", row["token_budget"], json.dumps(row))
            results["token_budgets"].append(row)
            atomic_write_json(out, results)
        results["token_budget_bests"] = budget_bests(results["token_budgets"])
    if b.seq_scaling:
        results["seq_scaling"] = []
        for row in sweeps.seq_scaling(list(b.seq_scaling), mcfg, cfg.peft, b, device, seed, vocab):
            log.info("bench seq_len %d: %s", row["seq_len"], json.dumps(row))
            results["seq_scaling"].append(row)
            results["longest_trained"] = longest_trained(results["seq_scaling"])
            atomic_write_json(out, results)
    if b.data_pipeline_examples:
        from bamba_ft.jobs.bench_data import data_pipeline

        results["data_pipeline"] = data_pipeline(b.data_pipeline_examples, list(b.data_pipeline_num_proc),
                                                 list(b.data_pipeline_paths), seed)
    if b.mixer_only:
        results["mixer_only"] = sweeps.mixer_only(mcfg, b, device, seed)
    if b.layer_parts:
        from bamba_ft.jobs.bench_parts import layer_parts

        results["layer_parts"] = layer_parts(mcfg, cfg.peft, b, device, seed, vocab)
    if b.matmul_ceiling:
        timed = [r["tokens_per_step"] for r in results["runs"] if "tokens_per_step" in r]
        tokens = round(statistics.mean(timed)) if timed else b.median_len * b.seqs_per_step
        results["matmul_ceiling"] = sweeps.matmul_ceiling(mcfg, b, device, tokens)
    results["summary"] = summarize(results["runs"])
    results["headline"] = headline(results)
    atomic_write_json(out, results)
    md = markdown(results)
    atomic_write_text(out.with_suffix(".md"), md + "\n")
    print(md)
    print(f"\nresults: {out} and {out.with_suffix('.md')}")
    return results
