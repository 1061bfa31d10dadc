"""Fused elementwise parts of Bamba's decoder layer on CUDA: the MLP's SwiGLU and the RMSNorms.

transformers computes both as chains of PyTorch ops, each a full pass over memory, and autograd keeps their
intermediates: SwiGLU keeps `silu(gate)` (tokens x intermediate_size, the largest activation of the MLP) and
RMSNorm keeps float32 copies of its input. Here:
- SwiGLU is one autograd function that keeps only `gate` and `up` (which autograd kept anyway) and computes
  forward and backward as one kernel each (torch.compile of the pointwise math, float32 inside);
- RMSNorm runs torch's fused RMSNorm (one kernel forward, one backward, issued natively); where input and
  weight dtypes differ, mamba-ssm's Triton norm kernel, when mamba-ssm is installed.
On the CPU (and wherever a piece is missing) transformers' own forward runs.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from transformers.models.bamba.modeling_bamba import BambaMLP, BambaRMSNorm

from bamba_ft.ops.kernels import mamba_ssm_kernels
from bamba_ft.ops.longseq import by_rows

log = logging.getLogger(__name__)


def swiglu_forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, computed in float32 (float64 stays float64) and rounded once."""
    acc = torch.promote_types(gate.dtype, torch.float32)
    return (F.silu(gate.to(acc)) * up.to(acc)).to(gate.dtype)


def swiglu_backward(gate: torch.Tensor, up: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of `swiglu_forward` w.r.t. gate and up: d silu(g)/dg = s (1 + g (1 - s)), s = sigmoid(g)."""
    acc = torch.promote_types(gate.dtype, torch.float32)
    g, d = gate.to(acc), grad.to(acc)
    s = torch.sigmoid(g)
    return (d * up.to(acc) * s * (1 + g * (1 - s))).to(gate.dtype), (d * g * s).to(up.dtype)


class Compiled:
    """`fn` through torch.compile on CUDA (dynamic shapes: packed lengths vary every step), or through `kernel`, a
    hand-written CUDA kernel of the same math, when one is given; eager elsewhere. `traced`: a form of the same
    math to compile instead of `fn`, where the form that fuses best is not the one that runs best eagerly.

    Compilation happens on the first CUDA call. If it or the kernel fails (no working Triton or C compiler on this
    machine), one warning is logged and `fn` runs eagerly from then on: same math, more kernels. Running out of
    device memory is not such a failure: it propagates as it would from `fn` (whose eager form needs more memory),
    and the next call compiles or runs the kernel again.
    """

    def __init__(self, fn, what: str, kernel=None, traced=None) -> None:  # noqa: ANN001
        self.fn, self.what, self.kernel, self.traced = fn, what, kernel, traced
        self._compiled = None
        self.failed = False

    def __call__(self, *args):  # noqa: ANN002, ANN204
        if self.failed or not args[0].is_cuda:
            return self.fn(*args)
        try:
            if self._compiled is None:
                self._compiled = self.kernel or torch.compile(self.traced or self.fn, dynamic=True, fullgraph=True)
            return self._compiled(*args)
        except torch.OutOfMemoryError:
            raise  # this call's size, not the compiler: a caller that recovers (a smaller batch) keeps the kernel
        except Exception as e:  # noqa: BLE001
            self.failed = True
            log.warning("compiled %s failed (%s: %s); running it eagerly from now on.", self.what, type(e).__name__, e)
            return self.fn(*args)


_swiglu = (Compiled(swiglu_forward, "SwiGLU"), Compiled(swiglu_backward, "SwiGLU backward"))


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        ctx.save_for_backward(gate, up)
        return _swiglu[0](gate, up)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
        gate, up = ctx.saved_tensors
        return _swiglu[1](gate, up, grad.contiguous())


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up whose backward keeps only `gate` and `up`."""
    return _SwiGLU.apply(gate, up)


class FusedBambaMLP(BambaMLP):
    """transformers' BambaMLP; on CUDA with a SiLU activation, the fused SwiGLU (same math, float32 inside)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_cuda or self.config.hidden_act not in ("silu", "swish"):
            return super().forward(x)
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


class RMSNormKernel:
    """Mixin for transformers' RMSNorms computing `weight * normalised(x in float32).to(x.dtype)`: on CUDA, one
    kernel each way (float32 inside, rounded once).

    Where input and weight share a dtype (as in training), torch's fused RMSNorm: a native op, which the host
    issues in a fraction of the time mamba-ssm's Triton kernel takes through Python and Triton's launcher (a
    step issues two per decoder layer in each direction), and whose backward skips the frozen weight's
    gradient. Otherwise mamba-ssm's kernel.
    """

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if not hidden_states.is_cuda:
            return super().forward(hidden_states)
        if hidden_states.dtype == self.weight.dtype:
            def norm(x: torch.Tensor) -> torch.Tensor:
                return F.rms_norm(x, self.weight.shape, self.weight, self.variance_epsilon)
        elif (kernel := mamba_ssm_kernels().get("rmsnorm")) is not None:
            def norm(x: torch.Tensor) -> torch.Tensor:
                return kernel(x, self.weight, None, z=None, eps=self.variance_epsilon, group_size=None,
                              norm_before_gate=False)
        else:
            return super().forward(hidden_states)
        return by_rows(norm, hidden_states)  # very long rows in ranges (the Triton kernel has 32-bit offsets)


class FusedRMSNorm(RMSNormKernel, BambaRMSNorm):
    """Bamba's RMSNorm with the one-pass kernel."""
