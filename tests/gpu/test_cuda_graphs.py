"""The conv+scan replayed as CUDA graphs against the same kernels called directly (run on a GPU: `pytest -m gpu`).

Tolerances are relative Frobenius errors ||a - b|| / ||b||. The kernels are the same; what differs is the
padded length of a bucket (more zero chunks in the reductions) and the order of the scan's atomic adds.
"""

from __future__ import annotations

import pytest
import torch

from bamba_ft.config.schema import PeftConfig
from bamba_ft.data.packing import collate_packed
from bamba_ft.model.lora import apply_peft
from bamba_ft.model.mixer import install_mixer
from bamba_ft.model.objective import mean_loss
from bamba_ft.ops.graphs import ConvScanGraphs
from bamba_ft.ops.kernels import KernelOps
from bamba_ft.ops.mamba2 import conv_scan
from tests.conftest import LORA_TARGETS, make_model
from tests.gpu.test_cuda_paths import SHAPE, rel

pytestmark = pytest.mark.gpu


def kernels_required() -> None:
    if not KernelOps.available():
        pytest.skip("mamba-ssm and causal-conv1d are not both installed: no fused conv+scan to graph")


def _grads(mixers, inputs, weights):  # noqa: ANN001, ANN202
    outs = [conv_scan(m, xbc, dt, seq) for m, (_, xbc, dt, seq) in zip(mixers, inputs)]
    loss = sum((y.float() * w).sum() for y, w in zip(outs, weights))
    params = [p for m in mixers for p in (m.conv1d.weight, m.conv1d.bias, m.A_log, m.D, m.dt_bias)]
    return [*outs, *torch.autograd.grad(loss, [z for z, *_ in inputs] + params)]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_graphed_conv_scan_equals_direct_kernels(dtype: torch.dtype, tol: float) -> None:
    """Two layers share the graphs; lengths cross buckets, grow the buffers and come back to a small bucket."""
    kernels_required()
    model = make_model(torch.float32, num_hidden_layers=3, attn_layer_indices=[2], **SHAPE).cuda().to(dtype)
    mixers = [model.model.layers[i].mamba for i in (0, 1)]
    graphs = ConvScanGraphs(bucket=64)
    g = torch.Generator().manual_seed(0)
    for lengths in ([100, 1, 37, 200], [300, 64, 3, 90, 250], [17], [180, 20]):  # 338, 707 (grows), 17, 200
        t = sum(lengths)
        seq = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None].cuda().to(torch.int32)
        inputs = []
        for m in mixers:
            z = torch.randn(1, t, m.in_proj.out_features, generator=g).cuda().to(dtype).requires_grad_()
            _, xbc, dt = z.split([m.intermediate_size, m.conv_dim, m.num_heads], dim=-1)
            inputs.append((z, xbc, dt, seq))
        weights = [torch.randn(1, t, m.num_heads, m.head_dim, generator=g).cuda() for m in mixers]
        direct = _grads(mixers, inputs, weights)
        for m in mixers:
            m.conv_scan_graphs = graphs
        graphed = _grads(mixers, inputs, weights)
        for m in mixers:
            del m.conv_scan_graphs
        torch.cuda.synchronize()
        for i, (a, b) in enumerate(zip(graphed, direct)):
            assert torch.isfinite(a).all() and b.abs().max() > 0, i
            assert rel(a, b) < tol, (lengths, i, rel(a, b))
    assert graphs.captures == 8  # buckets 384; then 768 on grown buffers, 64, 256: forward and backward each


@pytest.mark.parametrize("checkpointing", [False, True])
def test_graphed_lora_training_matches_direct(checkpointing: bool) -> None:
    """Three LoRA steps on packed batches of changing length: the same losses and adapter gradients."""
    kernels_required()
    runs = []
    for graphs in (False, True):
        model = make_model(torch.float32, **SHAPE).cuda().to(torch.bfloat16)
        install_mixer(model, "auto", cuda_graphs=graphs)
        if checkpointing:  # as build_model switches it on (transformers renamed the method in 5.2x)
            enable = getattr(model, "activation_checkpointing_enable", None)
            if enable is not None:
                enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = apply_peft(model, PeftConfig(r=8, target_modules=LORA_TARGETS))
        for n, p in model.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.02, generator=torch.Generator("cuda").manual_seed(hash(n) % 2**31))
        model.train()
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        g = torch.Generator().manual_seed(1)
        losses, grads = [], {}
        for lengths in ([120, 33, 300], [500, 7], [64]):
            seqs = [torch.randint(1, 256, (n,), generator=g).tolist() for n in lengths]
            batch = collate_packed([{"input_ids": s, "labels": s} for s in seqs])
            batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = mean_loss(model, batch)
            loss.backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss))
        if graphs:
            runner = next(m.conv_scan_graphs for m in model.modules() if "conv_scan_graphs" in m.__dict__)
            assert runner.captures > 0
        runs.append((losses, grads))
    (l0, g0), (l1, g1) = runs
    assert l1 == pytest.approx(l0, rel=1e-3)
    assert g0.keys() == g1.keys() and any("out_proj" in n for n in g0)
    for n in g0:
        assert rel(g1[n], g0[n]) < 3e-2, n


def test_auto_installs_the_graphs_only_where_training_says_they_pay() -> None:
    """model.cuda_graphs=auto (the default): graphs on a CUDA model with the fused conv+scan when the caller trains
    where they pay (graphs_auto), none otherwise (evaluation, export, the doctor)."""
    kernels_required()
    from bamba_ft.config.schema import ModelConfig, QuantConfig
    from bamba_ft.model.build import build_model
    from bamba_ft.model.mixer import graphs_installed

    cfg = ModelConfig(init="random", shape="tiny", dtype="bfloat16")
    assert cfg.cuda_graphs == "auto"
    assert graphs_installed(build_model(cfg, QuantConfig(), torch.device("cuda"), graphs_auto=True))
    assert not graphs_installed(build_model(cfg, QuantConfig(), torch.device("cuda")))
