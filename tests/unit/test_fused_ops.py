"""The fused SwiGLU's math and what it keeps for backward; which classes bamba_ft puts on a model and takes back."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.models.bamba.modeling_bamba import BambaMixer, BambaMLP, BambaRMSNorm, BambaRMSNormGated

from bamba_ft.model.mixer import install_mixer, stock_forward
from bamba_ft.ops.fused import FusedBambaMLP, FusedRMSNorm, swiglu
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
