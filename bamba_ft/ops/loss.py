"""Next-token loss that never materialises the full (tokens x vocab) logits.

Only positions with a target go through the LM head, in chunks: Bamba's 128k vocabulary makes logits the
largest activation (5k tokens x 128k x 4 bytes = 2.6 GB in float32), and prompt tokens (no loss in SFT) need
no logits at all. With a frozen LM head (LoRA, QLoRA) each chunk's gradient with respect to its hidden states
is computed in the forward pass, while its logits exist anyway, and kept (tokens x hidden, small): backward
then needs no logits, so they are neither stored nor recomputed. A trainable head goes through autograd,
its large chunks recomputed in backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from bamba_ft.ops.fused import Compiled


def _acc(dtype: torch.dtype) -> torch.dtype:
    """Loss arithmetic: float32, or float64 for float64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def _chunk_loss(hidden: torch.Tensor, targets: torch.Tensor, head: nn.Module, scale: float = 1.0) -> torch.Tensor:
    logits = head(hidden).to(_acc(hidden.dtype))
    return F.cross_entropy(logits * scale if scale != 1.0 else logits, targets, reduction="sum")


RECOMPUTE_BYTES = 256 * 2**20  # float32 logits of a chunk above this are recomputed in backward, not stored


def _lse_and_loss(x: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-sum-exp of each row of the scaled logits `x`, the summed cross-entropy against `targets`)."""
    lse = torch.logsumexp(x, dim=-1)
    return lse, (lse - x.gather(1, targets[:, None])[:, 0]).sum()


def softmax_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, scale: float,
                          with_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(summed cross-entropy of `scale * logits` against `targets`, its gradient with respect to `logits` or None),
    in float32 (float64 stays float64); the gradient is rounded once to the logits' dtype. Eager form, in place:
    it consumes `logits` (overwritten when they already are float32 or float64; otherwise one float32 copy)."""
    x = logits.to(_acc(logits.dtype))  # the logits' own buffer if float32 or float64 already, else a copy
    if scale != 1.0:
        x = x.mul_(scale)
    lse, total = _lse_and_loss(x, targets)
    if not with_grad:
        return total, None
    grad = x.sub_(lse[:, None]).exp_()  # softmax
    grad.scatter_add_(1, targets[:, None], grad.new_full((targets.shape[0], 1), -1.0))
    if scale != 1.0:
        grad.mul_(scale)
    return total, grad.to(logits.dtype)


def softmax_cross_entropy_pointwise(logits: torch.Tensor, targets: torch.Tensor, scale: float,
                                    with_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The same as `softmax_cross_entropy`, written as reductions and pointwise math only (the one-hot as a
    comparison, not a scatter), which torch.compile fuses into a log-sum-exp pass and one pass writing the
    gradient: the low-precision logits are read twice and no float32 copy of them is made.

    A test of `scale != 1.0` here would make dynamo compile a graph for each side of it: two dtypes' scaled and
    unscaled calls, with and without the gradient, reach its recompile limit (8), and the loss then runs eagerly.
    So it multiplies by `scale` whatever it is (by 1.0 exactly), and one graph per dtype and `with_grad` serves
    every scale (a float argument is not specialised under dynamic=True)."""
    x = logits.to(_acc(logits.dtype)) * scale
    lse, total = _lse_and_loss(x, targets)
    if not with_grad:
        return total, None
    onehot = torch.arange(x.shape[1], device=x.device)[None, :] == targets[:, None]
    grad = torch.exp(x - lse[:, None]) - onehot.to(x.dtype)
    return total, (grad * scale).to(logits.dtype)


# On CUDA the pointwise form compiled; elsewhere, or if compiling fails, the eager form.
_softmax_cross_entropy = Compiled(softmax_cross_entropy, "softmax cross-entropy", traced=softmax_cross_entropy_pointwise)


class _FrozenHeadLoss(torch.autograd.Function):
    """Summed cross-entropy of `scale * hidden @ weight.T` (frozen weight) against `targets`; forward also
    computes the gradient with respect to `hidden`: scale * (softmax - onehot) @ weight, in float32 (float64
    stays float64) up to the matmul."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,  # noqa: ANN001
                scale: float) -> torch.Tensor:
        total = torch.zeros((), dtype=_acc(hidden.dtype), device=hidden.device)
        grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        for s in range(0, hidden.shape[0], chunk):
            h, t = hidden[s : s + chunk], targets[s : s + chunk]
            loss, grad_logits = _softmax_cross_entropy(F.linear(h, weight), t, scale, grad is not None)
            total = total + loss
            if grad is not None:
                grad[s : s + chunk] = grad_logits @ weight
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, g: torch.Tensor):  # noqa: ANN001, ANN205
        (grad,) = ctx.saved_tensors
        return (grad.to(_acc(grad.dtype)) * g).to(grad.dtype), None, None, None, None


def _frozen_linear(head: nn.Module) -> bool:
    """A plain Linear without bias whose weight is an ordinary frozen tensor (not quantized, not wrapped)."""
    return (type(head) is nn.Linear and head.bias is None and not head.weight.requires_grad
            and type(head.weight.data) is torch.Tensor)


def head_loss_sum(hidden: torch.Tensor, targets: torch.Tensor, head: nn.Module, chunk: int = 4096,
                  scale: float = 1.0) -> torch.Tensor:
    """Sum of cross-entropy of `head(hidden) * scale` (rows (n, d)) against targets (n,), chunked (see the
    module docstring)."""
    if _frozen_linear(head):
        return _FrozenHeadLoss.apply(hidden, head.weight, targets, chunk, scale)
    total = hidden.new_zeros((), dtype=_acc(hidden.dtype))
    vocab = head.weight.shape[0] if hasattr(head, "weight") else head.out_features
    for s in range(0, hidden.shape[0], chunk):
        h, t = hidden[s : s + chunk], targets[s : s + chunk]
        if torch.is_grad_enabled() and h.requires_grad and h.shape[0] * vocab * 4 > RECOMPUTE_BYTES:
            total = total + checkpoint(_chunk_loss, h, t, head, scale, use_reentrant=False)
        else:
            total = total + _chunk_loss(h, t, head, scale)
    return total


def causal_lm(model: nn.Module) -> nn.Module:
    """The ForCausalLM inside a peft wrapper, or the model itself."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model
