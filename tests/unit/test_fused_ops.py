"""The fused SwiGLU's math and what it keeps for backward; which classes bamba_ft puts on a model and takes back."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers.models.bamba.modeling_bamba import BambaMixer, BambaMLP, BambaRMSNorm, BambaRMSNormGated

from bamba_ft.model.mixer import install_mixer, stock_forward
from bamba_ft.ops.fused import Compiled, FusedBambaMLP, FusedRMSNorm, swiglu
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


class _OnCuda:
    """Stands in for a CUDA tensor where only `is_cuda` is read."""

    is_cuda = True


def test_a_compiled_op_that_runs_out_of_memory_keeps_its_kernel() -> None:
    """An out-of-memory error in the compiled form is the call's size, not a compiler failure: it propagates, and the
    next call runs the kernel again instead of the eager form (which needs more memory) for the rest of the process;
    a kernel that fails otherwise still falls back to the eager form."""
    calls = []

    def kernel(x: object) -> str:
        calls.append(x)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 228.00 MiB")
        return "kernel"

    op = Compiled(lambda x: "eager", "test op", kernel=kernel)
    with pytest.raises(torch.OutOfMemoryError):
        op(_OnCuda())
    assert not op.failed and op(_OnCuda()) == "kernel"

    broken = Compiled(lambda x: "eager", "test op", kernel=lambda x: 1 / 0)
    assert broken(_OnCuda()) == "eager" and broken.failed
