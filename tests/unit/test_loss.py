"""The chunked next-token loss: the frozen-head path (gradient computed in forward) against plain autograd."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bamba_ft.ops import loss as L


def reference(hidden: torch.Tensor, targets: torch.Tensor, head: nn.Module) -> torch.Tensor:
    return F.cross_entropy(head(hidden).to(torch.promote_types(hidden.dtype, torch.float32)), targets, reduction="sum")


@pytest.mark.parametrize("n,chunk", [(23, 4096), (23, 5), (40, 8), (1, 3)])  # one chunk, ragged and exact splits
def test_frozen_head_loss_and_gradient_float64(n: int, chunk: int) -> None:
    torch.manual_seed(0)
    head = nn.Linear(16, 50, bias=False, dtype=torch.float64).requires_grad_(False)
    assert L._frozen_linear(head)
    hidden = torch.randn(n, 16, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (n,))
    got = L.head_loss_sum(hidden, targets, head, chunk=chunk)
    (g_got,) = torch.autograd.grad(got * 0.37, hidden)  # a scale, as the mean over target tokens applies
    want = reference(hidden, targets, head)
    (g_want,) = torch.autograd.grad(want * 0.37, hidden)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    torch.testing.assert_close(g_got, g_want, rtol=1e-10, atol=1e-14)


def test_frozen_head_loss_bfloat16_close_to_float32() -> None:
    torch.manual_seed(0)
    head = nn.Linear(64, 1000, bias=False).requires_grad_(False)
    hidden = torch.randn(37, 64, requires_grad=True)
    targets = torch.randint(0, 1000, (37,))
    ref = reference(hidden, targets, head)
    (g_ref,) = torch.autograd.grad(ref, hidden)
    h16 = hidden.detach().bfloat16().requires_grad_()
    got = L.head_loss_sum(h16, targets, head.bfloat16(), chunk=16)
    (g16,) = torch.autograd.grad(got, h16)
    assert abs(got.item() - ref.item()) / ref.item() < 1e-2
    assert float((g16.float() - g_ref).norm() / g_ref.norm()) < 2e-2


def test_trainable_or_wrapped_heads_use_autograd() -> None:
    """A head whose weight trains (full fine-tuning, modules_to_save) or has a bias keeps the autograd path,
    and its weight gets its gradient."""
    torch.manual_seed(0)
    trainable = nn.Linear(8, 20, bias=False, dtype=torch.float64)
    biased = nn.Linear(8, 20, dtype=torch.float64).requires_grad_(False)
    assert not L._frozen_linear(trainable) and not L._frozen_linear(biased)
    hidden = torch.randn(9, 8, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 20, (9,))
    for head in (trainable, biased):
        got = L.head_loss_sum(hidden, targets, head, chunk=4)
        torch.testing.assert_close(got, reference(hidden, targets, head), rtol=1e-12, atol=0)
    L.head_loss_sum(hidden, targets, trainable).backward()
    assert trainable.weight.grad is not None and trainable.weight.grad.abs().max() > 0


def test_no_gradient_kept_without_grad() -> None:
    head = nn.Linear(8, 20, bias=False).requires_grad_(False)
    hidden = torch.randn(5, 8)
    with torch.no_grad():
        out = L.head_loss_sum(hidden, torch.randint(0, 20, (5,)), head)
    assert out.grad_fn is None and torch.isfinite(out)


def test_one_compiled_loss_graph_per_dtype_and_gradient_serves_every_scale() -> None:
    """The form CUDA compiles branched on `scale != 1.0`, so each dtype compiled four graphs (scaled or not, with
    and without the gradient): two dtypes' eight reached dynamo's recompile limit, and a third dtype made the loss
    run eagerly for the rest of the process. Traced here on CPU as Compiled traces it (dynamic shapes, one
    graph); dynamo's graph count does not depend on the backend."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    graphs = CompileCounter()
    compiled = torch.compile(L._softmax_cross_entropy.traced, dynamic=True, fullgraph=True, backend=graphs)
    g = torch.Generator().manual_seed(3)
    dtypes = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
    for dtype in dtypes:
        for rows in (7, 29):
            logits = (torch.randn(rows, 101, generator=g) * 4).to(dtype)
            targets = torch.randint(0, 101, (rows,), generator=g)
            for scale in (1.0, 0.25, 0.5, 2.0):
                for with_grad in (True, False):
                    loss, grad = compiled(logits, targets, scale, with_grad)
                    want, want_grad = L.softmax_cross_entropy(logits.clone(), targets, scale, with_grad)
                    torch.testing.assert_close(loss, want, rtol=1e-5, atol=0)
                    if with_grad:  # the gradient rounded once to the logits' dtype: a unit of its last place
                        torch.testing.assert_close(grad, want_grad, rtol=0, atol=2 * torch.finfo(dtype).eps)
    assert graphs.frame_count == 2 * len(dtypes)  # within the limit of 8 with every dtype and four scales
    torch._dynamo.reset()


@pytest.mark.parametrize("scale", [1.0, 0.25])
def test_pointwise_form_compiled_on_cuda_equals_the_eager_form_float64(scale: float) -> None:
    """CUDA compiles a scatter-free form of the chunk's softmax cross-entropy (it fuses into two passes); it must
    equal the in-place eager form that runs elsewhere and on fallback."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(29, 1003, generator=g, dtype=torch.float64) * 5
    targets = torch.randint(0, 1003, (29,), generator=g)
    eager = L.softmax_cross_entropy(logits.clone(), targets, scale, True)  # consumes its logits
    pointwise = L.softmax_cross_entropy_pointwise(logits, targets, scale, True)
    torch.testing.assert_close(pointwise[0], eager[0], rtol=1e-14, atol=0)
    torch.testing.assert_close(pointwise[1], eager[1], rtol=0, atol=1e-15)
    assert L.softmax_cross_entropy_pointwise(logits, targets, scale, False)[1] is None
    torch.testing.assert_close(L.softmax_cross_entropy(logits.clone(), targets, scale, False)[0], eager[0],
                               rtol=0, atol=0)
