"""Segment-aware Mamba-2 mixer forward for transformers' Mamba-2 mixers (`BambaMixer` and its relatives).

A packed row holds several sequences; `seq_idx` (batch, tokens) numbers them. Two things must not cross a
boundary: the width-4 causal conv, and the SSD state. transformers' torch path lets both leak and its fused
CUDA path takes `out_proj.weight` as a raw tensor (so LoRA on out_proj gets no gradient and quantized
weights break in backward). This forward calls `in_proj`, `norm` and `out_proj` as modules and keeps
sequences apart on every backend:

- kernels: causal-conv1d and mamba-ssm's Triton SSD scan, both with `seq_idx` (CUDA); without causal-conv1d
  the conv runs in torch;
- torch: an exact vectorised chunked SSD scan with segment masks, and a conv over a gapped layout.

Kernel loading and backend selection live in bamba_ft.ops.kernels, the torch reference in bamba_ft.ops.scan_ref.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from transformers.models.bamba.modeling_bamba import BambaMixer, BambaRMSNormGated

from bamba_ft.config.schema import Mixer, ScanStates
from bamba_ft.errors import pick
from bamba_ft.ops import longseq
from bamba_ft.ops.kernels import (
    DirectConvScan,
    KernelOps,
    available_backend,
    causal_conv1d_kernel,
    mamba_ssm_kernels,
    report_backend,
    split_xbc,
)
from bamba_ft.ops.scan_ref import segment_conv1d, ssd_scan_torch

# ----------------------------------------------------------------------------------------------------------
# Segment ids


def seq_idx_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """(batch, tokens) int32 sequence numbers: a new sequence starts wherever the position does not advance by 1."""
    step = torch.diff(position_ids, dim=-1, prepend=position_ids[:, :1] - 1)
    return (step != 1).cumsum(-1, dtype=torch.int32)


def seq_idx_from_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """(1, total) int32 sequence numbers from cumulative lengths [0, l0, l0+l1, ...]."""
    lengths = torch.diff(cu_seqlens.long())
    ids = torch.arange(lengths.numel(), device=cu_seqlens.device, dtype=torch.int32)
    return torch.repeat_interleave(ids, lengths, output_size=total)[None]


def seq_idx_from_attention_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Padded rows as segments: padding runs and real tokens get different numbers, so neither sees the other."""
    change = torch.diff(attention_mask.long(), dim=-1, prepend=attention_mask[:, :1].long())
    return (change != 0).cumsum(-1, dtype=torch.int32)


# ----------------------------------------------------------------------------------------------------------
# The mixer


def _conv_torch(mixer: BambaMixer, xbc: torch.Tensor, seq_idx: torch.Tensor | None) -> torch.Tensor:
    return mixer.act(segment_conv1d(xbc, mixer.conv1d.weight.squeeze(1), mixer.conv1d.bias, seq_idx))


def _conv_kernels(mixer: BambaMixer, xbc: torch.Tensor, seq_idx: torch.Tensor | None) -> torch.Tensor:
    """causal-conv1d where it applies, else the torch conv."""
    conv_fn = causal_conv1d_kernel()
    # causal-conv1d takes seq_idx only in channel-last layout, with channels a multiple of 8.
    if conv_fn is None or mixer.activation not in ("silu", "swish") or xbc.shape[-1] % 8:
        return _conv_torch(mixer, xbc, seq_idx)
    x = xbc.contiguous()  # dense (b, t, c): its transpose is channel-last, and the output keeps that layout
    weight = mixer.conv1d.weight.squeeze(1)
    return conv_fn(x.transpose(1, 2), weight, mixer.conv1d.bias, seq_idx=seq_idx, activation="silu").transpose(1, 2)


def _scan_kwargs(mixer: BambaMixer, seq_idx: torch.Tensor | None) -> dict:
    return dict(D=mixer.D, dt_bias=mixer.dt_bias, seq_idx=seq_idx, dt_limit=tuple(mixer.time_step_limit))


def _scan_torch(mixer: BambaMixer, x, dt, A, B, C, seq_idx) -> torch.Tensor:  # noqa: ANN001
    return ssd_scan_torch(x, dt, A, B, C, mixer.chunk_size, **_scan_kwargs(mixer, seq_idx))


def _scan_kernels(mixer: BambaMixer, x, dt, A, B, C, seq_idx) -> torch.Tensor:  # noqa: ANN001
    """mamba-ssm's scan; rows too long for its 32-bit offsets in pieces (bamba_ft.ops.longseq)."""
    kwargs = _scan_kwargs(mixer, seq_idx)
    scan = functools.partial(mamba_ssm_kernels()["scan"], A=A, chunk_size=mixer.chunk_size, z=None, dt_softplus=True)
    if not longseq.needs_pieces(x.shape[0], x.shape[1], longseq.scan_cost(x, dt, B, C, mixer.chunk_size)):
        return scan(x, dt, B=B, C=C, **kwargs)
    del kwargs["seq_idx"]

    def piece(x, dt, B, C, seq_idx, initial_states):  # noqa: ANN001, ANN202
        return scan(x, dt, B=B, C=C, seq_idx=seq_idx, initial_states=initial_states, return_final_states=True,
                    **kwargs)

    return longseq.piecewise_scan(piece, x, dt, B, C, seq_idx, mixer.chunk_size)


# The conv and the scan of each resolved backend, when they run as two autograd steps.
_STEPS: dict[Mixer, tuple[Callable, Callable]] = {
    Mixer.KERNELS: (_conv_kernels, _scan_kernels),
    Mixer.TORCH: (_conv_torch, _scan_torch),
}


class _ConvScan(torch.autograd.Function):
    """conv (+SiLU) then SSD scan, keeping only the conv's *input* for backward and recomputing its output there.

    The conv input is a slice of the in_proj output, which stays alive anyway (the gate and dt are slices of
    it too), so this saves two (tokens x conv channels) activations per layer, as mamba-ssm's own fused
    conv+scan does, while in_proj, norm and out_proj stay ordinary modules.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, xbc, dt, weight, bias, A, D, dt_bias, seq_idx, runner, shape, chunk_size, dt_limit):  # noqa: ANN001, ANN205
        out, kept = runner.forward(xbc, dt, weight, bias, A, D, dt_bias, seq_idx, shape, chunk_size, dt_limit)
        ctx.save_for_backward(xbc, dt, weight, bias, A, D, dt_bias, seq_idx, *kept)
        ctx.runner, ctx.shape, ctx.chunk_size, ctx.dt_limit = runner, shape, chunk_size, dt_limit
        return out

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, dout):  # noqa: ANN001, ANN205
        xbc, dt, weight, bias, A, D, dt_bias, seq_idx, *kept = ctx.saved_tensors
        grads = ctx.runner.backward(dout, xbc, dt, weight, bias, A, D, dt_bias, seq_idx, ctx.shape,
                                    ctx.chunk_size, ctx.dt_limit, kept=tuple(kept))
        return (*grads, None, None, None, None, None)


def _keeps_states(mixer: BambaMixer) -> bool:
    return isinstance(mixer, SegmentAwareMixer) and mixer.keeps_scan_states()


def fused_conv_scan_ok(mixer: BambaMixer, ops: type = KernelOps) -> bool:
    """Whether the fused conv+scan applies: SiLU conv over channels in multiples of 8, and both kernels present."""
    return mixer.activation in ("silu", "swish") and mixer.conv_dim % 8 == 0 and ops.available()


def _ssm_shape(mixer: BambaMixer) -> tuple[int, int, int, int]:
    return mixer.num_heads, mixer.head_dim, mixer.n_groups, mixer.ssm_state_size


def conv_scan_params(mixer: BambaMixer) -> tuple[tuple, tuple]:
    """What the conv+scan kernels take from `mixer`: its parameters (conv weight (conv_dim, width), conv bias, A,
    D, dt_bias) and its fixed arguments ((heads, head_dim, groups, state), chunk_size, dt_limit)."""
    A = -torch.exp(mixer.A_log.float())
    return ((mixer.conv1d.weight.squeeze(1), mixer.conv1d.bias, A, mixer.D, mixer.dt_bias),
            (_ssm_shape(mixer), mixer.chunk_size, tuple(mixer.time_step_limit)))


def conv_scan(mixer: BambaMixer, xbc: torch.Tensor, dt: torch.Tensor, seq_idx: torch.Tensor | None,
              ops: type | None = None) -> torch.Tensor:
    """y = scan(silu(conv(xbc))) for (b, t, conv_dim) `xbc`, (b, t, heads) `dt`; returns (b, t, heads, head_dim).

    The kernels run through `mixer.conv_scan_graphs` (CUDA graphs, with their own ops) when it is set. Rows too
    long for the kernels' 32-bit offsets run in pieces (bamba_ft.ops.longseq), with direct kernel calls. `ops`
    (default: `mixer.conv_scan_ops` where set, else `KernelOps`) makes the kernel calls.
    """
    ops = ops or mixer.__dict__.get("conv_scan_ops") or KernelOps
    params, rest = conv_scan_params(mixer)
    args = (xbc, dt, *params, seq_idx)
    if longseq.needs_pieces(xbc.shape[0], xbc.shape[1], longseq.token_cost(xbc, dt, rest[0], rest[1])):
        return longseq.piecewise_conv_scan(*args, ops, *rest)
    runner = mixer.__dict__.get("conv_scan_graphs") or DirectConvScan(ops, keep=_keeps_states(mixer))
    return _ConvScan.apply(*args, runner, *rest)


def unfused_conv_scan(mixer: BambaMixer, xbc: torch.Tensor, dt: torch.Tensor, seq_idx: torch.Tensor | None,
                      backend: str) -> torch.Tensor:
    """The same as `conv_scan` in two autograd steps (autograd keeps the conv output), on backend kernels or torch."""
    conv, scan = pick(_STEPS, backend, "backend", where="unfused_conv_scan")
    x, B, C = split_xbc(conv(mixer, xbc, seq_idx), _ssm_shape(mixer))
    return scan(mixer, x, dt, -torch.exp(mixer.A_log.float()), B, C, seq_idx)


def fused_conv_scan_runs(mixer: BambaMixer, backend: str) -> bool:
    """Whether `mixer_forward` on resolved `backend` takes the fused conv+scan (`conv_scan`): kernels with
    causal-conv1d, where `fused_conv_scan_ok`."""
    return backend == Mixer.KERNELS and causal_conv1d_kernel() is not None and fused_conv_scan_ok(mixer)


def _conv_scan_kernels(mixer: BambaMixer, xbc: torch.Tensor, dt: torch.Tensor,
                       seq_idx: torch.Tensor | None) -> torch.Tensor:
    if fused_conv_scan_runs(mixer, Mixer.KERNELS):
        return conv_scan(mixer, xbc, dt, seq_idx)
    return unfused_conv_scan(mixer, xbc, dt, seq_idx, Mixer.KERNELS)


# The conv+scan of each resolved backend.
_CONV_SCANS: dict[Mixer, Callable[..., torch.Tensor]] = {
    Mixer.KERNELS: _conv_scan_kernels,
    Mixer.TORCH: functools.partial(unfused_conv_scan, backend=Mixer.TORCH),
}


def resolve_backend(backend: str, device: torch.device | str) -> Mixer:
    """The backend that `backend` (auto, kernels or torch) runs on `device`: auto picks `available_backend`."""
    resolvers = {
        Mixer.AUTO: lambda: available_backend(device),
        Mixer.KERNELS: lambda: Mixer.KERNELS,
        Mixer.TORCH: lambda: Mixer.TORCH,
    }
    return pick(resolvers, backend, "backend", where="the mixer forward")()


def mixer_forward(
    mixer: BambaMixer,
    hidden_states: torch.Tensor,
    seq_idx: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    backend: str = Mixer.AUTO,
) -> torch.Tensor:
    """Mamba-2 mixer over (batch, tokens, hidden) with `seq_idx` segments; `attention_mask` marks padding.

    backend: auto | kernels | torch (`Mixer`); auto picks the fastest on the input's device.
    """
    b, t, _ = hidden_states.shape
    if attention_mask is not None and attention_mask.dim() == 2:
        # transformers passes a mixer a mask only when a row has padding; an all-ones mask is one segment per
        # row, the same result, and checking for it here would sync the GPU in every layer.
        if seq_idx is not None:
            raise ValueError("Pass either seq_idx (packed rows) or a padding attention_mask, not both.")
        seq_idx = seq_idx_from_attention_mask(attention_mask)
    if seq_idx is not None:
        seq_idx = seq_idx.to(torch.int32).contiguous()  # what both CUDA kernels take; the torch path too
    backend = resolve_backend(backend, hidden_states.device)
    report_backend(backend)

    zxbcdt = mixer.project_in(hidden_states) if isinstance(mixer, SegmentAwareMixer) else mixer.in_proj(hidden_states)
    gate, xbc, dt = zxbcdt.split([mixer.intermediate_size, mixer.conv_dim, mixer.num_heads], dim=-1)
    y = _CONV_SCANS[backend](mixer, xbc, dt, seq_idx).reshape(b, t, -1)
    y = mixer.gated_norm(y, gate) if isinstance(mixer, SegmentAwareMixer) else mixer.norm(y, gate)
    return mixer.out_proj(y.to(hidden_states.dtype))


def _gated_rmsnorm(norm: BambaRMSNormGated, x: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
    """transformers' gated RMSNorm, computed in float32 or wider (float64 inputs stay float64)."""
    acc = torch.promote_types(x.dtype, torch.float32)
    h = x.to(acc)
    if gate is not None:
        h = h * F.silu(gate.to(acc))
    groups = h.view(*h.shape[:-1], -1, norm.group_size)
    groups = groups * torch.rsqrt(groups.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * groups.view_as(h).to(x.dtype)


class GatedRMSNormKernel:
    """Mixin for transformers' gated RMSNorms that gate before normalising per group (`weight`, `group_size`,
    `variance_epsilon`): on CUDA with mamba-ssm, its fused Triton kernel (same math, one pass)."""

    def forward(self, hidden_states: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        fused = mamba_ssm_kernels().get("rmsnorm") if hidden_states.is_cuda else None
        if fused is None:
            return _gated_rmsnorm(self, hidden_states, gate)

        def norm(x: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
            return fused(x, self.weight, None, z=z, eps=self.variance_epsilon, group_size=self.group_size,
                         norm_before_gate=False)

        # the gate is a slice of in_proj's output (a long row stride): long rows pass the kernel's int32 offsets
        return longseq.by_rows(norm, hidden_states.to(gate.dtype) if gate is not None else hidden_states, gate)


class FusedGatedRMSNorm(GatedRMSNormKernel, BambaRMSNormGated):
    """Bamba's gated RMSNorm with the fused kernel."""


PACKING_KWARGS = ("seq_idx", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


class SegmentAwareMixer:
    """Mixin over a transformers Mamba-2 mixer whose training/eval forward keeps packed sequences apart (see
    module docstring). The mixer must have the attributes every transformers Mamba-2 mixer has (in_proj, conv1d,
    dt_bias, A_log, D, norm, out_proj, num_heads, head_dim, n_groups, ssm_state_size, chunk_size, conv_dim,
    intermediate_size, time_step_limit, activation, act); a family overrides `project_in` and `gated_norm`
    where its mixer differs.

    With a cache (generation), the stock forward runs: generation batches are padded, never packed.
    """

    backend: Mixer = Mixer.AUTO
    """auto or torch, set by bamba_ft.model.mixer.install_mixer."""
    scan_states: ScanStates = ScanStates.AUTO
    """Whether the fused conv+scan keeps the scan's chunk states for backward (`model.scan_states`; set by
    install_mixer)."""
    checkpointed: bool = False
    """This mixer's decoder layer is recomputed in backward (set by bamba_ft.model.memory.apply_checkpointing)."""

    def keeps_scan_states(self) -> bool:
        return self.scan_states == ScanStates.KEEP or (self.scan_states == ScanStates.AUTO and self.checkpointed)

    def project_in(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(b, t, hidden) -> in_proj output [gate z, xBC, dt]."""
        return self.in_proj(hidden_states)

    def gated_norm(self, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """Scan output (b, t, intermediate) through the gate and the norm, before out_proj."""
        return self.norm(y, gate)

    def forward(self, hidden_states, cache=None, attention_mask=None, **kwargs):  # noqa: ANN001, ANN201
        seq_idx = kwargs.get("seq_idx")
        if cache is not None:
            if seq_idx is not None:
                raise ValueError("Packed batches (seq_idx) cannot be combined with a generation cache.")
            rest = {k: v for k, v in kwargs.items() if k not in PACKING_KWARGS}
            return super().forward(hidden_states, cache=cache, attention_mask=attention_mask, **rest)
        return mixer_forward(self, hidden_states, seq_idx=seq_idx, attention_mask=attention_mask, backend=self.backend)


class SegmentAwareBambaMixer(SegmentAwareMixer, BambaMixer):
    """Bamba's mixer with the segment-aware forward."""
