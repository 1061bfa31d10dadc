"""Segment-aware Mamba-2 mixer forward for transformers' Mamba-2 mixers (`BambaMixer` and its relatives).

A packed row holds several sequences; `seq_idx` (batch, tokens) numbers them. Two things must not cross a
boundary: the width-4 causal conv, and the SSD state. transformers' torch path lets both leak and its fused
CUDA path takes `out_proj.weight` as a raw tensor (so LoRA on out_proj gets no gradient and quantized
weights break in backward). This forward calls `in_proj`, `norm` and `out_proj` as modules and keeps
sequences apart on every backend:

- kernels: causal-conv1d and mamba-ssm's Triton SSD scan, both with `seq_idx` (CUDA);
- torch: an exact vectorised chunked SSD scan with segment masks, and a conv over a gapped layout.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import math
import sys
import types

import torch
import torch.nn.functional as F
from transformers.models.bamba.modeling_bamba import BambaMixer, BambaRMSNormGated

from bamba_ft.ops import longseq

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------
# Optional CUDA kernels


def _import_triton_kernels() -> dict[str, object]:
    from mamba_ssm.ops.triton.layernorm_gated import rmsnorm_fn
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    kernels = {"scan": mamba_chunk_scan_combined, "rmsnorm": rmsnorm_fn}
    try:  # the scan's forward and backward halves (what mamba-ssm's own fused conv+scan calls)
        from mamba_ssm.ops.triton.ssd_combined import (
            _mamba_chunk_scan_combined_bwd,
            _mamba_chunk_scan_combined_fwd,
        )

        kernels.update(scan_fwd=_mamba_chunk_scan_combined_fwd, scan_bwd=_mamba_chunk_scan_combined_bwd)
    except ImportError:
        pass
    return kernels


@functools.cache
def _mamba_ssm() -> dict[str, object]:
    """mamba-ssm's Triton scan and gated RMSNorm, or {} when the package is not importable.

    The kernels used here are Triton (compiled at run time); only the package's `__init__` needs its compiled
    `selective_scan_cuda` extension. A mamba-ssm installed without that extension
    (MAMBA_SKIP_CUDA_BUILD=TRUE, no compiler needed) is still used: its kernel modules are imported under a
    temporary package object that skips the `__init__`.
    """
    try:
        return _import_triton_kernels()
    except ImportError as e:
        if "selective_scan_cuda" not in str(e) or importlib.util.find_spec("mamba_ssm") is None:
            return {}
    except Exception:  # e.g. Triton without a GPU driver
        return {}
    spec = importlib.util.find_spec("mamba_ssm")
    package = types.ModuleType("mamba_ssm")
    package.__path__ = list(spec.submodule_search_locations or [])
    sys.modules["mamba_ssm"] = package
    try:
        return _import_triton_kernels()
    except Exception:
        return {}
    finally:
        sys.modules.pop("mamba_ssm", None)  # later `import mamba_ssm` behaves as without bamba_ft


@functools.cache
def _causal_conv1d() -> object | None:
    try:
        from causal_conv1d import causal_conv1d_fn
    except Exception:
        return None
    return causal_conv1d_fn


@functools.cache
def _causal_conv1d_halves() -> tuple[object, object] | None:
    """causal-conv1d's forward and backward functions (1.7: `cpp_functions`; older: the extension module)."""
    try:
        from causal_conv1d.cpp_functions import causal_conv1d_bwd_function, causal_conv1d_fwd_function

        return causal_conv1d_fwd_function, causal_conv1d_bwd_function
    except Exception:
        pass
    try:
        import causal_conv1d_cuda

        return causal_conv1d_cuda.causal_conv1d_fwd, causal_conv1d_cuda.causal_conv1d_bwd
    except Exception:
        return None


def available_backend(device: torch.device | str) -> str:
    """Name of the fastest exact backend for `device`: cuda-kernels | triton | torch."""
    if torch.device(device).type != "cuda" or not _mamba_ssm():
        return "torch"
    return "cuda-kernels" if _causal_conv1d() is not None else "triton"


_reported: set[str] = set()


def _report(backend: str) -> None:
    if backend in _reported:
        return
    _reported.add(backend)
    log.info("mixer backend: %s", backend)
    if backend == "triton":
        log.warning(
            "causal_conv1d is not installed: the mixer's conv runs in PyTorch (exact, slower). "
            "Install `causal-conv1d` for the fused kernel."
        )


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
# Exact torch reference


def segment_conv1d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, seq_idx: torch.Tensor | None
) -> torch.Tensor:
    """Depthwise causal conv over (batch, tokens, channels) that restarts at every sequence boundary.

    Each sequence is moved K-1 slots further right than the one before, leaving zero gaps, so a plain causal
    conv over the gapped row sees exactly what it would see for the sequence alone; outputs are read back
    from the same slots. weight: (channels, K).
    """
    b, t, c = x.shape
    k = weight.shape[-1]
    w = weight.to(x.dtype)[:, None, :]
    bias = bias.to(x.dtype) if bias is not None else None
    if seq_idx is None or k == 1:
        return F.conv1d(x.transpose(1, 2), w, bias, padding=k - 1, groups=c)[..., :t].transpose(1, 2)
    starts = torch.diff(seq_idx, dim=-1, prepend=seq_idx[:, :1]) != 0
    slot = torch.arange(t, device=x.device) + (k - 1) * starts.cumsum(-1)  # (b, t)
    width = t + (k - 1) * int(starts.sum(-1).max())
    index = slot[:, :, None].expand(b, t, c)
    gapped = x.new_zeros(b, width, c).scatter(1, index, x)
    out = F.conv1d(gapped.transpose(1, 2), w, bias, padding=k - 1, groups=c)[..., :width]
    return out.transpose(1, 2).gather(1, index)


def _segsum(a: torch.Tensor) -> torch.Tensor:
    """out[..., i, j] = a[j+1] + ... + a[i] for i >= j, -inf above the diagonal (stable: no differences)."""
    n = a.shape[-1]
    a = a[..., None].expand(*a.shape, n)
    below = torch.ones(n, n, dtype=torch.bool, device=a.device).tril(-1)
    s = a.masked_fill(~below, 0).cumsum(-2)
    return s.masked_fill(~below.logical_or(torch.eye(n, dtype=torch.bool, device=a.device)), -math.inf)


def ssd_scan_torch(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    dt_limit: tuple[float, float] = (0.0, math.inf),
    initial_states: torch.Tensor | None = None,
    return_final_states: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Chunked SSD scan (Mamba-2) with sequences kept apart; same arguments as mamba-ssm's combined scan.

    x: (b, t, h, p); dt: (b, t, h); A: (h,); B, C: (b, t, g, n); seq_idx: (b, t) or None;
    initial_states: (b, h, p, n) or None. Returns y: (b, t, h, p) in float32 (float64 for float64 inputs), and
    with `return_final_states` also the state after the last token, (b, h, p, n).

    As in mamba-ssm, `initial_states` belong to sequence number 0: with `seq_idx`, only tokens numbered 0 that
    precede every other sequence of the row read them (numbers must not decrease along a row).

    Within a chunk, the causal decay matrix is zeroed between tokens of different sequences; a chunk's state
    collects only tokens of the sequence its last token belongs to; a state passes to a later chunk only
    when both chunk ends lie in one sequence; and a token reads the incoming state only if it continues the
    sequence of the previous chunk's end.
    """
    b, t, h, p = x.shape
    g = B.shape[2]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    dt = dt.to(acc)
    if dt_bias is not None:
        dt = dt + dt_bias.to(acc)
    dt = F.softplus(dt)
    if dt_limit != (0.0, math.inf):
        dt = dt.clamp(dt_limit[0], dt_limit[1])
    pad = (-t) % chunk_size

    def chunked(v: torch.Tensor) -> torch.Tensor:  # (b, t, ...) -> (b, chunks, chunk_size, ...)
        v = F.pad(v, (0, 0) * (v.dim() - 2) + (0, pad))
        return v.reshape(b, -1, chunk_size, *v.shape[2:])

    x = x.to(acc)
    xdt = chunked(x * dt[..., None])
    Bc = chunked(B.to(acc).repeat_interleave(h // g, dim=2))
    Cc = chunked(C.to(acc).repeat_interleave(h // g, dim=2))
    a = chunked(A.to(acc) * dt).permute(0, 3, 1, 2)  # (b, h, c, l): log-decay of each step
    a_cum = a.cumsum(-1)

    seg = seg_end = None
    if seq_idx is not None:
        seg = F.pad(seq_idx, (0, pad), mode="replicate") if pad else seq_idx  # padding continues the last sequence
        seg = seg.reshape(b, -1, chunk_size)
        start = seg[:, :1, 0] if initial_states is None else torch.zeros_like(seg[:, :1, 0])  # the initial state's
        seg_end = torch.cat([start, seg[:, :, -1]], dim=1)  # (b, c+1): start, then each chunk's end

    # 1. Within each chunk: attention-like form with the causal decay matrix.
    decay = torch.exp(_segsum(a))  # (b, h, c, l, s)
    if seg is not None:
        decay = decay * (seg[:, :, :, None] == seg[:, :, None, :])[:, None]
    scores = torch.einsum("bclhn,bcshn->bclsh", Cc, Bc) * decay.permute(0, 2, 3, 4, 1)
    y = torch.einsum("bclsh,bcshp->bclhp", scores, xdt)

    # 2. Each chunk's contribution to the state at its end.
    to_end = torch.exp(a_cum[..., -1:] - a_cum)  # (b, h, c, l)
    if seg is not None:
        to_end = to_end * (seg == seg[..., -1:])[:, None]
    states = torch.einsum("bclhn,bhcl,bclhp->bchpn", Bc, to_end, xdt)

    # 3. Pass states between chunks: state at the end of chunk i from the contributions of chunks j <= i.
    first = torch.zeros_like(states[:, :1]) if initial_states is None else initial_states.to(acc)[:, None]
    states = torch.cat([first, states], dim=1)
    chunk_decay = torch.exp(_segsum(F.pad(a_cum[..., -1], (1, 0))))  # (b, h, c+1, c+1)
    if seg_end is not None:
        chunk_decay = chunk_decay * (seg_end[:, :, None] == seg_end[:, None, :])[:, None]
    boundary = torch.einsum("bhzc,bchpn->bzhpn", chunk_decay, states)  # state at each chunk boundary
    incoming = boundary[:, :-1]  # state entering each chunk

    # 4. Each token reads the state that entered its chunk.
    from_start = torch.exp(a_cum)  # (b, h, c, l)
    if seg is not None:
        from_start = from_start * (seg == seg_end[:, :-1, None])[:, None]
    y = y + torch.einsum("bclhn,bchpn,bhcl->bclhp", Cc, incoming, from_start)

    y = y.reshape(b, -1, h, p)[:, :t]
    if D is not None:
        y = y + x * (D.to(acc)[:, None] if D.dim() == 1 else D.to(acc))
    # padding after the last token has dt = 0: no decay, no input, so the last boundary is the final state
    return (y, boundary[:, -1]) if return_final_states else y


# ----------------------------------------------------------------------------------------------------------
# The mixer


def _conv(mixer: BambaMixer, xbc: torch.Tensor, seq_idx: torch.Tensor | None, backend: str) -> torch.Tensor:
    weight = mixer.conv1d.weight.squeeze(1)
    conv_fn = _causal_conv1d() if backend == "cuda-kernels" else None
    # causal-conv1d takes seq_idx only in channel-last layout, with channels a multiple of 8.
    if conv_fn is not None and mixer.activation in ("silu", "swish") and xbc.shape[-1] % 8 == 0:
        x = xbc.contiguous()  # dense (b, t, c): its transpose is channel-last, and the output keeps that layout
        return conv_fn(x.transpose(1, 2), weight, mixer.conv1d.bias, seq_idx=seq_idx, activation="silu").transpose(1, 2)
    return mixer.act(segment_conv1d(xbc, weight, mixer.conv1d.bias, seq_idx))


def _scan(mixer: BambaMixer, x, dt, A, B, C, seq_idx, backend: str) -> torch.Tensor:  # noqa: ANN001
    kwargs = dict(D=mixer.D, dt_bias=mixer.dt_bias, seq_idx=seq_idx, dt_limit=tuple(mixer.time_step_limit))
    if backend not in ("cuda-kernels", "triton"):
        return ssd_scan_torch(x, dt, A, B, C, mixer.chunk_size, **kwargs)
    scan = functools.partial(_mamba_ssm()["scan"], A=A, chunk_size=mixer.chunk_size, z=None, dt_softplus=True)
    if not longseq.needs_pieces(x.shape[0], x.shape[1], longseq.scan_cost(x, dt, B, C, mixer.chunk_size)):
        return scan(x, dt, B=B, C=C, **kwargs)
    del kwargs["seq_idx"]

    def piece(x, dt, B, C, seq_idx, initial_states):  # noqa: ANN001, ANN202
        return scan(x, dt, B=B, C=C, seq_idx=seq_idx, initial_states=initial_states, return_final_states=True,
                    **kwargs)

    return longseq.piecewise_scan(piece, x, dt, B, C, seq_idx, mixer.chunk_size)


class KernelOps:
    """The four CUDA kernel calls of the fused conv+scan (causal-conv1d, mamba-ssm's SSD scan), in one place.

    Layouts: conv tensors are (batch, channels, tokens) views of channel-last (batch, tokens, channels) memory.
    The backward functions write their input gradients into the buffers they are given.
    """

    @staticmethod
    def available() -> bool:
        return _causal_conv1d_halves() is not None and "scan_bwd" in _mamba_ssm()

    @staticmethod
    def conv_fwd(x, weight, bias, seq_idx):  # noqa: ANN001, ANN205
        return _causal_conv1d_halves()[0](x, weight, bias, seq_idx, None, None, True)

    @staticmethod
    def conv_bwd(x, weight, bias, dout, seq_idx, dx):  # noqa: ANN001, ANN205
        dx, dweight, dbias, _ = _causal_conv1d_halves()[1](x, weight, bias, dout, seq_idx, None, None, dx, False, True)
        return dx, dweight, dbias

    @staticmethod
    def scan_fwd(x, dt, A, B, C, chunk_size, D, dt_bias, seq_idx, dt_limit):  # noqa: ANN001, ANN205
        return _mamba_ssm()["scan_fwd"](x, dt, A, B, C, chunk_size, D=D, z=None, dt_bias=dt_bias, seq_idx=seq_idx,
                                        dt_softplus=True, dt_limit=dt_limit)[0]

    @staticmethod
    def scan_bwd(dout, x, dt, A, B, C, out, chunk_size, D, dt_bias, seq_idx, dt_limit, dx, ddt, dB, dC):  # noqa: ANN001, ANN205
        dx, ddt, dA, dB, dC, dD, _, ddt_bias, _ = _mamba_ssm()["scan_bwd"](
            dout, x, dt, A, B, C, out, chunk_size, D=D, z=None, dt_bias=dt_bias, seq_idx=seq_idx, dt_softplus=True,
            dt_limit=dt_limit, dx=dx, ddt=ddt, dB=dB, dC=dC)
        return dx, ddt, dA, dB, dC, dD, ddt_bias

    @staticmethod
    def scan_fwd_state(x, dt, A, B, C, chunk_size, D, dt_bias, seq_idx, dt_limit, initial_states):  # noqa: ANN001, ANN205
        """`scan_fwd` starting from `initial_states` (or zeros); returns (out, final states in float32)."""
        got = _mamba_ssm()["scan_fwd"](x, dt, A, B, C, chunk_size, D=D, z=None, dt_bias=dt_bias,
                                       initial_states=initial_states, seq_idx=seq_idx, dt_softplus=True,
                                       dt_limit=dt_limit)
        return got[0], got[5]

    @staticmethod
    def scan_bwd_state(dout, x, dt, A, B, C, out, chunk_size, D, dt_bias, seq_idx, dt_limit, dx, ddt, dB, dC,  # noqa: ANN001, ANN205
                       initial_states, dfinal_states):
        """`scan_bwd` with initial and final states; returns (dx, ddt, dA, dB, dC, dD, ddt_bias, dinitial_states)."""
        got = _mamba_ssm()["scan_bwd"](
            dout, x, dt, A, B, C, out, chunk_size, D=D, z=None, dt_bias=dt_bias, initial_states=initial_states,
            dfinal_states=dfinal_states, seq_idx=seq_idx, dt_softplus=True, dt_limit=dt_limit, dx=dx, ddt=ddt,
            dB=dB, dC=dC)
        return got[0], got[1], got[2], got[3], got[4], got[5], got[7], got[8]


def _channel_last(xbc: torch.Tensor) -> torch.Tensor:
    """(b, t, c) -> (b, c, t) channel-last view; causal-conv1d needs the token stride to be a multiple of 8."""
    return (xbc if xbc.stride(1) % 8 == 0 else xbc.contiguous()).transpose(1, 2)


def _split_xbc(xbc: torch.Tensor, shape: tuple[int, int, int, int]) -> tuple[torch.Tensor, ...]:
    heads, head_dim, groups, state = shape
    b, t, _ = xbc.shape
    x, B, C = xbc.split([heads * head_dim, groups * state, groups * state], dim=-1)
    return x.reshape(b, t, heads, head_dim), B.reshape(b, t, groups, state), C.reshape(b, t, groups, state)


def conv_scan_forward_kernels(ops, xbc, dt, weight, bias, A, D, dt_bias, seq_idx, shape, chunk_size, dt_limit):  # noqa: ANN001, ANN201
    """The conv+scan forward as kernel calls: scan(silu(conv(xbc))), (b, t, heads, head_dim)."""
    x, B, C = _split_xbc(ops.conv_fwd(_channel_last(xbc), weight, bias, seq_idx).transpose(1, 2), shape)
    return ops.scan_fwd(x, dt, A, B, C, chunk_size, D, dt_bias, seq_idx, dt_limit)


def conv_scan_backward_kernels(ops, dout, xbc, dt, weight, bias, A, D, dt_bias, seq_idx, shape, chunk_size, dt_limit):  # noqa: ANN001, ANN202
    """(dxbc, ddt, dweight, dbias, dA, dD, ddt_bias); the conv output is recomputed from its input."""
    x_cl = _channel_last(xbc)
    x, B, C = _split_xbc(ops.conv_fwd(x_cl, weight, bias, seq_idx).transpose(1, 2), shape)
    dconv = torch.empty(xbc.shape, dtype=xbc.dtype, device=xbc.device)  # dense: its transpose is channel-last
    dx, dB, dC = _split_xbc(dconv, shape)
    ddt = torch.empty(dt.shape, dtype=dt.dtype, device=dt.device)
    # mamba-ssm's backward reads the forward output only to go through a gate (z); this scan has none, so x
    # stands in for it and the output need not be kept.
    got = ops.scan_bwd(dout, x, dt, A, B, C, x, chunk_size, D, dt_bias, seq_idx, dt_limit, dx, ddt, dB, dC)
    for buf, value in zip((dx, dB, dC), (got[0], got[3], got[4])):
        if value.data_ptr() != buf.data_ptr():
            buf.copy_(value)
    dxbc = torch.empty(xbc.shape, dtype=xbc.dtype, device=xbc.device)
    dxbc_cl, dweight, dbias = ops.conv_bwd(x_cl, weight, bias, dconv.transpose(1, 2), seq_idx, dxbc.transpose(1, 2))
    if dxbc_cl.data_ptr() != dxbc.data_ptr():
        dxbc.copy_(dxbc_cl.transpose(1, 2))
    return dxbc, got[1], dweight, dbias, got[2], got[5], got[6]


class DirectConvScan:
    """Makes the conv+scan's kernel calls one by one (`ConvScanGraphs` in bamba_ft.ops.graphs replays them)."""

    def __init__(self, ops: type = KernelOps) -> None:
        self.ops = ops

    def forward(self, *args):  # noqa: ANN002, ANN201
        return conv_scan_forward_kernels(self.ops, *args)

    def backward(self, *args):  # noqa: ANN002, ANN201
        return conv_scan_backward_kernels(self.ops, *args)


class _ConvScan(torch.autograd.Function):
    """conv (+SiLU) then SSD scan, keeping only the conv's *input* for backward and recomputing its output there.

    The conv input is a slice of the in_proj output, which stays alive anyway (the gate and dt are slices of
    it too), so this saves two (tokens x conv channels) activations per layer, as mamba-ssm's own fused
    conv+scan does, while in_proj, norm and out_proj stay ordinary modules.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, xbc, dt, weight, bias, A, D, dt_bias, seq_idx, runner, shape, chunk_size, dt_limit):  # noqa: ANN001, ANN205
        out = runner.forward(xbc, dt, weight, bias, A, D, dt_bias, seq_idx, shape, chunk_size, dt_limit)
        ctx.save_for_backward(xbc, dt, weight, bias, A, D, dt_bias, seq_idx)
        ctx.runner, ctx.shape, ctx.chunk_size, ctx.dt_limit = runner, shape, chunk_size, dt_limit
        return out

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, dout):  # noqa: ANN001, ANN205
        xbc, dt, weight, bias, A, D, dt_bias, seq_idx = ctx.saved_tensors
        grads = ctx.runner.backward(dout, xbc, dt, weight, bias, A, D, dt_bias, seq_idx, ctx.shape,
                                    ctx.chunk_size, ctx.dt_limit)
        return (*grads, None, None, None, None, None)


def fused_conv_scan_ok(mixer: BambaMixer, ops: type = KernelOps) -> bool:
    """Whether the fused conv+scan applies: SiLU conv over channels in multiples of 8, and both kernels present."""
    return mixer.activation in ("silu", "swish") and mixer.conv_dim % 8 == 0 and ops.available()


def _ssm_shape(mixer: BambaMixer) -> tuple[int, int, int, int]:
    return mixer.num_heads, mixer.head_dim, mixer.n_groups, mixer.ssm_state_size


def conv_scan(mixer: BambaMixer, xbc: torch.Tensor, dt: torch.Tensor, seq_idx: torch.Tensor | None,
              ops: type = KernelOps) -> torch.Tensor:
    """y = scan(silu(conv(xbc))) for (b, t, conv_dim) `xbc`, (b, t, heads) `dt`; returns (b, t, heads, head_dim).

    The kernels run through `mixer.conv_scan_graphs` (CUDA graphs, with their own ops) when it is set. Rows too
    long for the kernels' 32-bit offsets run in pieces (bamba_ft.ops.longseq), with direct kernel calls.
    """
    A = -torch.exp(mixer.A_log.float())
    args = (xbc, dt, mixer.conv1d.weight.squeeze(1), mixer.conv1d.bias, A, mixer.D, mixer.dt_bias, seq_idx)
    rest = (_ssm_shape(mixer), mixer.chunk_size, tuple(mixer.time_step_limit))
    if longseq.needs_pieces(xbc.shape[0], xbc.shape[1], longseq.token_cost(xbc, dt, rest[0], rest[1])):
        return longseq.piecewise_conv_scan(*args, ops, *rest)
    runner = mixer.__dict__.get("conv_scan_graphs") or DirectConvScan(ops)
    return _ConvScan.apply(*args, runner, *rest)


def unfused_conv_scan(mixer: BambaMixer, xbc: torch.Tensor, dt: torch.Tensor, seq_idx: torch.Tensor | None,
                      backend: str) -> torch.Tensor:
    """The same as `conv_scan` in two autograd steps (autograd keeps the conv output): torch and triton backends."""
    x, B, C = _split_xbc(_conv(mixer, xbc, seq_idx, backend), _ssm_shape(mixer))
    return _scan(mixer, x, dt, -torch.exp(mixer.A_log.float()), B, C, seq_idx, backend)


def mixer_forward(
    mixer: BambaMixer,
    hidden_states: torch.Tensor,
    seq_idx: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Mamba-2 mixer over (batch, tokens, hidden) with `seq_idx` segments; `attention_mask` marks padding."""
    b, t, _ = hidden_states.shape
    if attention_mask is not None and attention_mask.dim() == 2:
        # transformers passes a mixer a mask only when a row has padding; an all-ones mask is one segment per
        # row, the same result, and checking for it here would sync the GPU in every layer.
        if seq_idx is not None:
            raise ValueError("Pass either seq_idx (packed rows) or a padding attention_mask, not both.")
        seq_idx = seq_idx_from_attention_mask(attention_mask)
    if seq_idx is not None:
        seq_idx = seq_idx.to(torch.int32).contiguous()  # what both CUDA kernels take; the torch path too
    backend = backend or available_backend(hidden_states.device)
    _report(backend)

    zxbcdt = mixer.project_in(hidden_states) if isinstance(mixer, SegmentAwareMixer) else mixer.in_proj(hidden_states)
    gate, xbc, dt = zxbcdt.split([mixer.intermediate_size, mixer.conv_dim, mixer.num_heads], dim=-1)
    if backend == "cuda-kernels" and fused_conv_scan_ok(mixer):
        y = conv_scan(mixer, xbc, dt, seq_idx)
    else:
        y = unfused_conv_scan(mixer, xbc, dt, seq_idx, backend)
    y = y.reshape(b, t, -1)
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
        fused = _mamba_ssm().get("rmsnorm") if hidden_states.is_cuda else None
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

    backend: str = "auto"

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
        backend = None if self.backend == "auto" else self.backend
        return mixer_forward(self, hidden_states, seq_idx=seq_idx, attention_mask=attention_mask, backend=backend)


class SegmentAwareBambaMixer(SegmentAwareMixer, BambaMixer):
    """Bamba's mixer with the segment-aware forward."""
