"""The fused SwiGLU's and gated RMSNorm's math and what they keep for backward; which classes bamba_ft puts on a model and takes back."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers.models.bamba.modeling_bamba import BambaMixer, BambaMLP, BambaRMSNorm, BambaRMSNormGated

from bamba_ft.model.mixer import install_mixer, stock_forward
from bamba_ft.ops.fused import FusedBambaMLP, FusedRMSNorm, gated_rmsnorm, swiglu
from bamba_ft.ops.mamba2 import _gated_rmsnorm
from tests.conftest import make_model


def test_swiglu_matches_autograd_float64() -> None:
    gate = torch.randn(3, 7, 33, dtype=torch.float64, requires_grad=True)
    up = torch.randn(3, 7, 33, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 7, 33, dtype=torch.float64)
    ours = swiglu(gate, up)
    g_ours = torch.autograd.grad((ours * w).sum(), (gate, up))
    ref = F.silu(gate) * up
    g_ref = torch.autograd.grad((ref * w).sum(), (gate, up))
    torch.testing.assert_close(ours, ref, rtol=1e-14, atol=1e-14)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_swiglu_keeps_only_its_inputs() -> None:
    gate = torch.randn(64, 32, requires_grad=True)
    up = torch.randn(64, 32, requires_grad=True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        swiglu(gate, up)
    assert len(saved) == 2 and saved[0] is gate and saved[1] is up


@pytest.mark.parametrize("groups", [1, 3])
def test_gated_rmsnorm_matches_transformers_math_float64(groups: int) -> None:
    """The hand-written backward (run eagerly here; compiled on CUDA) against autograd of transformers' math."""
    norm = BambaRMSNormGated(24, group_size=24 // groups, eps=1e-5).double()
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.3)
    x = torch.randn(2, 9, 24, dtype=torch.float64, requires_grad=True)
    zx = torch.randn(2, 9, 40, dtype=torch.float64, requires_grad=True)
    z = zx[..., 8:32]  # a strided slice, as the gate is of in_proj's output
    w = torch.randn(2, 9, 24, dtype=torch.float64)
    ours = gated_rmsnorm(x, z, norm.weight, norm.variance_epsilon, norm.group_size)
    g_ours = torch.autograd.grad((ours * w).sum(), (x, zx, norm.weight))
    ref = _gated_rmsnorm(norm, x, z)
    g_ref = torch.autograd.grad((ref * w).sum(), (x, zx, norm.weight))
    torch.testing.assert_close(ours, ref, rtol=1e-13, atol=1e-13)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12)


def test_gated_rmsnorm_keeps_only_its_inputs_and_skips_a_frozen_weight() -> None:
    x, z = torch.randn(16, 8, requires_grad=True), torch.randn(16, 8, requires_grad=True)
    weight = torch.ones(8)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = gated_rmsnorm(x, z, weight, 1e-6, 8)
    assert [t is u for t, u in zip(saved, (x, z, weight))] == [True] * 3 and len(saved) == 3
    y.sum().backward()
    assert weight.grad is None and x.grad is not None and z.grad is not None


def test_install_and_stock_forward_swap_classes() -> None:
    model = make_model(torch.float64)
    ids = torch.randint(3, 256, (1, 19))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    install_mixer(model, "torch")
    kinds = {type(m) for m in model.modules()}
    assert {FusedBambaMLP, FusedRMSNorm} <= kinds and not {BambaMLP, BambaRMSNorm, BambaRMSNormGated} & kinds
    with stock_forward(model), torch.no_grad():
        assert {BambaMixer, BambaMLP, BambaRMSNorm, BambaRMSNormGated} <= {type(m) for m in model.modules()}
        torch.testing.assert_close(model(input_ids=ids).logits, ref, rtol=0, atol=0)
    assert {FusedBambaMLP, FusedRMSNorm} <= {type(m) for m in model.modules()}
