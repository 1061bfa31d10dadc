"""Rows too long for the kernels' 32-bit element offsets: the conv+scan and the fused norms run in pieces.

mamba-ssm's Triton kernels (SSD scan, gated RMSNorm, RMSNorm) compute element offsets such as
`chunk * chunk_size * stride_seqlen` and `row * stride_row` in int32; causal-conv1d in uint32. Past 2^31 they
wrap and the kernels read and write the wrong memory, without an error. In a Bamba-9B layer `dt` and the
norm's gate are slices of the in_proj output, whose token stride is 16,768 elements, so from 128,071 tokens
on the scan's dt and the norm's gate are read from wrong addresses (a non-finite loss at 131,072 tokens); the
conv output (8,448 per token) passes the limit at 254k tokens, the scan output (8,192) at 262k.

Such calls run over pieces of the row whose offsets fit, and only when a row needs it (shorter rows take the
single-call path unchanged):
- conv+scan: pieces of whole chunks. The conv of a piece also reads the K-1 tokens before it (its halo), with
  their `seq_idx`, so sequences stay apart; the scan starts from the previous piece's final state (mamba-ssm's
  `initial_states`, which belong to sequence number 0: each piece's `seq_idx` is renumbered from the sequence
  of the token before it). Backward runs the pieces in reverse, carrying the state's gradient, and adds each
  halo's input gradient to the piece before.
- norms: per token, so ranges of rows.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from bamba_ft.ops.kernels import channel_last, split_xbc

OFFSET_LIMIT = 2**31  # element offsets of every kernel argument stay below this (int32 in Triton)


def token_cost(xbc: torch.Tensor, dt: torch.Tensor, shape: tuple[int, int, int, int], chunk_size: int) -> int:
    """Largest number of elements per token among the conv+scan's kernel arguments and intermediates."""
    heads, head_dim, _, state = shape
    chunk_states = _ceil_div(heads * head_dim * state, chunk_size)  # float32 state per chunk, spread over its tokens
    return max(xbc.stride(1), dt.stride(1), xbc.shape[-1], heads * head_dim, chunk_states)


def scan_cost(x: torch.Tensor, dt: torch.Tensor, B: torch.Tensor, C: torch.Tensor, chunk_size: int) -> int:
    """`token_cost` for a scan alone, of x (b, t, heads, head_dim) and B, C (b, t, groups, state)."""
    heads, head_dim, state = x.shape[2], x.shape[3], B.shape[-1]
    return max(x.stride(1), dt.stride(1), B.stride(1), C.stride(1), heads * head_dim,
               _ceil_div(heads * head_dim * state, chunk_size))


def needs_pieces(batch: int, tokens: int, cost: int) -> bool:
    """Whether (batch, tokens) at `cost` elements per token could reach offsets of OFFSET_LIMIT or more."""
    return batch * tokens * cost >= OFFSET_LIMIT


def spans(tokens: int, cost: int, chunk_size: int, halo: int) -> list[tuple[int, int]]:
    """[start, end) pieces of whole chunks, as even as possible, each (with its halo) within OFFSET_LIMIT."""
    most = max(chunk_size, ((OFFSET_LIMIT - 1) // cost - halo) // chunk_size * chunk_size)
    n = _ceil_div(tokens, most)
    size = _ceil_div(_ceil_div(tokens, n), chunk_size) * chunk_size  # at most `most`, a multiple of chunk_size
    return [(s, min(s + size, tokens)) for s in range(0, tokens, size)]


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def canonical_ids(seq_idx: torch.Tensor | None) -> torch.Tensor | None:
    """seq_idx renumbered 0, 1, 2, ... along each row (a new number wherever it changes), int32."""
    if seq_idx is None:
        return None
    change = torch.diff(seq_idx, dim=-1, prepend=seq_idx[:, :1]) != 0
    return change.cumsum(-1, dtype=torch.int32)


def _scan_ids(ids: torch.Tensor | None, r: int, s: int, e: int) -> torch.Tensor | None:
    """Piece [s, e) of row r numbered from the sequence of token s - 1: 0 continues it (reads the carried state)."""
    if ids is None:
        return None
    piece = ids[r : r + 1, s:e]
    return (piece - ids[r : r + 1, s - 1 : s]).contiguous() if s > 0 else piece.contiguous()


def _conv_piece(ops, xbc, weight, bias, ids, r, s, e, halo):  # noqa: ANN001, ANN202
    """(channel-last input view, conv output (1, halo + e - s, channels)) for piece [s, e) of row r."""
    x_cl = channel_last(xbc[r : r + 1, s - halo : e])
    seq = ids[r : r + 1, s - halo : e].contiguous() if ids is not None else None
    return x_cl, ops.conv_fwd(x_cl, weight, bias, seq).transpose(1, 2), seq


class _PiecewiseConvScan(torch.autograd.Function):
    """`conv_scan`'s autograd function (bamba_ft.ops.mamba2._ConvScan) over pieces of each row; see the module
    docstring. Saves the conv input (a slice of in_proj's output, alive anyway) and each piece's initial state."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, xbc, dt, weight, bias, A, D, dt_bias, seq_idx, ops, shape, chunk_size, dt_limit, pieces):  # noqa: ANN001, ANN205
        b, t, _ = xbc.shape
        heads, head_dim, _, state = shape
        halo_max = weight.shape[-1] - 1
        ids = canonical_ids(seq_idx)
        out = xbc.new_empty(b, t, heads, head_dim)
        state_dtype = torch.promote_types(xbc.dtype, torch.float32)  # what the kernels carry
        starts = torch.zeros(b, len(pieces), heads, head_dim, state, dtype=state_dtype, device=xbc.device)
        for r in range(b):
            carry = None
            for i, (s, e) in enumerate(pieces):
                halo = min(halo_max, s)
                _, conv, _ = _conv_piece(ops, xbc, weight, bias, ids, r, s, e, halo)
                x, B, C = split_xbc(conv[:, halo:], shape)
                if carry is not None:
                    starts[r, i] = carry[0]
                y, carry = ops.scan_fwd_state(x, dt[r : r + 1, s:e], A, B, C, chunk_size, D, dt_bias,
                                              _scan_ids(ids, r, s, e), dt_limit, carry)
                out[r : r + 1, s:e] = y
                del conv, x, B, C, y
        ctx.save_for_backward(xbc, dt, weight, bias, A, D, dt_bias, ids, starts)
        ctx.ops, ctx.shape, ctx.chunk_size, ctx.dt_limit, ctx.pieces = ops, shape, chunk_size, dt_limit, pieces
        return out

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, dout):  # noqa: ANN001, ANN205
        xbc, dt, weight, bias, A, D, dt_bias, ids, starts = ctx.saved_tensors
        ops, shape, chunk_size, dt_limit = ctx.ops, ctx.shape, ctx.chunk_size, ctx.dt_limit
        b, t, channels = xbc.shape
        halo_max = weight.shape[-1] - 1
        dxbc = torch.empty(xbc.shape, dtype=xbc.dtype, device=xbc.device)  # dense: its transpose is channel-last
        ddt = torch.empty(dt.shape, dtype=dt.dtype, device=dt.device)
        sums: dict[str, torch.Tensor] = {}

        def add(name: str, value: torch.Tensor | None) -> None:
            if value is not None:
                value = value.to(torch.promote_types(value.dtype, torch.float32))
                sums[name] = sums[name] + value if name in sums else value

        for r in range(b):
            dcarry = pending = None  # state gradient from the piece after; that piece's halo input gradient
            for i, (s, e) in reversed(list(enumerate(ctx.pieces))):
                halo = min(halo_max, s)
                x_cl, conv, seq = _conv_piece(ops, xbc, weight, bias, ids, r, s, e, halo)
                x, B, C = split_xbc(conv[:, halo:], shape)
                dconv = torch.empty(conv.shape, dtype=conv.dtype, device=conv.device)
                dconv[:, :halo].zero_()  # the halo's outputs belong to the piece before
                dx, dB, dC = split_xbc(dconv[:, halo:], shape)
                ddt_r = ddt[r : r + 1, s:e]
                got = ops.scan_bwd_state(dout[r : r + 1, s:e], x, dt[r : r + 1, s:e], A, B, C, x, chunk_size, D,
                                         dt_bias, _scan_ids(ids, r, s, e), dt_limit, dx, ddt_r, dB, dC,
                                         starts[r : r + 1, i] if s else None, dcarry)
                for buf, value in zip((dx, ddt_r, dB, dC), (got[0], got[1], got[3], got[4])):
                    if value.data_ptr() != buf.data_ptr():
                        buf.copy_(value)
                dcarry = got[7]
                for name, value in (("A", got[2]), ("D", got[5]), ("dt_bias", got[6])):
                    add(name, value)
                dx_in = dxbc[r : r + 1, s - halo : e]
                got_conv = ops.conv_bwd(x_cl, weight, bias, dconv.transpose(1, 2), seq, dx_in.transpose(1, 2))
                if got_conv[0].data_ptr() != dx_in.data_ptr():
                    dx_in.copy_(got_conv[0].transpose(1, 2))
                add("weight", got_conv[1])
                add("bias", got_conv[2])
                if pending is not None:  # this piece's write covered the next piece's halo rows: add theirs back
                    dxbc[r : r + 1, e - pending.shape[1] : e] += pending
                pending = dxbc[r : r + 1, s - halo : s].clone() if halo else None
                del conv, x, B, C, dconv, dx, dB, dC, got, got_conv

        def grad(name: str, like: torch.Tensor | None) -> torch.Tensor | None:
            return sums[name].to(like.dtype) if like is not None and name in sums else None

        return (dxbc, ddt, grad("weight", weight), grad("bias", bias), grad("A", A), grad("D", D),
                grad("dt_bias", dt_bias), None, None, None, None, None, None)


def piecewise_conv_scan(xbc, dt, weight, bias, A, D, dt_bias, seq_idx, ops, shape, chunk_size, dt_limit):  # noqa: ANN001, ANN201
    """The fused conv+scan over pieces of each row; (b, t, heads, head_dim)."""
    pieces = spans(xbc.shape[1], token_cost(xbc, dt, shape, chunk_size), chunk_size, weight.shape[-1] - 1)
    return _PiecewiseConvScan.apply(xbc, dt, weight, bias, A, D, dt_bias, seq_idx, ops, shape, chunk_size,
                                    dt_limit, pieces)


def piecewise_scan(scan: Callable, x: torch.Tensor, dt: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   seq_idx: torch.Tensor | None, chunk_size: int) -> torch.Tensor:
    """An autograd scan over pieces of each row, the state carried between them.

    scan(x, dt, B, C, seq_idx, initial_states) -> (y, final_states) for one piece (mamba-ssm's
    `mamba_chunk_scan_combined(..., return_final_states=True)`; gradients reach `initial_states`).
    """
    b, t, _, _ = x.shape
    cost = scan_cost(x, dt, B, C, chunk_size)
    ids = canonical_ids(seq_idx)
    rows = []
    for r in range(b):
        carry, ys = None, []
        for s, e in spans(t, cost, chunk_size, 0):
            y, carry = scan(x[r : r + 1, s:e], dt[r : r + 1, s:e], B[r : r + 1, s:e], C[r : r + 1, s:e],
                            _scan_ids(ids, r, s, e), carry)
            ys.append(y)
        rows.append(torch.cat(ys, dim=1))
    return torch.cat(rows)


def by_rows(fn: Callable[..., torch.Tensor], x: torch.Tensor, *others: torch.Tensor | None) -> torch.Tensor:
    """fn(x, *others) for per-token `fn`, over ranges of tokens whose element offsets fit (see module docstring).

    x and each of `others` are (..., width) with the same leading dimensions; the output is like x.
    """
    flat = [t.reshape(-1, t.shape[-1]) if t is not None else None for t in (x, *others)]
    rows = flat[0].shape[0]
    per_row = max(max(t.stride(0), t.shape[-1]) for t in flat if t is not None)
    if rows * per_row < OFFSET_LIMIT:
        return fn(x, *others)
    step = max(1, (OFFSET_LIMIT - 1) // per_row)
    outs = [fn(*(t[s : s + step] if t is not None else None for t in flat)) for s in range(0, rows, step)]
    return torch.cat(outs).view(*x.shape[:-1], -1)
