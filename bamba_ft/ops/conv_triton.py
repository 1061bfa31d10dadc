"""The Mamba-2 mixer's causal depthwise conv (+SiLU) as Triton kernels, over channel-last packed rows with `seq_idx`.

A candidate to stand in for causal-conv1d's channel-last kernels in the fused conv+scan (`TritonConvOps`, same
calling conventions as `KernelOps.conv_fwd` / `conv_bwd`). Per layer of the Bamba-9B shape at 4,666 tokens,
causal-conv1d took 0.082 ms forward (about 2 TB/s) and 0.189 ms backward on an H200 (BENCHMARKS.md); these kernels
read and write each activation once from device memory and keep the shifted re-reads in cache. Whether they are
faster is for the benchmark variant `bamba_ft_triton_conv` to show; until then causal-conv1d stays the kernel.

Math, for tap k of a width-W conv (weight (channels, W)): pre[t] = bias + sum_k w[k] x[t - W + 1 + k], over the
taps in t's sequence; y = silu(pre). Backward: dpre = dy silu'(pre); dx[s] = sum_k w[k] dpre[s + W - 1 - k] over
outputs in s's sequence; dw[k] = sum_t dpre[t] x[t - W + 1 + k]; dbias = sum_t dpre[t] (float32 atomics, and
only for a conv that trains: causal-conv1d computes them for a frozen one too).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from bamba_ft.ops.kernels import KernelOps

# (tokens, channels, warps) per program that Triton's autotuner chooses from, per channel count and dtype: shapes
# for which ptxas spills no registers in any of the three kernels (forward; backward with and without the weight
# gradient) for sm_90 (ptxas -v on their PTX, Triton 3.6): the backward's unrolled taps keep many tiles of
# addresses live, and 32 x 128 with 4 warps spilled 2 KB per thread there.
BLOCKS = ((16, 128, 8), (8, 256, 8), (32, 64, 8), (16, 64, 4), (8, 128, 4))
_CONFIGS = [triton.Config({"BT": bt, "BC": bc}, num_warps=warps) for bt, bc, warps in BLOCKS]


@triton.jit
def _tile(seq_ptr, T, C, sst, HAS_SEQ: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    """This program's rows t and channels c, their masks, and the rows' sequence ids (t itself without seq_idx)."""
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    tm, cm = t < T, c < C
    if HAS_SEQ:
        s_t = tl.load(seq_ptr + t * sst, mask=tm, other=-1)
    else:
        s_t = t
    return t, c, tm, cm, s_t


@triton.jit
def _pre_activation(x_ptr, w_ptr, b_ptr, seq_ptr, u, s_u, c, row_ok, cm, sxt, sxc, sst, swc, swk,
                    HAS_BIAS: tl.constexpr, HAS_SEQ: tl.constexpr, W: tl.constexpr):
    """bias + sum_k w[k] x[u - W + 1 + k] (float32) for rows `u` of sequences `s_u`, channels `c`."""
    acc = tl.zeros((u.shape[0], c.shape[0]), dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(b_ptr + c, mask=cm, other=0.0).to(tl.float32)[None, :]
    for k in tl.static_range(W):
        src = u - (W - 1) + k
        ok = row_ok & (src >= 0)
        if HAS_SEQ:
            ok = ok & (tl.load(seq_ptr + src * sst, mask=ok, other=-2) == s_u)
        xv = tl.load(x_ptr + src[:, None] * sxt + c[None, :] * sxc, mask=ok[:, None] & cm[None, :], other=0.0)
        acc += xv.to(tl.float32) * tl.load(w_ptr + c * swc + k * swk, mask=cm, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _conv_fwd_kernel(x_ptr, w_ptr, b_ptr, seq_ptr, y_ptr, T, C,
                     sxb, sxt, sxc, syb, syt, syc, ssb, sst, swc, swk,
                     HAS_BIAS: tl.constexpr, HAS_SEQ: tl.constexpr, SILU: tl.constexpr, W: tl.constexpr,
                     BT: tl.constexpr, BC: tl.constexpr):
    row = tl.program_id(2)
    x_ptr += row * sxb
    y_ptr += row * syb
    seq_ptr += row * ssb
    t, c, tm, cm, s_t = _tile(seq_ptr, T, C, sst, HAS_SEQ, BT, BC)
    acc = _pre_activation(x_ptr, w_ptr, b_ptr, seq_ptr, t, s_t, c, tm, cm, sxt, sxc, sst, swc, swk,
                          HAS_BIAS, HAS_SEQ, W)
    if SILU:
        acc = acc * tl.sigmoid(acc)
    tl.store(y_ptr + t[:, None] * syt + c[None, :] * syc, acc.to(y_ptr.dtype.element_ty),
             mask=tm[:, None] & cm[None, :])


@triton.jit
def _conv_bwd_kernel(x_ptr, w_ptr, b_ptr, seq_ptr, dy_ptr, dx_ptr, dw_ptr, db_ptr, T, C,
                     sxb, sxt, sxc, sdyb, sdyt, sdyc, sdxb, sdxt, sdxc, ssb, sst, swc, swk,
                     HAS_BIAS: tl.constexpr, HAS_SEQ: tl.constexpr, SILU: tl.constexpr, W: tl.constexpr,
                     WGRAD: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    row = tl.program_id(2)
    x_ptr += row * sxb
    dy_ptr += row * sdyb
    dx_ptr += row * sdxb
    seq_ptr += row * ssb
    t, c, tm, cm, s_t = _tile(seq_ptr, T, C, sst, HAS_SEQ, BT, BC)
    dx = tl.zeros((BT, BC), dtype=tl.float32)
    for d in tl.static_range(W):  # the outputs u = t + d that read x[t] through tap W - 1 - d
        u = t + d
        um = tm & (u < T)
        if HAS_SEQ:
            s_u = tl.load(seq_ptr + u * sst, mask=um, other=-3)
            um = um & (s_u == s_t)
        else:
            s_u = u
        pre = _pre_activation(x_ptr, w_ptr, b_ptr, seq_ptr, u, s_u, c, um, cm, sxt, sxc, sst, swc, swk,
                              HAS_BIAS, HAS_SEQ, W)
        dpre = tl.load(dy_ptr + u[:, None] * sdyt + c[None, :] * sdyc, mask=um[:, None] & cm[None, :],
                       other=0.0).to(tl.float32)
        if SILU:
            sg = tl.sigmoid(pre)
            dpre = dpre * sg * (1.0 + pre * (1.0 - sg))
        w_tap = tl.load(w_ptr + c * swc + (W - 1 - d) * swk, mask=cm, other=0.0).to(tl.float32)
        dx += dpre * w_tap[None, :]
        if WGRAD:
            if d == 0:  # dpre of the tile's own rows: the weight's and the bias's gradients
                if HAS_BIAS:
                    tl.atomic_add(db_ptr + c, tl.sum(dpre, axis=0), mask=cm)
                for k in tl.static_range(W):
                    src = t - (W - 1) + k
                    ok = tm & (src >= 0)
                    if HAS_SEQ:
                        ok = ok & (tl.load(seq_ptr + src * sst, mask=ok, other=-2) == s_t)
                    xv = tl.load(x_ptr + src[:, None] * sxt + c[None, :] * sxc, mask=ok[:, None] & cm[None, :],
                                 other=0.0).to(tl.float32)
                    tl.atomic_add(dw_ptr + c * W + k, tl.sum(dpre * xv, axis=0), mask=cm)
    tl.store(dx_ptr + t[:, None] * sdxt + c[None, :] * sdxc, dx.to(dx_ptr.dtype.element_ty),
             mask=tm[:, None] & cm[None, :])


_fwd_tuned = triton.autotune(_CONFIGS, key=["C"])(_conv_fwd_kernel)
_bwd_tuned = triton.autotune(_CONFIGS, key=["C", "WGRAD"], reset_to_zero=["dw_ptr", "db_ptr"])(_conv_bwd_kernel)


def _launch(tuned, kernel, grid_of, block: tuple[int, int, int] | None, *args, **meta) -> None:  # noqa: ANN001
    """`tuned` (the autotuner) over `grid_of(BT, BC)`, or `kernel` at the given (BT, BC, warps) `block`."""
    if block is None:
        tuned[lambda m: grid_of(m["BT"], m["BC"])](*args, **meta)
    else:
        kernel[grid_of(block[0], block[1])](*args, **meta, BT=block[0], BC=block[1], num_warps=block[2])


def _seq(seq_idx: torch.Tensor | None, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    if seq_idx is None:
        return x, 0, 0  # a placeholder pointer, never read (HAS_SEQ=False)
    return seq_idx, seq_idx.stride(0), seq_idx.stride(1)


def conv_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, seq_idx: torch.Tensor | None,
             silu: bool = True, block: tuple[int, int, int] | None = None) -> torch.Tensor:
    """silu(conv(x)) for `x` (batch, channels, tokens), any strides; returns a (batch, channels, tokens) view of
    channel-last (batch, tokens, channels) memory, as causal-conv1d does for channel-last input. `block`: one of
    `BLOCKS` instead of the autotuner's choice."""
    b, c, t = x.shape
    y = torch.empty((b, t, c), dtype=x.dtype, device=x.device).transpose(1, 2)
    seq, ssb, sst = _seq(seq_idx, x)
    _launch(_fwd_tuned, _conv_fwd_kernel, lambda bt, bc: (triton.cdiv(t, bt), triton.cdiv(c, bc), b), block,
            x, weight, bias if bias is not None else weight, seq, y, t, c,
            x.stride(0), x.stride(2), x.stride(1), y.stride(0), y.stride(2), y.stride(1), ssb, sst,
            weight.stride(0), weight.stride(1), HAS_BIAS=bias is not None, HAS_SEQ=seq_idx is not None, SILU=silu,
            W=weight.shape[1])
    return y


def conv_bwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dout: torch.Tensor,
             seq_idx: torch.Tensor | None, dx: torch.Tensor | None = None, silu: bool = True, wgrad: bool = True,
             block: tuple[int, int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(dx, dweight, dbias) of `conv_fwd` for the (batch, channels, tokens) gradient `dout`; `dx`, when given
    (shaped as `x`), receives the input gradient. Without `wgrad` (a frozen conv) dweight and dbias are None.
    `block`: one of `BLOCKS` instead of the autotuner's choice."""
    b, c, t = x.shape
    if dx is None:
        dx = torch.empty((b, t, c), dtype=x.dtype, device=x.device).transpose(1, 2)
    dw = torch.zeros(weight.shape, dtype=torch.float32, device=x.device) if wgrad else None
    db = torch.zeros(c, dtype=torch.float32, device=x.device) if wgrad and bias is not None else None
    # a stand-in for an absent dw or db, which the kernel never writes (the autotuner zeroes it)
    unused = torch.zeros(1, dtype=torch.float32, device=x.device) if dw is None or db is None else None
    seq, ssb, sst = _seq(seq_idx, x)
    _launch(_bwd_tuned, _conv_bwd_kernel, lambda bt, bc: (triton.cdiv(t, bt), triton.cdiv(c, bc), b), block,
            x, weight, bias if bias is not None else weight, seq, dout, dx,
            dw if dw is not None else unused, db if db is not None else unused, t, c,
            x.stride(0), x.stride(2), x.stride(1), dout.stride(0), dout.stride(2), dout.stride(1),
            dx.stride(0), dx.stride(2), dx.stride(1), ssb, sst, weight.stride(0), weight.stride(1),
            HAS_BIAS=bias is not None, HAS_SEQ=seq_idx is not None, SILU=silu, W=weight.shape[1], WGRAD=wgrad)
    return (dx, dw.to(weight.dtype) if dw is not None else None, db.to(bias.dtype) if db is not None else None)


class TritonConvOps(KernelOps):
    """`KernelOps` with this module's conv in place of causal-conv1d's (the scan stays mamba-ssm's)."""

    @staticmethod
    def available() -> bool:
        return KernelOps.available()

    @staticmethod
    def conv_fwd(x, weight, bias, seq_idx):  # noqa: ANN001, ANN205
        return conv_fwd(x, weight, bias, seq_idx)

    @staticmethod
    def conv_bwd(x, weight, bias, dout, seq_idx, dx):  # noqa: ANN001, ANN205
        """As `KernelOps.conv_bwd`; a frozen conv (LoRA) gets no weight or bias gradient (None) computed."""
        wgrad = weight.requires_grad or (bias is not None and bias.requires_grad)
        return conv_bwd(x, weight, bias, dout, seq_idx, dx, wgrad=wgrad)
