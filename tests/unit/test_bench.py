"""The benchmark harness's step accounting, repeats, summaries and sweeps (CPU, tiny model or fakes); speed itself
is never asserted."""

from __future__ import annotations

import math
import os
import re
import statistics
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from bamba_ft.config.schema import BenchConfig, ModelConfig, PeftConfig, RunConfig, validate
from bamba_ft.errors import ConfigError
from bamba_ft.jobs import bench, bench_batches, bench_report, bench_sweeps, bench_variants
from bamba_ft.jobs.bench_sweeps import budget_steps


@pytest.mark.parametrize("rehearse,expected", [(False, [0, 1, 2]), (True, [0, 1, 2, 1, 2])])
def test_rehearsal_runs_each_timed_batch_once_before_timing_it(monkeypatch: pytest.MonkeyPatch, rehearse: bool,
                                                               expected: list[int]) -> None:
    b = BenchConfig(warmup_steps=1, steps=2, seqs_per_step=2, median_len=20, max_len=32, rehearse=rehearse)
    steps = bench_batches.make_steps(b, 128, seed=0)
    seen: list[int] = []
    loss = bench_variants.mean_loss

    def counting_loss(model, batch):  # noqa: ANN001, ANN202
        seen.append(next(i for i, s in enumerate(steps) if batch["input_ids"].shape[1] == sum(map(len, s))))
        return loss(model, batch)

    monkeypatch.setattr(bench_variants, "mean_loss", counting_loss)
    cpu = torch.device("cpu")
    model = bench_variants.build_variant(bench_variants.VARIANTS["bamba_ft"], ModelConfig(init="random", shape="tiny"),
                                         PeftConfig(), cpu, seed=0)["model"]
    result = bench_variants.measure(bench_variants.VARIANTS["bamba_ft"], model, steps, b, cpu)
    assert seen == expected
    assert result["tokens_per_step"] == sum(sum(map(len, s)) for s in steps[1:]) / 2  # the timed steps only


@pytest.mark.parametrize("name,error", [
    ("bamba_ft_graphs", "ModelError: model.cuda_graphs=true replays the fused CUDA conv+scan"),
    ("bamba_ft_fp8_graphs", "ModelError: model.cuda_graphs=true replays the fused CUDA conv+scan")])
def test_cuda_kernel_variants_report_why_they_cannot_run_on_cpu(name: str, error: str) -> None:
    b = BenchConfig(warmup_steps=0, steps=1, seqs_per_step=1, median_len=8, max_len=8)
    steps = bench_batches.make_steps(b, 128, 0)
    result = bench_variants.run_variant(bench_variants.VARIANTS[name], ModelConfig(init="random", shape="tiny"),
                                        PeftConfig(), steps, b, torch.device("cpu"), seed=0)
    assert result["error"].startswith(error)


def test_fp8_variant_trains_every_adapter_on_cpu() -> None:
    b = BenchConfig(warmup_steps=0, steps=1, seqs_per_step=2, median_len=16, max_len=32)
    steps = bench_batches.make_steps(b, 128, 0)
    result = bench_variants.run_variant(bench_variants.VARIANTS["bamba_ft_fp8"], ModelConfig(init="random", shape="tiny"),
                                        PeftConfig(), steps, b, torch.device("cpu"), seed=0)
    assert "error" not in result, result
    assert result["adapters_with_grad"] == result["adapters"] > 0


def test_no_cudnn_variant_excludes_only_cudnn_attention() -> None:
    from torch.nn.attention import SDPBackend, _cur_sdpa_kernel_backends

    everything = set(_cur_sdpa_kernel_backends())
    with bench_variants._attention_backends(bench_variants.VARIANTS["hf_padfree_no_cudnn"]):
        assert set(_cur_sdpa_kernel_backends()) == everything - {SDPBackend.CUDNN_ATTENTION}
    with bench_variants._attention_backends(bench_variants.VARIANTS["hf_padfree"]):
        assert set(_cur_sdpa_kernel_backends()) == everything


def test_schedule_interleaves_variants_within_each_repeat_and_regime_and_rotates_their_order() -> None:
    b = BenchConfig(variants=["a", "b", "c"], repeats=4, rehearse=[False, True], memory_modes=["none"])
    assert [(rep, reh, name) for _, rep, reh, name in bench.schedule(b)] == [
        (0, False, "a"), (0, False, "b"), (0, False, "c"), (0, True, "a"), (0, True, "b"), (0, True, "c"),
        (1, False, "b"), (1, False, "c"), (1, False, "a"), (1, True, "b"), (1, True, "c"), (1, True, "a"),
        (2, False, "c"), (2, False, "a"), (2, False, "b"), (2, True, "c"), (2, True, "a"), (2, True, "b"),
        (3, False, "a"), (3, False, "b"), (3, False, "c"), (3, True, "a"), (3, True, "b"), (3, True, "c")]
    # over len(variants) repeats every variant runs once in every place
    places = [[name for _, rep, reh, name in bench.schedule(b) if rep == r and not reh] for r in range(3)]
    assert all(sorted(column) == ["a", "b", "c"] for column in zip(*places))


def test_repeats_measure_in_schedule_order_on_fresh_lengths_and_build_each_model_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    builds: list[str] = []
    measured: list[tuple[str, bool, int]] = []
    packed_lengths: dict[int, set[int]] = {}

    def fake_build(v, *args):  # noqa: ANN001, ANN002, ANN202
        builds.append(v.name)
        return {"model": torch.nn.Linear(1, 1)}

    def fake_measure(v, model, steps, b, *args):  # noqa: ANN001, ANN002, ANN202
        measured.append((v.name, b.rehearse, id(steps)))
        packed_lengths[id(steps)] = {sum(map(len, s)) for s in steps}
        return {"tokens_per_sec": 1.0}

    monkeypatch.setattr(bench, "build_variant", fake_build)
    monkeypatch.setattr(bench_variants, "measure", fake_measure)
    b = BenchConfig(variants=["hf_padfree", "hf_padfree_no_cudnn", "bamba_ft"], repeats=3, rehearse=[False, True],
                    warmup_steps=2, steps=3, seqs_per_step=4, median_len=50, max_len=200)
    rows = list(bench.run_interleaved(b, ModelConfig(), PeftConfig(), torch.device("cpu"), 0, 128))
    assert [(r["repeat"], r["rehearse"], r["variant"]) for r in rows] == [
        (rep, reh, name) for _, rep, reh, name in bench.schedule(b)]
    assert [(name, reh) for name, reh, _ in measured] == [(r["variant"], r["rehearse"]) for r in rows]
    assert all(isinstance(reh, bool) for _, reh, _ in measured)
    assert builds == ["hf_padfree", "bamba_ft"]  # the no-cuDNN variant shares transformers' model; no rebuilds
    batches = list(dict.fromkeys(i for _, _, i in measured))
    assert len(batches) == 6  # one set per (repeat, regime), shared by its variants
    assert all(len({i for n, _, i in measured[k * 3 : k * 3 + 3]}) == 1 for k in range(6))
    every = [n for i in batches for n in packed_lengths[i]]
    assert len(every) == len(set(every)) == 6 * 5  # no packed length comes twice in the run


def test_keep_models_false_builds_each_measurements_model_alone_and_an_oom_beside_others_says_what_they_held(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Kept models (the default) crowd the device: a measurement that runs out of memory records what the other
    variants' models held and the report names bench.keep_models=false, which builds every measurement's model
    alone and frees it after."""
    live: list[str] = []
    builds: list[tuple[str, tuple[str, ...]]] = []

    class Model(torch.nn.Linear):
        def __init__(self, name: str) -> None:
            super().__init__(1, 1)
            self.name = name
            live.append(name)

        def __del__(self) -> None:
            live.remove(self.name)

    def fake_build(v, *args):  # noqa: ANN001, ANN002, ANN202
        builds.append((v.name, tuple(live)))  # the models alive when this one is built
        return {"model": Model(v.name), "resident_bytes": 2**30 * (3 if v.stock else 2)}

    def fake_measure(v, model, *args):  # noqa: ANN001, ANN002, ANN202
        if v.stock:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return {"tokens_per_sec": 1.0, "step_ms": 1.0}

    monkeypatch.setattr(bench, "build_variant", fake_build)
    monkeypatch.setattr(bench_variants, "measure", fake_measure)
    b = BenchConfig(variants=["hf_padfree", "bamba_ft"], repeats=3, warmup_steps=1, steps=1, seqs_per_step=2,
                    median_len=20, max_len=64)
    kept = list(bench.run_interleaved(b, ModelConfig(), PeftConfig(), torch.device("cpu"), 0, 128))
    assert builds == [("hf_padfree", ()), ("bamba_ft", ("hf_padfree",))]
    assert [(r["variant"], r.get("error"), r.get("others_resident_gib")) for r in kept] == [
        ("hf_padfree", "OOM", None), ("bamba_ft", None, None), ("bamba_ft", None, None), ("hf_padfree", "OOM", 2.0),
        ("hf_padfree", "OOM", 2.0), ("bamba_ft", None, None)]  # bamba_ft's model lives from its first run to its last
    note = "\n".join(bench_report._resident_oom_lines(kept))
    assert "hf_padfree in 2 of 3 runs (2.0 GiB)" in note and "bench.keep_models=false" in note

    builds.clear()
    alone = list(bench.run_interleaved(replace(b, keep_models=False), ModelConfig(), PeftConfig(),
                                       torch.device("cpu"), 0, 128))
    assert builds == [(r["variant"], ()) for r in kept]  # one build per measurement, nothing else alive
    assert all("others_resident_gib" not in r for r in alone) and bench_report._resident_oom_lines(alone) == []
    assert [r.get("error") for r in alone] == [r.get("error") for r in kept]


def test_memory_modes_run_outermost_and_share_each_built_model(monkeypatch: pytest.MonkeyPatch) -> None:
    builds: list[str] = []
    measured: list[tuple[str, str]] = []

    def fake_build(v, *args):  # noqa: ANN001, ANN002, ANN202
        builds.append(v.name)
        return {"model": torch.nn.Linear(1, 1)}

    def fake_measure(v, model, steps, b, *args):  # noqa: ANN001, ANN002, ANN202
        measured.append((v.memory, v.name))
        return {"tokens_per_sec": 1.0}

    monkeypatch.setattr(bench, "build_variant", fake_build)
    monkeypatch.setattr(bench_variants, "measure", fake_measure)
    b = BenchConfig(variants=["hf_padfree", "bamba_ft"], repeats=2, memory_modes=["none", "all+offload"],
                    warmup_steps=1, steps=1, seqs_per_step=2, median_len=20, max_len=64)
    rows = list(bench.run_interleaved(b, ModelConfig(), PeftConfig(), torch.device("cpu"), 0, 128))
    assert [(r["memory_mode"], r["repeat"], r["variant"]) for r in rows] == [
        (mode, rep, name) for mode in ("none", "all+offload") for rep in (0, 1)
        for name in (("hf_padfree", "bamba_ft"), ("bamba_ft", "hf_padfree"))[rep]]
    assert measured == [(r["memory_mode"], r["variant"]) for r in rows]
    assert builds == ["hf_padfree", "bamba_ft"]  # a mode is switched on the built model, not rebuilt
    b = BenchConfig(token_budgets=[64, 128], memory_modes=["none", "mamba"], warmup_steps=0, steps=1, median_len=20)
    monkeypatch.setattr(bench_sweeps, "build_variant", fake_build)
    rows = list(bench_sweeps.token_budgets(ModelConfig(), PeftConfig(), b, torch.device("cpu"), 0, 128))
    assert [(r["variant"], r["memory_mode"], r["token_budget"]) for r in rows] == [
        (name, mode, n) for name in ("bamba_ft", "hf_padfree") for mode in ("none", "mamba") for n in (64, 128)]
    assert builds[2:] == ["bamba_ft", "hf_padfree"]


def test_measure_switches_the_models_checkpointed_layers_to_the_variants_mode() -> None:
    b = BenchConfig(warmup_steps=0, steps=1, seqs_per_step=1, median_len=16, max_len=16)
    cpu, steps = torch.device("cpu"), bench_batches.make_steps(b, 128, 0)
    model = bench_variants.build_variant(bench_variants.VARIANTS["bamba_ft"], ModelConfig(init="random", shape="tiny"),
                                         PeftConfig(), cpu, seed=0)["model"]
    layers = bench_variants.causal_lm(model).model.layers
    for mode, expected in [("all+offload", [True] * len(layers)), ("none", [False] * len(layers))]:
        bench_variants.measure(replace(bench_variants.VARIANTS["bamba_ft"], memory=mode), model, steps, b, cpu)
        assert [layer.gradient_checkpointing for layer in layers] == expected


def _runs(table: dict[int, dict[str, float]], rehearse: bool = False) -> list[dict]:
    return [{"variant": name, "memory_mode": "none", "rehearse": rehearse, "repeat": rep,
             "tokens_per_sec": tps, "step_ms": 1000.0, "peak_gib": 50.0 + rep, "adapters_with_grad": 70, "adapters": 70}
            for rep, row in table.items() for name, tps in row.items()]


THREE_RUNS = {0: {"hf_padfree": 100.0, "hf_padfree_no_cudnn": 125.0, "bamba_ft": 150.0},  # ratio 150/125 = 1.2
              1: {"hf_padfree": 100.0, "hf_padfree_no_cudnn": 80.0, "bamba_ft": 130.0},  # 1.3
              2: {"hf_padfree": 200.0, "hf_padfree_no_cudnn": 190.0, "bamba_ft": 220.0}}  # 1.1


def test_median_range_and_per_run_ratio_to_the_best_padding_free_variant() -> None:
    assert bench_report.spread([3.0, 1.0, 2.0, 10.0]) == {"median": 2.5, "min": 1.0, "max": 10.0, "n": 4}
    assert bench_report.spread([]) is None
    runs = _runs(THREE_RUNS)
    assert bench_report.per_repeat_ratios(runs, "bamba_ft", "none", False) == pytest.approx([1.2, 1.3, 1.1], abs=1e-12)
    row = next(r for r in bench_report.summarize(runs) if r["variant"] == "bamba_ft")
    assert row["tokens_per_sec"] == {"median": 150.0, "min": 130.0, "max": 220.0, "n": 3}
    assert row["vs_best_hf_padfree"]["median"] == pytest.approx(1.2, abs=1e-12)
    assert (row["vs_best_hf_padfree"]["min"], row["vs_best_hf_padfree"]["max"]) == pytest.approx((1.1, 1.3), abs=1e-12)
    assert row["peak_gib"] == 52.0  # the largest over the runs


def _results(repeats: int, runs: list[dict], rehearse: list[bool]) -> dict:
    return {"device": "NVIDIA H200", "shape": "bamba-9b", "versions": {}, "peft": {"method": "lora", "r": 16},
            "bench": {"warmup_steps": 3, "steps": 6, "repeats": repeats, "memory_modes": ["none"]},
            "rehearse": rehearse, "runs": runs}


def test_headline_line_for_the_default_regime_reads_as_the_published_form() -> None:
    repeated = {rep: {**row, "bamba_ft": 2 * row["hf_padfree_no_cudnn"]} for rep, row in THREE_RUNS.items()}
    results = _results(3, _runs(THREE_RUNS) + _runs(repeated, rehearse=True), [False, True])
    line = bench_report.headline(results)
    assert line == ("Headline: bamba_ft 1.20x transformers padding-free (median of 3 interleaved runs, one H200, "
                    "Bamba-9B shape, LoRA r=16, new packed length every timed step: bench.rehearse=false)")
    assert re.match(r"^Headline: bamba_ft \d\.\d\dx transformers padding-free \(median of 3 interleaved runs, one "
                    r"H200, Bamba-9B shape, LoRA r=16", line)
    md = bench_report.markdown(results)
    assert [x for x in md.splitlines() if x.startswith("Headline:")] == [line]
    only_rehearsed = _results(3, _runs(repeated, rehearse=True), [True])
    assert bench_report.headline(only_rehearsed).startswith("Headline: bamba_ft 1.90x")  # 2.0, 1.6, 1.9


def test_per_step_ratios_pair_each_batch_with_the_reference_and_skip_compiling_steps() -> None:
    runs = _runs(THREE_RUNS)  # best hf_padfree*: no_cudnn in repeat 0, hf_padfree in repeats 1 and 2
    steps = {"hf_padfree": [500.0, 600.0], "hf_padfree_no_cudnn": [400.0, 480.0], "bamba_ft": [320.0, 300.0]}
    for r in runs:
        r |= {"step_ms_each": [ms * (1 + r["repeat"]) for ms in steps[r["variant"]]], "tokens_each": [4000, 5000],
              "compiled_each": [{}, {}]}
    by = {(r["repeat"], r["variant"]): r for r in runs}
    by[(2, "bamba_ft")]["compiled_each"][1] = {"_state_passing_fwd_kernel": 1}  # left out
    ratios = bench_report.per_step_ratios(runs, "bamba_ft", "none", False, "best hf_padfree*")
    assert ratios == pytest.approx([400 / 320, 480 / 300, 500 / 320, 600 / 300, 500 / 320], abs=1e-12)
    back = bench_report.per_step_ratios(runs, "hf_padfree", "none", False, "bamba_ft")
    assert back == pytest.approx([320 / 500, 300 / 600] * 2 + [320 / 500], abs=1e-12)
    assert bench_report.per_step_ratios(runs, "bamba_ft", "none", False, "bamba_ft") == []  # itself
    row = next(r for r in bench_report.summarize(runs) if r["variant"] == "bamba_ft")
    assert row["per_step"]["best hf_padfree*"]["median"] == pytest.approx(500 / 320) and \
        row["per_step"]["best hf_padfree*"]["n"] == 5
    md = bench_report.markdown(_results(3, runs, [False]))
    assert "| bamba_ft | none | new shapes | 1.562x | 1.250–2.000 | 5 | - | - | - |" in md
    for r in runs:  # rows without per-step times (older runs): no such table
        del r["step_ms_each"]
    assert "step by step" not in bench_report.markdown(_results(3, runs, [False]))


def test_the_report_names_the_timed_steps_that_compiled_kernels() -> None:
    runs = _runs(THREE_RUNS)
    for r in runs:
        r |= {"step_ms_each": [400.0, 1950.0], "tokens_each": [4549, 3962], "compiled_each": [{}, {}]}
    results = _results(3, runs, [False])
    assert "compiled kernels" not in bench_report.markdown(results)
    runs[4]["compiled_each"][1] = {"_state_passing_fwd_kernel": 1, "_chunk_scan_bwd_dstates_kernel": 2}
    lines = [x for x in bench_report.markdown(results).splitlines() if x.startswith("- ")]
    assert lines == [f"- {runs[4]['variant']}, run 1, timed step 1 (3,962 tokens, 1,950 ms): _state_passing_fwd_kernel, "
                     "_chunk_scan_bwd_dstates_kernel x2"]


def test_the_report_names_the_timed_steps_whose_allocations_were_retried() -> None:
    runs = _runs(THREE_RUNS)
    for r in runs:
        r |= {"step_ms_each": [400.0, 900.0], "tokens_each": [4549, 6712], "allocator_each": [{"mallocs": 2}, {}]}
    results = _results(3, runs, [False])
    assert "retry an allocation" not in bench_report.markdown(results)  # new segments alone are not listed
    runs[2]["allocator_each"][1] = {"mallocs": 40, "frees": 31, "retries": 1}
    lines = [x for x in bench_report.markdown(results).splitlines() if x.startswith("- ")]
    assert lines == [f"- {runs[2]['variant']}, run {runs[2]['repeat']}, timed step 1 (6,712 tokens, 900 ms): 1 retried, "
                     "40 cudaMalloc, 31 cudaFree"]


def test_the_report_gives_how_far_into_each_step_the_host_had_enqueued_it() -> None:
    runs = _runs(THREE_RUNS)
    for r in runs:
        host_bound = r["variant"] == "bamba_ft"
        r |= {"step_ms_each": [400.0, 200.0], "issued_ms_each": [396.0, 198.0] if host_bound else [200.0, 150.0]}
    rows = {r["variant"]: r for r in bench_report.summarize(runs)}
    assert rows["bamba_ft"]["issued_share"] == {"median": 0.99, "min": 0.99, "max": 0.99, "n": 6}
    other = next(v for v in rows if v != "bamba_ft")
    assert rows[other]["issued_share"] == {"median": 0.625, "min": 0.5, "max": 0.75, "n": 6}
    assert (rows["bamba_ft"]["host_bound_steps"], rows[other]["host_bound_steps"]) == (6, 0)
    md = bench_report.markdown(_results(3, runs, [False]))
    assert "| bamba_ft | none | new shapes | 99% | 99%–99% | 6 of 6 |" in md
    assert "Most timed steps of bamba_ft (new shapes) waited on the host" in md
    for r in runs:  # half the steps waiting is not most
        if r["variant"] == "bamba_ft":
            r["issued_ms_each"] = [396.0, 100.0]
    md = bench_report.markdown(_results(3, runs, [False]))
    assert "| bamba_ft | none | new shapes | 74% | 50%–99% | 3 of 6 |" in md and "waited on the host:" not in md


def test_the_report_names_the_variants_that_replayed_the_graphs() -> None:
    runs = _runs(THREE_RUNS)
    assert "CUDA graphs" not in bench_report.markdown(_results(3, runs, [False]))
    for r in runs:
        r["cuda_graphs"] = r["variant"] == "bamba_ft"
    md = bench_report.markdown(_results(3, runs, [False]))
    assert "conv+scan ran as CUDA graphs (model.cuda_graphs) in: bamba_ft (none);" in md


def test_host_cpu_names_the_model_and_cores(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\nprocessor\t: 1\n")
    assert bench.host_cpu(str(info)) == f"Intel(R) Xeon(R) Platinum 8480+, {os.cpu_count()} cores"
    assert bench.host_cpu(str(tmp_path / "missing")).endswith(f", {os.cpu_count()} cores")


def test_headline_reads_memory_mode_none_and_names_any_other_mode() -> None:
    slower = {rep: {**row, "bamba_ft": row["bamba_ft"] / 2} for rep, row in THREE_RUNS.items()}
    runs = [r | {"memory_mode": "all"} for r in _runs(slower)] + _runs(THREE_RUNS)
    results = _results(3, runs, [False])
    results["bench"]["memory_modes"] = ["all", "none"]
    assert bench_report.headline(results).startswith("Headline: bamba_ft 1.20x")  # mode none, listed second
    assert "memory mode" not in bench_report.headline(results)
    results["runs"], results["bench"]["memory_modes"] = runs[: len(runs) // 2], ["all"]
    line = bench_report.headline(results)
    assert line.startswith("Headline: bamba_ft 0.60x") and ", memory mode all, " in line


def test_no_headline_below_three_repeats_or_three_paired_runs() -> None:
    two = {k: v for k, v in THREE_RUNS.items() if k < 2}
    results = _results(2, _runs(two), [False])
    assert bench_report.headline(results) is None
    assert "Headline" not in bench_report.markdown(results)
    failed = [r for r in _runs(THREE_RUNS) if not (r["repeat"] == 2 and r["variant"].startswith("hf_padfree"))]
    assert bench_report.headline(_results(3, failed, [False])) is None


def test_budget_steps_are_packed_to_the_budget() -> None:
    b = BenchConfig(warmup_steps=1, steps=3, median_len=300, max_len=4096)
    for budget in (1024, 8192):
        steps = budget_steps(b, budget, 128, seed=0)
        assert len(steps) == 4
        assert all(len(s) <= budget for step in steps for s in step)  # sequences capped at the budget
        fills = [sum(map(len, step)) / budget for step in steps]
        assert max(fills) <= 1.0 and statistics.mean(fills) > 0.9
    assert statistics.mean(map(len, budget_steps(b, 8192, 128, 0))) > 4 * statistics.mean(
        map(len, budget_steps(b, 1024, 128, 0)))


def test_token_budget_oom_is_recorded_and_larger_budgets_are_not_run(monkeypatch: pytest.MonkeyPatch) -> None:
    loss = bench_variants.mean_loss
    calls: list[int] = []

    def oom_above_100_tokens(model, batch):  # noqa: ANN001, ANN202
        calls.append(batch["input_ids"].shape[1])
        if calls[-1] > 100:
            raise torch.OutOfMemoryError("CUDA out of memory (faked)")
        return loss(model, batch)

    monkeypatch.setattr(bench_variants, "mean_loss", oom_above_100_tokens)
    b = BenchConfig(token_budgets=[256, 64, 128], warmup_steps=0, steps=1, median_len=20, max_len=64)
    rows = list(bench_sweeps.token_budgets(ModelConfig(init="random", shape="tiny"), PeftConfig(), b,
                                           torch.device("cpu"), 0, 128))
    ours = [r for r in rows if r["variant"] == "bamba_ft"]
    assert [r["token_budget"] for r in ours] == [64, 128, 256]
    assert ours[0]["tokens_per_sec"] > 0 and ours[1]["error"] == "OOM"
    assert ours[2]["error"].startswith("OOM (not run: 128 tokens per step")
    assert max(calls) > 100 and all(n <= 128 for n in calls)  # 256 never ran
    assert [r["token_budget"] for r in rows if r["variant"] == "hf_padfree"] == [64, 128, 256]  # the sweep went on


def test_token_budget_table_and_bests() -> None:
    rows = [{"variant": v, "memory_mode": mode, "token_budget": n, "tokens_per_step": 0.98 * n,
             "tokens_per_sec": tps, "peak_gib": 30.0} for v, mode, n, tps in
            [("bamba_ft", "none", 4096, 11000.0), ("bamba_ft", "all", 8192, 12500.0),
             ("hf_padfree", "none", 4096, 10000.0), ("hf_padfree", "all+offload", 8192, 9000.0)]]
    rows.append({"variant": "hf_padfree", "memory_mode": "none", "token_budget": 8192, "error": "OOM"})
    bests = bench_report.budget_bests(rows)
    assert bests["bamba_ft"] == {"tokens_per_sec": 12500.0, "token_budget": 8192, "memory_mode": "all"}
    assert bests["ratio"] == pytest.approx(1.25, abs=1e-12)
    md = bench_report.markdown(_results(1, [], [False]) | {"token_budgets": rows})
    assert "| 8192 | hf_padfree | none |  | OOM |  |" in md
    assert "| 8192 | bamba_ft | all | 8,028 | 12,500 | 30.0 |" in md
    assert "best bamba_ft: 12,500 tokens/s (budget 8192, memory all)" in md
    assert "best bamba_ft / best hf_padfree: 1.25x" in md


@pytest.mark.parametrize(("key", "value", "message"), [
    ("rehearse", "yes", "bench.rehearse='yes' must be true, false or a list"),
    ("rehearse", [True, True], "names a regime twice"),
    ("repeats", 0, "bench.repeats=0 must be at least 1"),
    ("memory_modes", ["all", "all"], "bench.memory_modes=\\['all', 'all'\\] must name each mode once"),
    ("memory_modes", [], "bench.memory_modes=\\[\\] must name each mode once"),
    ("token_budgets", [4096, 0], "bench.token_budgets=\\[4096, 0\\]"),
    ("data_pipeline_num_proc", [1, 0], "bench.data_pipeline_num_proc=\\[1, 0\\] must list process counts"),
    ("data_pipeline_paths", ["memory", "disk"], "bench.data_pipeline_paths=\\['memory', 'disk'\\] must name memory"),
])
def test_bench_keys_are_checked(key: str, value: object, message: str) -> None:
    cfg = RunConfig()
    setattr(cfg.bench, key, value)
    with pytest.raises(ConfigError, match=message):
        validate(cfg)


def test_seq_scaling_runs_each_memory_mode_on_one_model_and_stops_a_mode_at_out_of_memory(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Fake device: a 32-token row 'runs out of memory' unless every layer is checkpointed and offload is on."""
    from bamba_ft.model import memory

    loss, offloading = bench_variants.mean_loss, []
    original = memory.OffloadActivations.__init__
    monkeypatch.setattr(memory.OffloadActivations, "__init__",
                        lambda self, model: (offloading.append(True), original(self, model))[1])

    def fake_device(model, batch):  # noqa: ANN001, ANN202
        layers = bench_variants.causal_lm(model).model.layers
        full = all(layer.gradient_checkpointing for layer in layers) and bool(offloading)
        offloading.clear()
        if batch["input_ids"].shape[1] == 32 and not full:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return loss(model, batch)

    monkeypatch.setattr(bench_variants, "mean_loss", fake_device)
    b = BenchConfig(memory_modes=["none", "every-2", "all+offload"], seq_scaling_steps=1)
    rows = list(bench_sweeps.seq_scaling([16, 32], ModelConfig(init="random", shape="tiny"), PeftConfig(), b,
                                         torch.device("cpu"), seed=0, vocab=128))
    assert [(r["memory_mode"], r["seq_len"], r.get("error")) for r in rows] == [
        ("none", 16, None), ("none", 32, "OOM"),
        ("every-2", 16, None), ("every-2", 32, "OOM"),
        ("all+offload", 16, None), ("all+offload", 32, None)]
    assert all(r["tokens_per_sec"] > 0 for r in rows if "error" not in r)
    longest = bench_report.longest_trained(rows)
    assert longest == {"bamba_ft none": 16, "bamba_ft every-2": 16, "bamba_ft all+offload": 32}
    md = bench_report.markdown({"device": "cpu", "versions": {}, "bench": {"warmup_steps": 1, "steps": 1}, "runs": [],
                                "seq_scaling": rows, "longest_trained": longest})
    assert "| bamba_ft | every-2 | 32 | OOM |  |" in md
    assert "longest sequence trained: bamba_ft none 16, bamba_ft every-2 16, bamba_ft all+offload 32" in md


def test_adapter_coverage_counts_only_finite_nonzero_gradients():
    # a NaN or infinite gradient is a broken adapter, not a training one
    model = torch.nn.Module()
    grads = {"a": [0.5, 0.0], "b": [0.0, 0.0], "c": [float("nan"), 1.0], "d": [float("inf"), 1.0], "e": None}
    for name, g in grads.items():
        p = torch.nn.Parameter(torch.zeros(2))
        p.grad = None if g is None else torch.tensor(g)
        model.register_parameter(f"{name}_lora_B", p)
    model.register_parameter("x_lora_A", torch.nn.Parameter(torch.ones(2)))
    assert bench_variants._adapter_coverage(model) == (1, 5)


def test_ranks_merge_into_per_gpu_figures_and_an_error_on_any_rank_is_the_rows() -> None:
    rows = [{"variant": "bamba_ft", "memory_mode": "none", "tokens_per_sec": tps, "step_ms": ms, "peak_gib": gib,
             "final_loss": 2.0, "adapters": 70} for tps, ms, gib in [(100.0, 80.0, 40.0), (90.0, 90.0, 42.0)]]
    merged = bench_report.merge_ranks(rows)
    assert (merged["tokens_per_sec"], merged["step_ms"], merged["peak_gib"], merged["world_size"]) == (95.0, 90.0, 42.0, 2)
    assert [r["tokens_per_sec"] for r in merged["ranks"]] == [100.0, 90.0] and merged["adapters"] == 70
    failed = bench_report.merge_ranks([rows[0], {**rows[1], "error": "OOM"}])
    assert failed["error"] == "OOM" and "tokens_per_sec" not in failed
    assert bench_report.merge_ranks(rows[:1]) is rows[0]


def test_scaling_line_is_per_gpu_throughput_over_one_gpus() -> None:
    def at(world: int, per_gpu: float) -> dict:
        runs = [{"variant": "bamba_ft", "memory_mode": "none", "rehearse": False, "repeat": 0, "tokens_per_sec": per_gpu,
                 "step_ms": 1.0, "peak_gib": 48.0 + world, "adapters_with_grad": 70, "adapters": 70}]
        return _results(1, runs, [False]) | {"world_size": world}

    lines = bench_report.scaling([at(4, 8800.0), at(1, 10000.0), at(2, 9500.0)])
    assert lines[-1] == "Multi-GPU scaling (H200, Bamba-9B shape, LoRA, DDP): 2 GPUs 95%, 4 GPUs 88%"
    assert "| 4 | 8,800 | 35,200 | 88% | 52.0 |" in lines
    with pytest.raises(ValueError, match=r"one GPU and on more \(found GPU counts: \[2, 4\]\)"):
        bench_report.scaling([at(4, 8800.0), at(2, 9500.0)])


def test_sweeps_are_refused_on_several_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    from bamba_ft.jobs import bench_ranks

    b = BenchConfig(token_budgets=[4096], profile=True)
    bench_ranks.check_distributed(b)  # one process: allowed
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ConfigError, match=r"bench.token_budgets, bench.profile with 4 ranks.*\n.*Fix: run them without"):
        bench_ranks.check_distributed(b)
    bench_ranks.check_distributed(BenchConfig())


def test_matmul_ceiling_times_every_linear_shape_of_the_model_and_reports_the_share(monkeypatch) -> None:  # noqa: ANN001
    """Every Linear of the tiny shape is counted once per occurrence; the per-step sum and the ceiling follow from
    the timings (here faked: 1 ms per forward, 2 ms per input gradient); the report names each variant's share."""
    from transformers import BambaForCausalLM

    from bamba_ft.model.build import load_config

    calls = iter([1.0, 2.0] * 1000)
    monkeypatch.setattr(bench_sweeps, "median_ms", lambda fn, b, device: (fn(), next(calls))[1])
    ceiling = bench_sweeps.matmul_ceiling(ModelConfig(init="random", shape="tiny"), BenchConfig(warmup_steps=0, steps=1),
                                          torch.device("cpu"), tokens=64)
    config = load_config(ModelConfig(init="random", shape="tiny"))
    linears = [m for m in BambaForCausalLM(config).modules() if isinstance(m, torch.nn.Linear)]
    assert sum(s["count"] for s in ceiling["shapes"]) == len(linears)
    assert ceiling["forward_ms"] == len(linears) and ceiling["input_grad_ms"] == 2 * len(linears)
    assert ceiling["tokens_per_sec"] == pytest.approx(1000 * 64 / (3 * len(linears)))
    results = {"device": "cpu", "versions": {}, "bench": {"variants": []}, "runs": [], "matmul_ceiling": ceiling,
               "summary": [{"variant": "bamba_ft", "memory_mode": "none", "rehearse": False,
                            "tokens_per_sec": {"median": ceiling["tokens_per_sec"] / 2}}]}
    text = bench_report.markdown(results)
    assert f"a ceiling of {ceiling['tokens_per_sec']:,.0f} tokens/s" in text
    assert "bamba_ft (none, new shapes): 50% of the ceiling" in text


def test_layer_parts_times_each_part_of_a_layer_on_the_inputs_of_a_real_forward(monkeypatch) -> None:  # noqa: ANN001
    """Every part of the first Mamba layer, and the first attention layer, runs forward and backward on what it
    received in the model's forward; on the CPU only wall time exists; the report prints one row per part."""
    from bamba_ft.jobs import bench_parts

    b = BenchConfig(warmup_steps=0, steps=1, seqs_per_step=3, median_len=20, max_len=40)
    timings: list[dict] = []
    timed = bench_parts._time

    def spy(fn, b, device, split=True):  # noqa: ANN001, ANN202
        row = timed(fn, b, device, split)
        assert row["wall_ms"] > 0 and row["host_ms"] is None and row["device_ms"] is None
        timings.append(row)
        return row

    monkeypatch.setattr(bench_parts, "_time", spy)
    result = bench_parts.layer_parts(ModelConfig(init="random", shape="tiny"), PeftConfig(), b, torch.device("cpu"),
                                     0, vocab=128)
    names = [r["part"] for r in result["parts"]]
    assert names[:5] == ["Mamba decoder layer", "mixer", "mixer in_proj", "mixer norm", "mixer out_proj"]
    assert {"input_layernorm", "pre_ff_layernorm", "feed_forward", "attention decoder layer"} <= set(names)
    assert names[-1] == "whole model, loss included" and "conv+scan" not in names  # no CUDA kernels on the CPU
    assert "scan_kernels" not in result
    assert len(timings) == len(names)
    assert 3 <= result["tokens"] <= 3 * 40
    text = bench_report.markdown({"device": "cpu", "versions": {}, "bench": {"variants": []}, "runs": [],
                                  "layer_parts": result})
    assert f"on a packed batch of {result['tokens']:,} tokens" in text
    assert all(f"| {n} |" in text for n in names)


def test_layer_parts_times_the_conv_scan_without_the_graphs_training_leaves_off(monkeypatch) -> None:  # noqa: ANN001
    """A bf16 model built with model.cuda_graphs=auto carries conv+scan graphs that training replays for a float8
    base only: layer_parts times its parts with them off, as bamba_ft trains (they recompute the scan's states, so
    the kept-states timing was a second graph replay), and leaves the model as it was built."""
    from bamba_ft.jobs import bench_parts
    from bamba_ft.ops.mamba2 import SegmentAwareMixer

    built = bench_parts.build_variant
    mixers: list = []

    def with_graphs(*args):  # noqa: ANN002, ANN202
        out = built(*args)
        mixers.extend(m for m in out["model"].modules() if isinstance(m, SegmentAwareMixer))
        for m in mixers:
            m.conv_scan_graphs = "graphs"  # what install_mixer puts there on a GPU
        return out

    seen: list[set] = []
    timed = bench_parts._time

    def spy(fn, b, device, split=True):  # noqa: ANN001, ANN202
        seen.append({m.__dict__.get("conv_scan_graphs") for m in mixers})
        return timed(fn, b, device, split)

    monkeypatch.setattr(bench_parts, "build_variant", with_graphs)
    monkeypatch.setattr(bench_parts, "_time", spy)
    b = BenchConfig(warmup_steps=0, steps=1, seqs_per_step=2, median_len=20, max_len=40)
    bench_parts.layer_parts(ModelConfig(init="random", shape="tiny"), PeftConfig(), b, torch.device("cpu"), 0, vocab=128)
    assert mixers and seen and all(s == {None} for s in seen)
    assert all(m.conv_scan_graphs == "graphs" for m in mixers)


def test_scan_kernels_are_listed_side_by_side_per_policy_with_totals() -> None:
    from bamba_ft.jobs import bench_parts

    kernels = {"recompute": [["_chunk_scan_chunk_state_bwd_dx_kernel", 0.313, 1.0], ["_chunk_state_fwd_kernel", 0.19, 2.0]],
               "keep": [["_chunk_scan_chunk_state_bwd_dx_kernel", 0.312, 1.0], ["_chunk_state_fwd_kernel", 0.095, 1.0],
                        ["_state_passing_fwd_kernel", 0.04, 1.0]]}
    lines = bench_parts.scan_kernel_lines(kernels)
    assert lines[3] == "| kernel | recompute | keep |"
    assert lines[5:] == ["| _chunk_scan_chunk_state_bwd_dx_kernel | 0.313 (1) | 0.312 (1) |",
                         "| _chunk_state_fwd_kernel | 0.190 (2) | 0.095 (1) |",
                         "| _state_passing_fwd_kernel |  | 0.040 (1) |",
                         "| total | 0.503 | 0.447 |"]
    assert bench_parts.scan_kernel_lines({}) == []
    text = bench_report.markdown({"device": "cpu", "versions": {}, "bench": {"variants": []}, "runs": [],
                                  "layer_parts": {"tokens": 10, "parts": [], "scan_kernels": kernels}})
    assert "| total | 0.503 | 0.447 |" in text


def test_a_part_gets_its_inputs_as_new_leaves_so_backward_stops_there() -> None:
    from bamba_ft.jobs import bench_parts

    layer = torch.nn.Linear(4, 3)
    x = torch.randn(2, 4, requires_grad=True)
    upstream = x * 2  # not a leaf: backward of the part must not reach x
    run = bench_parts._forward_backward(layer, (upstream,), {}, layer, torch.device("cpu"))
    run()
    assert x.grad is None and layer.weight.grad is not None


@pytest.mark.parametrize("seed", range(6))
def test_warmup_covers_both_length_specialisations_and_timed_lengths_stay_new(seed: int) -> None:
    b = BenchConfig(warmup_steps=3, steps=6, seqs_per_step=4, median_len=50, max_len=64)
    plain = bench_batches.make_steps(BenchConfig(warmup_steps=0, steps=9, seqs_per_step=4, median_len=50,
                                                  max_len=64), 128, seed)
    seen: set[int] = set()
    steps = bench_batches.make_steps(b, 128, seed, seen)
    lengths = [sum(map(len, s)) for s in steps]
    assert lengths[0] % 16 == 0 and lengths[1] % 16 != 0
    assert len(set(lengths)) == len(lengths) and set(lengths) <= seen
    for made, drawn in zip(steps[:2], plain[:2]):  # only the last sequence changes, by fewer than 16 tokens
        assert [len(s) for s in made[:-1]] == [len(s) for s in drawn[:-1]]
        assert 0 <= abs(len(made[-1]) - len(drawn[-1])) < 16 and 1 <= len(made[-1]) <= b.max_len


def test_warmup_covers_the_derived_length_specialisations_in_every_repeat() -> None:
    """Warm-up steps 2 and 3 have the shortest packed lengths whose chunk count (chunks of 256) and norm rows per
    program (132 SMs) are multiples of 16, one not a multiple of 16 itself and one that is; every repeat."""
    b = BenchConfig(warmup_steps=4, steps=3, seqs_per_step=8, median_len=500, max_len=1024)
    seen: set[int] = set()
    for seed in (0, 1000):  # two repeats of one run
        steps = [[len(s) for s in step] for step in bench_batches.make_steps(b, 64, seed, seen)]
        totals = [sum(step) for step in steps]
        assert totals[0] % 16 == 0 and totals[1] % 16 != 0 and totals[2:4] == [4093, 4096]
        assert all(1 <= n <= b.max_len for step in steps for n in step)
        for per in (16, 32, 64, 128, 256, 132):  # every power-of-two chunk size up to 256, then the SMs
            assert all(math.ceil(t / per) % 16 == 0 for t in totals[2:4]), per
    assert len(set(totals[4:])) == 3 and not set(totals[4:]) & {4093, 4096}


@pytest.mark.parametrize("divisors", [(256, 132), (256, 108), (64, 78), (128, 170)])
def test_cover_lengths_are_the_shortest_with_every_derived_length_a_multiple_of_16(divisors: tuple) -> None:
    odd, even = bench_batches.cover_lengths(divisors, 1 << 17)
    def ok(t: int) -> bool:
        return all(math.ceil(t / d) % 16 == 0 for d in divisors)
    assert odd % 16 != 0 and even % 16 == 0 and ok(odd) and ok(even)
    assert not any(ok(t) and t % 16 for t in range(1, odd)) and not any(ok(t) for t in range(16, even, 16))
    assert bench_batches.cover_lengths(divisors, odd - 1)[0] is None  # out of reach: left as drawn


def test_the_bench_derives_its_divisors_from_the_model_and_the_device() -> None:
    from bamba_ft.config.schema import ModelConfig
    cpu = torch.device("cpu")
    assert bench.specialisation_divisors(ModelConfig(shape="tiny"), cpu) == (32, 132)
    assert bench.specialisation_divisors(ModelConfig(shape="bamba-9b"), cpu) == (256, 132)
    assert bench.specialisation_divisors(ModelConfig(shape="tiny-random-nemotron_h"), cpu)[0] == 16


def test_resize_step_keeps_proportions_and_max_len() -> None:
    step = [100, 300, 600]
    bench_batches.resize_step(step, 4093, max_len=4096)
    assert sum(step) == 4093 and all(abs(n - m * 4.093) <= 1 for n, m in zip(step, [100, 300, 600]))
    step = [10, 10, 1000]  # the long one is clamped; the rest takes up what it cannot
    bench_batches.resize_step(step, 3000, max_len=2000)
    assert sum(step) == 3000 and max(step) == 2000 and min(step) >= 1


def test_a_run_too_short_for_the_derived_length_cover_leaves_those_steps_as_drawn() -> None:
    b = BenchConfig(warmup_steps=4, steps=1, seqs_per_step=2, median_len=50, max_len=64)
    drawn = bench_batches.make_steps(replace(b, warmup_steps=0, steps=5), 64, 0)
    made = bench_batches.make_steps(b, 64, 0)
    assert bench_batches.cover_targets((256, 132), 2 * 64)[2:] == [None, None]
    assert [len(s) for s in made[2]] == [len(s) for s in drawn[2]]
    assert [len(s) for s in made[3]] == [len(s) for s in drawn[3]]


def test_cover_length_specialisation_respects_max_len() -> None:
    step = [60, 63]  # 123: the next multiple of 16 would need 68 > max_len 64, so the last sequence shrinks
    bench_batches.cover_length_specialisation(step, multiple=True, max_len=64)
    assert step == [60, 52] and sum(step) % 16 == 0
    step = [64, 64]  # a multiple already; made not one without passing max_len
    bench_batches.cover_length_specialisation(step, multiple=False, max_len=64)
    assert step == [64, 63]


def test_profiled_kernels_are_grouped_by_what_they_do() -> None:
    """Names as torch's profiler reports them on an H200 (cuBLAS, mamba-ssm, causal-conv1d, flash attention,
    inductor, ATen); the first matching family takes a kernel, the rest is "other"."""
    kernels = [
        ("nvjet_tst_256x128_64x4_1x2_h_bz_coopA_NTT", 10.0),
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", 5.0),
        ("_chunk_scan_chunk_state_bwd_dx_kernel", 2.0),
        ("_state_passing_fwd_kernel", 0.5),
        ("_chunk_cumsum_fwd_kernel", 0.25),
        ("void causal_conv1d_channellast_bwd_kernel<Causal_conv1d_channellast_bwd_kernel_traits<128, 4>>", 1.0),
        ("void flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits>", 0.75),
        ("_layer_norm_fwd_1pass_kernel", 0.5),
        ("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::BFloat16, float>", 0.25),
        ("triton_red_fused__to_copy_mul_silu_0", 3.0),
        ("void at::native::vectorized_elementwise_kernel<8, at::native::bfloat16_copy_kernel_cuda>", 0.5),
        ("void at::native::(anonymous namespace)::CatArrayBatchedCopy<at::native::OpaqueType<2u>>", 0.25),
        ("Memcpy DtoD (Device -> Device)", 0.25),
        ("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>", 0.125),
        ("Memset (Device)", 0.125),
        ("void at::native::reduce_kernel<128, 4, at::native::ReduceOp<float>>", 0.5),
        ("void at::native::tensor_kernel_scan_innermost_dim<float, std::plus<float>>", 0.25),
        ("void at::native::multi_tensor_apply_kernel<FusedAdamMathFunctor<float>>", 0.375),
        ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>>", 1.5),
        ("void at::native::index_elementwise_kernel<128, 4, flip_kernel_impl>", 0.125),
        ("some_new_kernel", 0.0625),
    ]
    families = bench_variants.kernel_families(kernels)
    assert families == {
        "matmul": 15.0, "compiled (inductor: SwiGLU, loss)": 3.0, "Mamba-2 scan (mamba-ssm)": 2.75,
        "other elementwise": 1.625, "conv (causal-conv1d)": 1.0, "copies": 1.0, "attention": 0.75, "norms": 0.75,
        "reductions, cumsums": 0.75, "optimizer": 0.375, "fills": 0.25, "other": 0.0625}
    assert list(families) == sorted(families, key=lambda f: -families[f])
    assert sum(families.values()) == sum(ms for _, ms in kernels)



def test_the_bench_replays_the_conv_scan_graphs_where_training_auto_would() -> None:
    """The auto variants measure with the graphs where training's auto would on a CUDA device (why_no_graphs: a
    float8 base, default memory mode, short rows); *_graphs always, *_no_graphs and keep_states never; a measurement
    without them leaves them installed for the next."""
    from bamba_ft.model.mixer import GRAPHS_AUTO_MAX_TOKENS
    from bamba_ft.ops.graphs import ConvScanGraphs
    from bamba_ft.ops.mamba2 import SegmentAwareMixer
    from tests.unit.test_conv_scan import TorchOps

    b = BenchConfig(warmup_steps=0, steps=1, seqs_per_step=1, median_len=16, max_len=16)
    cpu, gpu, steps = torch.device("cpu"), torch.device("cuda"), bench_batches.make_steps(b, 128, 0)
    variants = bench_variants.VARIANTS
    model = bench_variants.build_variant(variants["bamba_ft"], ModelConfig(init="random", shape="tiny"), PeftConfig(),
                                         cpu, seed=0)["model"]

    def runs(name: str, mode: str = "none", on: torch.device = gpu, batches: list = steps) -> bool:
        return bench_variants.graphs_run(replace(variants[name], memory=mode), model, batches, on)

    assert not runs("bamba_ft_fp8") and not runs("bamba_ft_graphs")  # built on the CPU: no graphs to run
    graphs = ConvScanGraphs(TorchOps, bucket=8, capture=False)
    mixers = [m for m in model.modules() if isinstance(m, SegmentAwareMixer)]
    for m in mixers:
        m.conv_scan_graphs = graphs
    assert runs("bamba_ft_fp8") and runs("bamba_ft_graphs") and runs("bamba_ft_graphs", "all")
    assert not runs("bamba_ft") and not runs("bamba_ft_nf4")  # a bf16 or NF4 base: its step waits on the GPU
    assert not runs("bamba_ft_fp8", "all") and not runs("bamba_ft_fp8", "none+offload") and not runs("bamba_ft_fp8", on=cpu)
    assert not runs("bamba_ft_fp8", batches=[[list(range(GRAPHS_AUTO_MAX_TOKENS + 1))]])
    assert not runs("bamba_ft_no_graphs") and not runs("bamba_ft_keep_states") and not runs("bamba_ft_fp8_no_graphs")

    row = bench_variants.measure_into({}, variants["bamba_ft_graphs"], model, steps, b, cpu)
    assert "error" not in row and row["cuda_graphs"] is True and row["graphs_captured"] > 0
    row = bench_variants.measure_into({}, variants["bamba_ft_no_graphs"], model, steps, b, cpu)
    assert "error" not in row and row["cuda_graphs"] is False and "graphs_captured" not in row
    assert all(m.__dict__["conv_scan_graphs"] is graphs for m in mixers)



def test_each_memory_mode_reports_the_same_final_loss_whatever_order_the_modes_run_in(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The model one variant builds serves every mode and repeat, and each measurement trained it further: a mode's
    final_loss depended on the modes run before it, and on which batches its place in the order drew."""
    def fake_build(v, *args):  # noqa: ANN001, ANN002, ANN202
        torch.manual_seed(0)
        return {"model": torch.nn.Linear(1, 1)}

    def fake_measure(v, model, steps, b, *args):  # noqa: ANN001, ANN002, ANN202
        opt = torch.optim.SGD(model.parameters(), lr=0.1)  # a fresh optimizer, as measure's
        for seqs in steps:
            x = torch.tensor([[float(sum(map(len, seqs)))]]) / 100
            loss = (model(x) - torch.rand(1)).pow(2).mean()  # the RNG stands for dropout
            loss.backward()
            opt.step()
            opt.zero_grad()
        return {"final_loss": float(loss)}

    monkeypatch.setattr(bench, "build_variant", fake_build)
    monkeypatch.setattr(bench_variants, "measure", fake_measure)
    b = BenchConfig(variants=["bamba_ft"], repeats=2, warmup_steps=1, steps=2, seqs_per_step=2, median_len=16,
                    max_len=32)

    def losses(modes: list[str]) -> dict[tuple[str, int], float]:
        rows = bench.run_interleaved(replace(b, memory_modes=modes), ModelConfig(), PeftConfig(), torch.device("cpu"),
                                     0, 128)
        return {(r["memory_mode"], r["repeat"]): r["final_loss"] for r in rows}

    forward = losses(["none", "all", "mamba"])
    assert forward == losses(["mamba", "all", "none"]) == losses(["all", "none", "mamba"]) and len(forward) == 6
    assert losses(["none"]) == {k: x for k, x in forward.items() if k[0] == "none"}  # as when it runs alone


def test_a_measurement_starts_from_the_weights_the_model_was_built_with() -> None:
    b = BenchConfig(warmup_steps=0, steps=1, seqs_per_step=1, median_len=16, max_len=16)
    cpu, steps = torch.device("cpu"), bench_batches.make_steps(b, 128, 0)
    v = bench_variants.VARIANTS["bamba_ft"]
    model = bench_variants.build_variant(v, ModelConfig(init="random", shape="tiny"), PeftConfig(), cpu, seed=0)["model"]
    start = bench_variants.starting_state(model, cpu)
    first = bench_variants.measure_into({}, v, model, steps, b, cpu, start=start)
    second = bench_variants.measure_into({}, replace(v, memory="all"), model, steps, b, cpu, start=start)
    assert first["final_loss"] == second["final_loss"]  # the same batch from the same weights, under another mode
