"""The fused conv+scan autograd function (CUDA kernels on GPU), checked on CPU with torch stand-ins for the kernels.

The stand-ins have the kernels' calling conventions (channel-last conv views, gradients written into given
buffers), so these tests cover everything the function does around the kernels: splitting, layouts,
recomputing the conv in backward and routing every gradient. The kernels themselves are compared with the
torch path in tests/gpu.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bamba_ft.ops.mamba2 import conv_scan, unfused_conv_scan
from bamba_ft.ops.scan_ref import segment_conv1d, ssd_scan_torch
from tests.conftest import make_model


class TorchOps:
    """torch implementations with the calling conventions of `KernelOps`."""

    calls: dict[str, int] = {}

    @classmethod
    def available(cls) -> bool:
        return True

    @classmethod
    def conv_fwd(cls, x, weight, bias, seq_idx):  # noqa: ANN001, ANN206
        cls.calls["conv_fwd"] = cls.calls.get("conv_fwd", 0) + 1
        assert x.stride(1) == 1 and x.stride(2) % 8 == 0, "causal-conv1d's channel-last layout"
        return F.silu(segment_conv1d(x.transpose(1, 2), weight, bias, seq_idx)).transpose(1, 2)

    @classmethod
    def conv_bwd(cls, x, weight, bias, dout, seq_idx, dx):  # noqa: ANN001, ANN206
        assert dout.stride(1) == 1 and dx.stride(1) == 1
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_() for t in (x, weight, bias)]
            y = F.silu(segment_conv1d(leaves[0].transpose(1, 2), leaves[1], leaves[2], seq_idx)).transpose(1, 2)
            gx, gw, gb = torch.autograd.grad(y, leaves, dout)
        dx.copy_(gx)
        return dx, gw, gb

    @staticmethod
    def scan_fwd(x, dt, A, B, C, chunk_size, D, dt_bias, seq_idx, dt_limit):  # noqa: ANN001, ANN205
        return ssd_scan_torch(x, dt, A, B, C, chunk_size, D=D, dt_bias=dt_bias, seq_idx=seq_idx, dt_limit=dt_limit)

    @staticmethod
    def scan_bwd(dout, x, dt, A, B, C, out, chunk_size, D, dt_bias, seq_idx, dt_limit, dx, ddt, dB, dC):  # noqa: ANN001, ANN205
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_() for t in (x, dt, A, B, C, D, dt_bias)]
            y = ssd_scan_torch(*leaves[:5], chunk_size, D=leaves[5], dt_bias=leaves[6], seq_idx=seq_idx, dt_limit=dt_limit)
            gx, gdt, gA, gB, gC, gD, gbias = torch.autograd.grad(y, leaves, dout)
        dx.copy_(gx), ddt.copy_(gdt), dB.copy_(gB), dC.copy_(gC)
        return dx, ddt, gA, dB, dC, gD, gbias

    @classmethod
    def scan_fwd_state(cls, x, dt, A, B, C, chunk_size, D, dt_bias, seq_idx, dt_limit, initial_states):  # noqa: ANN001, ANN206
        cls.calls["scan_fwd_state"] = cls.calls.get("scan_fwd_state", 0) + 1
        return ssd_scan_torch(x, dt, A, B, C, chunk_size, D=D, dt_bias=dt_bias, seq_idx=seq_idx, dt_limit=dt_limit,
                              initial_states=initial_states, return_final_states=True)

    @staticmethod
    def scan_bwd_state(dout, x, dt, A, B, C, out, chunk_size, D, dt_bias, seq_idx, dt_limit, dx, ddt, dB, dC,  # noqa: ANN001, ANN205
                       initial_states, dfinal_states):
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_() for t in (x, dt, A, B, C, D, dt_bias)]
            init = initial_states.detach().requires_grad_() if initial_states is not None else None
            y, final = ssd_scan_torch(*leaves[:5], chunk_size, D=leaves[5], dt_bias=leaves[6], seq_idx=seq_idx,
                                      dt_limit=dt_limit, initial_states=init, return_final_states=True)
            dfinal = dfinal_states if dfinal_states is not None else torch.zeros_like(final)
            grads = torch.autograd.grad((y, final), leaves + ([init] if init is not None else []), (dout, dfinal))
        gx, gdt, gA, gB, gC, gD, gbias = grads[:7]
        dx.copy_(gx), ddt.copy_(gdt), dB.copy_(gB), dC.copy_(gC)
        return dx, ddt, gA, dB, dC, gD, gbias, grads[7] if init is not None else None


@pytest.mark.parametrize("heads,groups", [(4, 1), (8, 2)])  # in_proj width 292 (copied to a stride of 8) and 296
@pytest.mark.parametrize("lengths", [[23], [5, 1, 12, 8, 3]])
def test_fused_conv_scan_matches_unfused_float64(heads: int, groups: int, lengths: list[int]) -> None:
    model = make_model(torch.float64, mamba_n_heads=heads, mamba_d_head=128 // heads, mamba_n_groups=groups,
                       mamba_chunk_size=8)
    mixer = model.model.layers[0].mamba
    t = sum(lengths)
    seq_idx = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None].to(torch.int32)
    zxbcdt = torch.randn(1, t, mixer.in_proj.out_features, dtype=torch.float64, requires_grad=True)
    _, xbc, dt = zxbcdt.split([mixer.intermediate_size, mixer.conv_dim, mixer.num_heads], dim=-1)
    w = torch.randn(1, t, mixer.num_heads, mixer.head_dim, dtype=torch.float64)
    params = [mixer.conv1d.weight, mixer.conv1d.bias, mixer.A_log, mixer.D, mixer.dt_bias]

    TorchOps.calls.clear()
    y = conv_scan(mixer, xbc, dt, seq_idx, ops=TorchOps)
    fused = torch.autograd.grad((y * w).sum(), [zxbcdt, *params])
    assert TorchOps.calls["conv_fwd"] == 2, "the conv output is recomputed in backward, not kept"
    y_ref = unfused_conv_scan(mixer, xbc, dt, seq_idx, "torch")  # what the torch backend runs
    unfused = torch.autograd.grad((y_ref * w).sum(), [zxbcdt, *params])

    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-12)
    for name, a, b in zip(["zxbcdt", "conv.weight", "conv.bias", "A_log", "D", "dt_bias"], fused, unfused):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}")
        assert b.abs().max() > 0, name


def test_fused_conv_scan_keeps_only_the_conv_input() -> None:
    """What autograd holds for backward: the in_proj output slices, the scan output and parameters, no conv output."""
    model = make_model(torch.float64, mamba_n_heads=8, mamba_d_head=16)
    mixer = model.model.layers[0].mamba
    zxbcdt = torch.randn(1, 40, mixer.in_proj.out_features, dtype=torch.float64, requires_grad=True)
    _, xbc, dt = zxbcdt.split([mixer.intermediate_size, mixer.conv_dim, mixer.num_heads], dim=-1)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        conv_scan(mixer, xbc, dt, None, ops=TorchOps)
    big = [s for s in saved if s.numel() >= 40 * mixer.conv_dim]
    assert all(s.untyped_storage().data_ptr() == zxbcdt.untyped_storage().data_ptr() for s in big), \
        [tuple(s.shape) for s in big]


class KeepingTorchOps(TorchOps):
    """`TorchOps` that keep tensors from the scan's forward and check that its backward receives exactly them."""

    kept: list[tuple[torch.Tensor, ...]] = []  # what every forward kept

    @staticmethod
    def can_keep() -> bool:
        return True

    @classmethod
    def scan_fwd_keep(cls, *args):  # noqa: ANN002, ANN206
        cls.calls["scan_fwd_keep"] = cls.calls.get("scan_fwd_keep", 0) + 1
        x = args[0]
        cls.kept.append((x.sum(-1), torch.arange(3.0, dtype=x.dtype)))  # stand-ins for dt, dA cumsum, states, C·B
        return cls.scan_fwd(*args), cls.kept[-1]

    @classmethod
    def scan_bwd_kept(cls, dout, x, dt, A, B, C, kept, *rest):  # noqa: ANN001, ANN002, ANN206
        cls.calls["scan_bwd_kept"] = cls.calls.get("scan_bwd_kept", 0) + 1
        assert any(len(kept) == len(k) and all(a is b or a.data_ptr() == b.data_ptr() for a, b in zip(kept, k))
                   for k in cls.kept), \
            "the backward gets exactly what a forward kept"
        return cls.scan_bwd(dout, x, dt, A, B, C, x, *rest)


@pytest.mark.parametrize("policy,checkpointed,keeps", [
    ("keep", False, True), ("recompute", True, False), ("auto", False, False), ("auto", True, True)])
def test_kept_scan_states_reach_the_backward_and_change_nothing(policy: str, checkpointed: bool, keeps: bool) -> None:
    """`model.scan_states`: what the forward keeps is what the backward gets (saved through autograd), and the
    gradients are those of the recomputing path (float64, 1e-12). auto keeps in checkpointed layers only."""
    from bamba_ft.model.memory import apply_checkpointing
    from bamba_ft.model.mixer import install_mixer

    model = make_model(torch.float64, mamba_n_heads=8, mamba_d_head=16, mamba_chunk_size=8)
    install_mixer(model, "torch", scan_states=policy)
    apply_checkpointing(model, "all" if checkpointed else "none")
    mixer = model.model.layers[0].mamba
    assert mixer.keeps_scan_states() == keeps
    lengths = [5, 1, 12, 8]
    seq_idx = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None].to(torch.int32)
    zxbcdt = torch.randn(1, sum(lengths), mixer.in_proj.out_features, dtype=torch.float64, requires_grad=True)
    _, xbc, dt = zxbcdt.split([mixer.intermediate_size, mixer.conv_dim, mixer.num_heads], dim=-1)
    params = [mixer.conv1d.weight, mixer.conv1d.bias, mixer.A_log, mixer.D, mixer.dt_bias]
    grads = {}
    for ops in (TorchOps, KeepingTorchOps):
        TorchOps.calls.clear()
        KeepingTorchOps.kept.clear()
        y = conv_scan(mixer, xbc, dt, seq_idx, ops=ops)
        w = torch.ones_like(y).cumsum(1)
        grads[ops] = (y, *torch.autograd.grad((y * w).sum(), [zxbcdt, *params]))
    assert TorchOps.calls.get("scan_bwd_kept", 0) == TorchOps.calls.get("scan_fwd_keep", 0) == int(keeps)
    for a, b in zip(grads[KeepingTorchOps], grads[TorchOps]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_a_mixer_may_carry_its_own_kernel_calls() -> None:
    """`mixer.conv_scan_ops` (how tests put torch stand-ins in for the kernels) is used when no ops are given."""
    model = make_model(torch.float64, mamba_n_heads=8, mamba_d_head=16, mamba_chunk_size=8)
    mixer = model.model.layers[0].mamba
    zxbcdt = torch.randn(1, 20, mixer.in_proj.out_features, dtype=torch.float64)
    _, xbc, dt = zxbcdt.split([mixer.intermediate_size, mixer.conv_dim, mixer.num_heads], dim=-1)
    TorchOps.calls.clear()
    mixer.conv_scan_ops = TorchOps
    conv_scan(mixer, xbc, dt, None)
    assert TorchOps.calls["conv_fwd"] == 1


def test_a_misspelt_scan_states_policy_names_the_key() -> None:
    from bamba_ft.config.schema import RunConfig, validate
    from bamba_ft.errors import ConfigError
    from bamba_ft.model.mixer import install_mixer

    message = r"model.scan_states='kept' is not an option\. Did you mean 'keep'\? Valid: auto, keep, recompute"
    with pytest.raises(ConfigError, match=message):
        install_mixer(make_model(torch.float64), "torch", scan_states="kept")
    cfg = RunConfig()
    cfg.model.scan_states = "kept"
    with pytest.raises(ConfigError, match=message):
        validate(cfg)


def _two_layer_grads(mixers, inputs, weights):  # noqa: ANN001, ANN202
    """Forward both layers, then one backward through both: what a model does with shared graph buffers."""
    outs = [conv_scan(m, xbc, dt, seq_idx, ops=TorchOps) for m, (_, xbc, dt, seq_idx) in zip(mixers, inputs)]
    loss = sum((y * w).sum() for y, w in zip(outs, weights))
    leaves = [z for z, *_ in inputs] + [p for m in mixers for p in (m.conv1d.weight, m.conv1d.bias, m.A_log, m.D,
                                                                      m.dt_bias)]
    return outs, torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("rows", [1, 2])
def test_graphed_conv_scan_matches_direct_calls_across_buckets_and_growth(rows: int) -> None:
    """`ConvScanGraphs` bookkeeping on CPU (kernel calls made directly instead of replayed): static buffers
    shared by two layers, padded bucket tails, buffer growth and reuse of a smaller bucket, against the
    direct calls in float64 (tolerance 1e-12 absolute)."""
    from bamba_ft.ops.graphs import ConvScanGraphs

    model = make_model(torch.float64, mamba_n_heads=8, mamba_d_head=16, mamba_chunk_size=8, num_hidden_layers=3,
                       attn_layer_indices=[2])
    mixers = [model.model.layers[i].mamba for i in (0, 1)]
    graphs = ConvScanGraphs(TorchOps, bucket=8, capture=False)
    for lengths in ([9, 14], [3, 30, 7, 1], [13], [20]):  # 23 -> bucket 24; 41 grows the buffers; 13 and 20 reuse
        t = sum(lengths)
        seq_idx = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None].to(torch.int32)
        seq_idx = seq_idx.expand(rows, t).contiguous() if len(lengths) > 1 else None
        inputs = []
        for m in mixers:
            z = torch.randn(rows, t, m.in_proj.out_features, dtype=torch.float64, requires_grad=True)
            _, xbc, dt = z.split([m.intermediate_size, m.conv_dim, m.num_heads], dim=-1)
            inputs.append((z, xbc, dt, seq_idx))
        weights = [torch.randn(rows, t, m.num_heads, m.head_dim, dtype=torch.float64) for m in mixers]

        direct = _two_layer_grads(mixers, inputs, weights)
        for m in mixers:
            m.conv_scan_graphs = graphs
        try:
            graphed = _two_layer_grads(mixers, inputs, weights)
        finally:
            for m in mixers:
                del m.conv_scan_graphs
        for a, b in zip([*direct[0], *direct[1]], [*graphed[0], *graphed[1]]):
            torch.testing.assert_close(b, a, rtol=0, atol=1e-12)
            assert a.abs().max() > 0
    # buckets 24 (fwd, bwd), then 48 after growth: 48, 16, 24 again (the 24 of the old buffers is gone)
    assert graphs.captures == 2 * 4


def test_prepared_buckets_are_not_captured_again_and_match_direct_calls() -> None:
    """`prepare` captures every bucket up to the longest row once (buffers sized for it); later calls of any
    length up to it only replay, with the direct calls' results (float64, 1e-12 absolute)."""
    from bamba_ft.model.mixer import prepare_graphs
    from bamba_ft.ops.graphs import ConvScanGraphs

    model = make_model(torch.float64, mamba_n_heads=8, mamba_d_head=16, mamba_chunk_size=8, num_hidden_layers=3,
                       attn_layer_indices=[2])
    mixers = [model.model.layers[i].mamba for i in (0, 1)]
    graphs = ConvScanGraphs(TorchOps, bucket=8, capture=False)
    for m in mixers:
        m.conv_scan_graphs = graphs
    assert prepare_graphs(model, longest=20, dtype=torch.float64) == 2 * 3  # buckets 24, 16, 8: forward, backward
    for lengths in ([9, 11], [5], [3, 4, 16]):
        t = sum(lengths)
        seq_idx = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None].to(torch.int32)
        inputs = []
        for m in mixers:
            z = torch.randn(1, t, m.in_proj.out_features, dtype=torch.float64, requires_grad=True)
            _, xbc, dt = z.split([m.intermediate_size, m.conv_dim, m.num_heads], dim=-1)
            inputs.append((z, xbc, dt, seq_idx))
        weights = [torch.randn(1, t, m.num_heads, m.head_dim, dtype=torch.float64) for m in mixers]
        graphed = _two_layer_grads(mixers, inputs, weights)
        for m in mixers:
            del m.conv_scan_graphs
        direct = _two_layer_grads(mixers, inputs, weights)
        for m in mixers:
            m.conv_scan_graphs = graphs
        for a, b in zip([*direct[0], *direct[1]], [*graphed[0], *graphed[1]]):
            torch.testing.assert_close(b, a, rtol=0, atol=1e-12)
            assert a.abs().max() > 0
    assert graphs.captures == 2 * 3


def test_cuda_graphs_refused_without_the_fused_kernels() -> None:
    from bamba_ft.errors import ModelError
    from bamba_ft.model.mixer import install_mixer

    model = make_model(torch.float32)
    with pytest.raises(ModelError, match="model.cuda_graphs=false"):
        install_mixer(model, "auto", cuda_graphs=True)
