"""The benchmark's summaries: medians and ranges over interleaved repeats, ratios to transformers' best
padding-free variant, the Headline line, the token-budget bests, the markdown report, and multi-GPU scaling.

    python -m bamba_ft.jobs.bench_report 1gpu/bench.json 2gpu/bench.json 4gpu/bench.json   # the scaling line
"""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

HF_PADFREE = "hf_padfree"  # every variant whose name starts with this is a transformers padding-free path
SHAPE_NAMES = {"bamba-9b": "Bamba-9B"}
MIN_HEADLINE_RUNS = 3  # fewer interleaved runs give no median worth quoting
REGIMES = {False: "new packed length every timed step", True: "each timed batch rehearsed (repeated shapes)"}


def spread(values: Iterable[float]) -> dict | None:
    """{median, min, max, n} of `values`, or None when there are none."""
    v = list(values)
    if not v:
        return None
    return {"median": statistics.median(v), "min": min(v), "max": max(v), "n": len(v)}


def _ok(runs: list[dict]) -> list[dict]:
    return [r for r in runs if "tokens_per_sec" in r]


def _best_hf(rows: list[dict]) -> dict | None:
    return max((r for r in rows if r["variant"].startswith(HF_PADFREE)), key=lambda r: r["tokens_per_sec"],
               default=None)


def _by_repeat(runs: list[dict], mode: str, rehearse: bool) -> Iterator[list[dict]]:
    """The measured rows under memory mode `mode` and regime `rehearse`, one list per repeat, in repeat order."""
    group = [r for r in _ok(runs) if r["memory_mode"] == mode and r.get("rehearse", False) == rehearse]
    for rep in sorted({r.get("repeat", 0) for r in group}):
        yield [r for r in group if r.get("repeat", 0) == rep]


def per_repeat_ratios(runs: list[dict], variant: str, mode: str, rehearse: bool) -> list[float]:
    """`variant`'s tokens/s over the best hf_padfree* variant's under memory mode `mode`, one ratio per repeat in
    which both ran."""
    ratios = []
    for here in _by_repeat(runs, mode, rehearse):
        ref, mine = _best_hf(here), next((r for r in here if r["variant"] == variant), None)
        if ref and ref["tokens_per_sec"] and mine is not None:
            ratios.append(mine["tokens_per_sec"] / ref["tokens_per_sec"])
    return ratios


# A step whose host finished enqueueing it this late waited on the host. On an H200 with Bamba-9B, steps bound by
# the device were enqueued at 82-91% of their wall time (the last 40-90 ms of kernels still queued), steps that
# waited on the host at 98-100%.
HOST_BOUND_SHARE = 0.97


def _issued_shares(runs: list[dict]) -> list[float]:
    return [i / t for r in runs for i, t in zip(r.get("issued_ms_each", []), r.get("step_ms_each", [])) if t > 0]


def summarize(runs: list[dict]) -> list[dict]:
    """One row per (memory mode, regime, variant), in first-run order: medians and ranges over its repeats."""
    keys = list(dict.fromkeys((r["memory_mode"], r.get("rehearse", False), r["variant"]) for r in runs))
    rows = []
    for mode, rehearse, name in keys:
        mine = [r for r in runs if (r["memory_mode"], r.get("rehearse", False), r["variant"]) == (mode, rehearse, name)]
        ok = _ok(mine)
        shares = _issued_shares(ok)
        row = {"variant": name, "memory_mode": mode, "rehearse": rehearse, "runs": len(mine),
               "tokens_per_sec": spread(r["tokens_per_sec"] for r in ok),
               "vs_best_hf_padfree": spread(per_repeat_ratios(runs, name, mode, rehearse)),
               "per_step": {ref: spread(per_step_ratios(runs, name, mode, rehearse, ref)) for ref in REFERENCES},
               "step_ms": spread(r["step_ms"] for r in ok),
               "issued_share": spread(shares),
               "host_bound_steps": sum(1 for x in shares if x >= HOST_BOUND_SHARE),
               "mfu": spread(r["mfu"] for r in ok if "mfu" in r),
               "peak_gib": max((r["peak_gib"] for r in ok if "peak_gib" in r), default=None),
               "errors": sorted({r["error"] for r in mine if "error" in r})}
        if ok:
            row["adapters_with_grad"] = min(r["adapters_with_grad"] for r in ok)
            row["adapters"] = ok[0]["adapters"]
        rows.append(row)
    return rows


def _gpu_name(device: str) -> str:
    return "CPU" if device == "cpu" else device.removeprefix("NVIDIA ").strip()


def _gpus(results: dict) -> str:
    world, name = results.get("world_size", 1), _gpu_name(results["device"])
    return f"one {name}" if world == 1 else f"{world} x {name} with DDP, per GPU"


def headline(results: dict) -> str | None:
    """The one Headline line (bamba_ft against the best hf_padfree* variant, median of per-repeat ratios) for the
    default regime: memory mode none and new shapes where those ran. None below 3 repeats or 3 paired runs."""
    b = results["bench"]
    if b.get("repeats", 1) < MIN_HEADLINE_RUNS:
        return None
    modes, regimes = list(b["memory_modes"]), results.get("rehearse", [False])
    mode = "none" if "none" in modes else modes[0]
    rehearse = False if False in regimes else regimes[0]
    ratios = per_repeat_ratios(results["runs"], "bamba_ft", mode, rehearse)
    if len(ratios) < MIN_HEADLINE_RUNS:
        return None
    peft = results.get("peft", {})
    method = f"LoRA r={peft.get('r')}" if peft.get("method", "lora") == "lora" else "full fine-tuning"
    shape = SHAPE_NAMES.get(results["shape"], results["shape"])
    extra = "" if mode == "none" else f", memory mode {mode}"
    return (f"Headline: bamba_ft {statistics.median(ratios):.2f}x transformers padding-free (median of {len(ratios)} "
            f"interleaved runs, {_gpus(results)}, {shape} shape, {method}{extra}, "
            f"{REGIMES[rehearse]}: bench.rehearse={str(rehearse).lower()})")


def budget_bests(rows: list[dict]) -> dict:
    """The best tokens/s each stack reached over budgets and memory modes, and their ratio."""
    best: dict = {}
    for r in rows:
        if "tokens_per_sec" in r and r["tokens_per_sec"] > best.get(r["variant"], {}).get("tokens_per_sec", 0):
            best[r["variant"]] = {k: r[k] for k in ("tokens_per_sec", "token_budget", "memory_mode")}
    if "bamba_ft" in best and HF_PADFREE in best:
        best["ratio"] = best["bamba_ft"]["tokens_per_sec"] / best[HF_PADFREE]["tokens_per_sec"]
    return best


def longest_trained(rows: list[dict]) -> dict[str, int | None]:
    """{"variant mode": the longest sequence that trained (None: not even the shortest)} of a scaling sweep."""
    out: dict[str, int | None] = {}
    for r in rows:
        key = f"{r['variant']} {r['memory_mode']}"
        out.setdefault(key, None)
        if "error" not in r:
            out[key] = max(out[key] or 0, r["seq_len"])
    return out


def _bamba_ft(rows: list[dict]) -> dict | None:
    return next((r for r in rows if r["variant"] == "bamba_ft"), None)


REFERENCES = {"best hf_padfree*": _best_hf, "bamba_ft": _bamba_ft}


def per_step_ratios(runs: list[dict], variant: str, mode: str, rehearse: bool, reference: str) -> list[float]:
    """Paired on the same batches: for every timed step, the `reference` variant's step time (`REFERENCES`: the
    best hf_padfree* variant of that repeat, or bamba_ft) over `variant`'s, that is `variant`'s speed-up on that
    batch. Steps in which either compiled a kernel are left out, as are repeats without per-step times."""
    ratios = []
    for here in _by_repeat(runs, mode, rehearse):
        ref, mine = REFERENCES[reference](here), next((r for r in here if r["variant"] == variant), None)
        if ref is None or mine is None or ref is mine or "step_ms_each" not in ref or "step_ms_each" not in mine:
            continue
        quiet = [not a and not b for a, b in zip(ref.get("compiled_each", [{}] * len(ref["step_ms_each"])),
                                                mine.get("compiled_each", [{}] * len(mine["step_ms_each"])))]
        ratios += [a / b for a, b, ok in zip(ref["step_ms_each"], mine["step_ms_each"], quiet) if ok]
    return ratios


def _regime(row: dict) -> str:
    """How a summary row's timed steps met their batches: rehearsed (each run once before) or new shapes."""
    return "rehearsed" if row["rehearse"] else "new shapes"


def _range(s: dict | None, fmt: str) -> tuple[str, str]:
    if s is None:
        return "-", "-"
    return format(s["median"], fmt), f"{format(s['min'], fmt)}–{format(s['max'], fmt)}"


def _summary_lines(rows: list[dict], repeats: int) -> list[str]:
    header = ["variant", "memory", "timed steps", "real tokens/s (median)", "min–max", "vs best hf_padfree* "
              "(median)", "ratio min–max", "step ms", "peak GiB", "MFU", "adapters w/ grad"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        regime = _regime(r)
        if r["tokens_per_sec"] is None:
            lines.append(f"| {r['variant']} | {r['memory_mode']} | {regime} | "
                         f"{'; '.join(r['errors'])} |" + " |" * (len(header) - 4))
            continue
        tps, tps_range = _range(r["tokens_per_sec"], ",.0f")
        ratio, ratio_range = _range(r["vs_best_hf_padfree"], ".2f")
        ratio = "-" if ratio == "-" else ratio + "x"
        mfu = f"{100 * r['mfu']['median']:.1f}%" if r["mfu"] else "-"
        peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
        failed = f" ({r['runs'] - r['tokens_per_sec']['n']} of {r['runs']} failed)" if r["errors"] else ""
        lines.append(f"| {r['variant']} | {r['memory_mode']} | {regime} | {tps}{failed} | "
                     f"{tps_range} | {ratio} | {ratio_range} | {r['step_ms']['median']:.0f} | {peak} | {mfu} | "
                     f"{r['adapters_with_grad']}/{r['adapters']} |")
    return lines


def _resident_oom_lines(runs: list[dict]) -> list[str]:
    """Which variants ran out of memory while the models of others were kept on the device (bench.keep_models)."""
    crowded: dict[str, list[float]] = {}
    for r in runs:
        if "others_resident_gib" in r:
            crowded.setdefault(r["variant"], []).append(r["others_resident_gib"])
    if not crowded:
        return []
    total = {name: sum(1 for r in runs if r["variant"] == name) for name in crowded}
    told = "; ".join(f"{name} in {len(gib)} of {total[name]} runs ({max(gib):.1f} GiB)" for name, gib in crowded.items())
    return ["", f"Out of memory while other variants' models were kept on the device (what they held): {told}. A peak "
                "above counts a variant's own memory only; bench.keep_models=false measures each variant with its "
                "model alone on the device."]


def _budget_lines(rows: list[dict], bests: dict) -> list[str]:
    lines = ["", "Token budgets (steps packed as data.max_tokens_per_batch packs them):", "",
             "| token budget | variant | memory | real tokens/step | tokens/s | peak GiB |", "|---|---|---|---|---|---|"]
    for r in rows:
        if "tokens_per_sec" in r:
            peak = f"{r['peak_gib']:.1f}" if "peak_gib" in r else "-"
            cells = f"{r['tokens_per_step']:,.0f} | {r['tokens_per_sec']:,.0f} | {peak}"
        else:
            cells = f" | {r['error']} | "
        lines.append(f"| {r['token_budget']} | {r['variant']} | {r['memory_mode']} | {cells} |")
    for name in ("bamba_ft", HF_PADFREE):
        if name in bests:
            x = bests[name]
            lines.append(f"\nbest {name}: {x['tokens_per_sec']:,.0f} tokens/s (budget {x['token_budget']}, "
                         f"memory {x['memory_mode']})")
    if "ratio" in bests:
        lines.append(f"\nbest bamba_ft / best {HF_PADFREE}: {bests['ratio']:.2f}x")
    return lines


def _extra_lines(results: dict) -> list[str]:
    lines = []
    if results.get("seq_scaling"):
        lines += ["", "| variant | memory | seq len | tokens/s | peak GiB |", "|---|---|---|---|---|"]
        for r in results["seq_scaling"]:
            val = r.get("error") or f"{r['tokens_per_sec']:,.0f}"
            peak = f"{r['peak_gib']:.1f}" if "peak_gib" in r and "error" not in r else ""
            lines.append(f"| {r['variant']} | {r['memory_mode']} | {r['seq_len']} | {val} | {peak} |")
        longest = results.get("longest_trained") or longest_trained(results["seq_scaling"])
        lines += ["", "longest sequence trained: " + ", ".join(
            f"{k} {v:,}" if v else f"{k} none" for k, v in longest.items())]
    if results.get("mixer_only"):
        m = results["mixer_only"]
        lines += ["", f"one mixer, forward+backward, padded batch {m['batch'][0]}x{m['batch'][1]}: transformers "
                      f"{m['transformers_ms']:.1f} ms, bamba_ft ({m['bamba_ft_backend']}) {m['bamba_ft_ms']:.1f} ms "
                      f"({m['speedup']:.2f}x)"]
    if results.get("layer_parts"):
        from bamba_ft.jobs.bench_parts import layer_parts_lines

        lines += layer_parts_lines(results["layer_parts"])
    if results.get("matmul_ceiling"):
        c = results["matmul_ceiling"]
        lines += ["", f"base matmuls alone ({c['dtype']}, forward and input gradient of every Linear at {c['tokens']:,} "
                      f"tokens): {c['step_ms']:.1f} ms per step, a ceiling of {c['tokens_per_sec']:,.0f} tokens/s"]
        for r in results.get("summary") or []:
            if r.get("tokens_per_sec"):
                lines.append(f"- {r['variant']} ({r['memory_mode']}, {'rehearsed' if r['rehearse'] else 'new shapes'}): "
                             f"{100 * r['tokens_per_sec']['median'] / c['tokens_per_sec']:.0f}% of the ceiling")
    if results.get("data_pipeline"):
        from bamba_ft.jobs.bench_data import data_pipeline_lines

        lines += data_pipeline_lines(results["data_pipeline"])
    return lines


def merge_ranks(rows: list[dict]) -> dict:
    """One row from every rank's row of a measurement: tokens/s and MFU per GPU (means over ranks), the step time of
    the slowest rank and the peak memory of the fullest, each rank's own figures under `ranks`; an error on any rank
    is the row's error."""
    if len(rows) == 1:
        return rows[0]
    per_rank = ("tokens_per_sec", "step_ms", "peak_gib", "mfu", "final_loss")
    merged = {k: v for k, v in rows[0].items() if k not in per_rank} | {"world_size": len(rows)}
    errors = [r["error"] for r in rows if "error" in r]
    if errors:
        return merged | {"error": errors[0]}
    merged |= {"tokens_per_sec": statistics.mean(r["tokens_per_sec"] for r in rows),
               "step_ms": max(r["step_ms"] for r in rows), "final_loss": rows[0]["final_loss"],
               "ranks": [{k: r[k] for k in per_rank if k in r} for r in rows]}
    if all("peak_gib" in r for r in rows):
        merged["peak_gib"] = max(r["peak_gib"] for r in rows)
    if all("mfu" in r for r in rows):
        merged["mfu"] = statistics.mean(r["mfu"] for r in rows)
    return merged


def _default_row(results: dict, variant: str) -> dict | None:
    """`variant`'s summary row in the default regime (memory mode none, new shapes, where those ran)."""
    modes, regimes = list(results["bench"]["memory_modes"]), results.get("rehearse", [False])
    mode, rehearse = ("none" if "none" in modes else modes[0]), (False if False in regimes else regimes[0])
    return next((r for r in summarize(results["runs"]) if (r["variant"], r["memory_mode"], r["rehearse"])
                 == (variant, mode, rehearse) and r["tokens_per_sec"]), None)


def scaling(runs: list[dict], variant: str = "bamba_ft") -> list[str]:
    """A table and the scaling line from bench results at several GPU counts (one of them a one-GPU run):
    efficiency = tokens/s per GPU at N GPUs over the one-GPU run's (median over each run's repeats)."""
    rows = {}
    for results in runs:
        row = _default_row(results, variant)
        if row is not None:
            rows[results.get("world_size", 1)] = (row, results)
    if 1 not in rows or len(rows) < 2:
        raise ValueError(f"scaling needs {variant} measured on one GPU and on more (found GPU counts: "
                         f"{sorted(rows) or 'none'}); run recipe=bench without torchrun for the one-GPU figure.")
    base = rows[1][0]["tokens_per_sec"]["median"]
    lines = [f"{variant}, memory mode {rows[1][0]['memory_mode']}:", "",
             "| GPUs | tokens/s per GPU | tokens/s, all GPUs | efficiency | peak GiB per GPU |", "|---|---|---|---|---|"]
    for n, (row, _) in sorted(rows.items()):
        tps, peak = row["tokens_per_sec"]["median"], row["peak_gib"]
        lines.append(f"| {n} | {tps:,.0f} | {n * tps:,.0f} | {100 * tps / base:.0f}% | "
                     f"{'-' if peak is None else f'{peak:.1f}'} |")
    first = rows[1][1]
    peft = first.get("peft", {})
    method = "LoRA" if peft.get("method", "lora") == "lora" else "full fine-tuning"
    parts = ", ".join(f"{n} GPUs {100 * row['tokens_per_sec']['median'] / base:.0f}%"
                      for n, (row, _) in sorted(rows.items()) if n > 1)
    shape = SHAPE_NAMES.get(first["shape"], first["shape"])
    return lines + ["", f"Multi-GPU scaling ({_gpu_name(first['device'])}, {shape} shape, {method}, DDP): {parts}"]


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    try:
        print("\n".join(scaling([json.loads(Path(a).read_text()) for a in argv])))
    except (OSError, ValueError, KeyError) as e:
        print(f"bench_report: {e}", file=sys.stderr)
        return 2
    return 0


def _paired_lines(rows: list[dict]) -> list[str]:
    """Each variant's speed-up over a reference on the same batches, step by step (`per_step_ratios`)."""
    lines = []
    for r in rows:
        paired = [(r.get("per_step") or {}).get(ref) for ref in REFERENCES]
        if any(paired):
            cells = [f"{p['median']:.3f}x | {p['min']:.3f}–{p['max']:.3f} | {p['n']}" if p else "- | - | -"
                     for p in paired]
            regime = _regime(r)
            lines.append(f"| {r['variant']} | {r['memory_mode']} | {regime} | " + " | ".join(cells) + " |")
    if not lines:
        return []
    head = ["variant", "memory", "timed steps"] + [x for ref in REFERENCES
                                                   for x in (f"vs {ref} (median)", "min–max", "steps")]
    return ["", "The same batches, step by step: the reference's step time over the variant's (steps that compiled "
            "left out):", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head), *lines]


def _issued_lines(rows: list[dict]) -> list[str]:
    """How far into each timed step the host had enqueued all of it (`issued_ms_each`): a step whose host finished
    just before its end was bound by the host (launching kernels), one finished well before by the device."""
    lines, waited = [], []
    for r in rows:
        share = r.get("issued_share")
        if share:
            regime = _regime(r)
            lines.append(f"| {r['variant']} | {r['memory_mode']} | {regime} | {share['median']:.0%} | "
                         f"{share['min']:.0%}–{share['max']:.0%} | {r['host_bound_steps']} of {share['n']} |")
            if 2 * r["host_bound_steps"] > share["n"]:
                waited.append(f"{r['variant']} ({regime})")
    if not lines:
        return []
    note = ([f"Most timed steps of {', '.join(waited)} waited on the host: such a figure depends on how fast this "
             "machine's CPU issues the kernels, and differs between machines of one GPU kind."] if waited else [])
    return ["", "When the host had enqueued each timed step, as a share of the step's wall time (near 100%: the "
            "device waited on the host):", "",
            f"| variant | memory | timed steps | median | min–max | steps at {HOST_BOUND_SHARE:.0%} or more |",
            "|---|---|---|---|---|---|", *lines, *([""] + note if note else [])]


def _graphs_lines(runs: list[dict]) -> list[str]:
    """Which variants (and memory modes) replayed the conv+scan as CUDA graphs (`model.cuda_graphs`)."""
    graphed = list(dict.fromkeys(f"{r['variant']} ({r['memory_mode']})" for r in _ok(runs) if r.get("cuda_graphs")))
    return (["", f"The Mamba-2 conv+scan ran as CUDA graphs (model.cuda_graphs) in: {', '.join(graphed)}; in the "
             "other bamba_ft rows it launched its kernels one by one."] if graphed else [])


def _step_lines(runs: list[dict], key: str, describe: Callable[[dict], str | None], heading: str) -> list[str]:
    """One line per timed step whose per-step record under `key` (e.g. `compiled_each`) `describe` puts into
    words (None: not listed), under `heading`; nothing when no step is listed."""
    found = []
    for r in runs:
        for i, (record, ms) in enumerate(zip(r.get(key, []), r.get("step_ms_each", []))):
            if (said := describe(record)) is not None:
                found.append(f"- {r['variant']}, run {r['repeat']}, timed step {i} ({r['tokens_each'][i]:,} tokens, "
                             f"{ms:,.0f} ms): {said}")
    return ["", heading, *found] if found else []


def _compiled_lines(runs: list[dict]) -> list[str]:
    """The timed steps that compiled kernels (a one-off per process, inside that step's time), one line each."""
    def names(kernels: dict) -> str | None:
        return ", ".join(f"{k}" + (f" x{n}" if n > 1 else "") for k, n in kernels.items()) or None

    return _step_lines(runs, "compiled_each", names, "Timed steps that compiled kernels (once per process; in the "
                       "step's time; warm-up meant to cover them, see bench.warmup_steps):")


def _allocator_lines(runs: list[dict]) -> list[str]:
    """The timed steps in which the CUDA caching allocator emptied its cache to retry an allocation (a device
    sync and new cudaMallocs inside the step), one line each."""
    def retried(moved: dict) -> str | None:
        if not moved.get("retries"):
            return None
        return f"{moved['retries']} retried, {moved.get('mallocs', 0)} cudaMalloc, {moved.get('frees', 0)} cudaFree"

    return _step_lines(runs, "allocator_each", retried,
                       "Timed steps in which the caching allocator emptied its cache to retry an allocation:")


def markdown(results: dict) -> str:
    v = results["versions"]
    lines = [f"{results['device']} | torch {v.get('torch')} | transformers {v.get('transformers')} | mamba-ssm "
             f"{v.get('mamba-ssm', '-')} | causal-conv1d {v.get('causal-conv1d', '-')}"
             + (f" | host {results['host']}" if results.get("host") else "")]
    b = results["bench"]
    repeats = b.get("repeats", 1)
    if b.get("variants") != []:  # a data-only benchmark ('bench.variants=[]') times no steps
        order = " (their order rotated by one place each run)" if repeats > 1 else ""
        lines += [f"{b['warmup_steps']} warm-up steps, {b['steps']} timed steps (median per run); {repeats} "
                  f"interleaved run{'s' if repeats > 1 else ''} of every variant{order}, each run on fresh batches; ratios "
                  "are per run, against the best hf_padfree* variant of that run"]
    if results.get("world_size", 1) > 1:
        lines.append(f"{results['world_size']} GPUs, data parallel (DDP), every rank on the same batches: tokens/s per "
                     "GPU (mean over ranks), step time of the slowest rank, peak memory of the fullest")
    line = headline(results)
    if line:
        lines += ["", line]
    if results["runs"]:
        rows = summarize(results["runs"])
        lines += ([""] + _summary_lines(rows, repeats) + _resident_oom_lines(results["runs"])
                  + _graphs_lines(results["runs"]) + _paired_lines(rows)
                  + _issued_lines(rows)
                  + _compiled_lines(results["runs"])
                  + _allocator_lines(results["runs"]))
    if results.get("token_budgets"):
        lines += _budget_lines(results["token_budgets"], budget_bests(results["token_budgets"]))
    return "\n".join(lines + _extra_lines(results))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
