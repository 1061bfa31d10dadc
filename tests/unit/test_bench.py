"""The benchmark harness's step accounting (CPU, tiny model); speed itself is never asserted."""

from __future__ import annotations

import pytest
import torch

from bamba_ft.config.schema import BenchConfig, ModelConfig, PeftConfig
from bamba_ft.jobs import bench


@pytest.mark.parametrize("rehearse,expected", [(False, [0, 1, 2]), (True, [0, 1, 2, 1, 2])])
def test_rehearsal_runs_each_timed_batch_once_before_timing_it(monkeypatch: pytest.MonkeyPatch, rehearse: bool,
                                                               expected: list[int]) -> None:
    b = BenchConfig(warmup_steps=1, steps=2, seqs_per_step=2, median_len=20, max_len=32, rehearse=rehearse)
    steps = bench.make_steps(b, 128, seed=0)
    seen: list[int] = []
    loss = bench.mean_loss

    def counting_loss(model, batch):  # noqa: ANN001, ANN202
        seen.append(next(i for i, s in enumerate(steps) if batch["input_ids"].shape[1] == sum(map(len, s))))
        return loss(model, batch)

    monkeypatch.setattr(bench, "mean_loss", counting_loss)
    cpu = torch.device("cpu")
    model = bench.build_variant(bench.VARIANTS["bamba_ft"], ModelConfig(init="random", shape="tiny"), PeftConfig(),
                                cpu, seed=0)["model"]
    result = bench.measure(bench.VARIANTS["bamba_ft"], model, steps, b, cpu)
    assert seen == expected
    assert result["tokens_per_step"] == sum(sum(map(len, s)) for s in steps[1:]) / 2  # the timed steps only


def test_graphs_variant_reports_why_it_cannot_run_on_cpu() -> None:
    b = BenchConfig(warmup_steps=0, steps=1, seqs_per_step=1, median_len=8, max_len=8)
    result = bench.run_variant(bench.VARIANTS["bamba_ft_graphs"], ModelConfig(init="random", shape="tiny"),
                               PeftConfig(), bench.make_steps(b, 128, 0), b, torch.device("cpu"), seed=0)
    assert result["error"].startswith("ModelError: model.cuda_graphs=true replays the fused CUDA conv+scan")


def test_no_cudnn_variant_excludes_only_cudnn_attention() -> None:
    from torch.nn.attention import SDPBackend, _cur_sdpa_kernel_backends

    everything = set(_cur_sdpa_kernel_backends())
    with bench._attention_backends(bench.VARIANTS["hf_padfree_no_cudnn"]):
        assert set(_cur_sdpa_kernel_backends()) == everything - {SDPBackend.CUDNN_ATTENTION}
    with bench._attention_backends(bench.VARIANTS["hf_padfree"]):
        assert set(_cur_sdpa_kernel_backends()) == everything


def test_seq_scaling_runs_each_memory_mode_on_one_model_and_stops_a_mode_at_out_of_memory(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Fake device: a 32-token row 'runs out of memory' unless every layer is checkpointed and offload is on."""
    from bamba_ft.model import memory

    loss, offloading = bench.mean_loss, []
    original = memory.OffloadActivations.__init__
    monkeypatch.setattr(memory.OffloadActivations, "__init__",
                        lambda self, model: (offloading.append(True), original(self, model))[1])

    def fake_device(model, batch):  # noqa: ANN001, ANN202
        layers = bench.causal_lm(model).model.layers
        full = all(layer.gradient_checkpointing for layer in layers) and bool(offloading)
        offloading.clear()
        if batch["input_ids"].shape[1] == 32 and not full:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return loss(model, batch)

    monkeypatch.setattr(bench, "mean_loss", fake_device)
    b = BenchConfig(memory_modes=["none", "every-2", "all+offload"], seq_scaling_steps=1)
    rows = list(bench.seq_scaling([16, 32], ModelConfig(init="random", shape="tiny"), PeftConfig(), b,
                                  torch.device("cpu"), seed=0, vocab=128))
    assert [(r["memory_mode"], r["seq_len"], r.get("error")) for r in rows] == [
        ("none", 16, None), ("none", 32, "out of memory"),
        ("every-2", 16, None), ("every-2", 32, "out of memory"),
        ("all+offload", 16, None), ("all+offload", 32, None)]
    assert all(r["tokens_per_sec"] > 0 for r in rows if "error" not in r)
    longest = bench.longest_trained(rows)
    assert longest == {"bamba_ft none": 16, "bamba_ft every-2": 16, "bamba_ft all+offload": 32}
    md = bench.markdown({"device": "cpu", "versions": {}, "bench": {"warmup_steps": 1, "steps": 1}, "runs": [],
                         "seq_scaling": rows, "longest_trained": longest})
    assert "| bamba_ft | every-2 | 32 | out of memory |  |" in md
    assert "longest sequence trained: bamba_ft none 16, bamba_ft every-2 16, bamba_ft all+offload 32" in md
