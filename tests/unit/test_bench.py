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
