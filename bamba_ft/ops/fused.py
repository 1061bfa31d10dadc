"""Fused elementwise parts of Bamba's decoder layer on CUDA: the MLP's SwiGLU and the RMSNorms.

transformers computes both as chains of PyTorch ops, each a full pass over memory, and autograd keeps their
intermediates: SwiGLU keeps `silu(gate)` (tokens x intermediate_size, the largest activation of the MLP) and
RMSNorm keeps float32 copies of its input. Here:
- SwiGLU is one autograd function that keeps only `gate` and `up` (which autograd kept anyway) and computes
  forward and backward as one kernel each (torch.compile of the pointwise math, float32 inside);
- RMSNorm runs mamba-ssm's Triton norm kernel (one pass forward, one backward), when mamba-ssm is installed.
On the CPU (and wherever a piece is missing) transformers' own forward runs.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from transformers.models.bamba.modeling_bamba import BambaMLP, BambaRMSNorm

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


@functools.cache
def _compiled() -> tuple | None:
    """The two functions compiled into one kernel each (dynamic shapes: packed lengths vary every step)."""
    try:
        return (torch.compile(swiglu_forward, dynamic=True, fullgraph=True),
                torch.compile(swiglu_backward, dynamic=True, fullgraph=True))
    except Exception as e:  # noqa: BLE001
        log.warning("torch.compile is unavailable (%s); SwiGLU runs eagerly.", e)
        return None


_compile_failed: list[bool] = []


def _run(index: int, *args: torch.Tensor):  # noqa: ANN202
    eager = (swiglu_forward, swiglu_backward)[index]
    compiled = _compiled() if args[0].is_cuda and not _compile_failed else None
    if compiled is None:
        return eager(*args)
    try:
        return compiled[index](*args)
    except Exception as e:  # noqa: BLE001  (e.g. no working Triton/C compiler on this machine)
        _compile_failed.append(True)
        log.warning("compiled SwiGLU failed (%s: %s); running it eagerly from now on.", type(e).__name__, e)
        return eager(*args)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        ctx.save_for_backward(gate, up)
        return _run(0, gate, up)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
        gate, up = ctx.saved_tensors
        return _run(1, gate, up, grad.contiguous())


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up whose backward keeps only `gate` and `up`."""
    return _SwiGLU.apply(gate, up)


class FusedBambaMLP(BambaMLP):
    """transformers' BambaMLP; on CUDA with a SiLU activation, the fused SwiGLU (same math, float32 inside)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_cuda or self.config.hidden_act not in ("silu", "swish"):
            return super().forward(x)
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


class FusedRMSNorm(BambaRMSNorm):
    """transformers' BambaRMSNorm; on CUDA with mamba-ssm, its one-pass Triton kernel (float32 inside)."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        from bamba_ft.ops.mamba2 import _mamba_ssm

        kernel = _mamba_ssm().get("rmsnorm") if hidden_states.is_cuda else None
        if kernel is None:
            return super().forward(hidden_states)
        return kernel(hidden_states, self.weight, None, z=None, eps=self.variance_epsilon, group_size=None,
                      norm_before_gate=False)
