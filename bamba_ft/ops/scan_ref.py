"""The exact torch reference of the Mamba-2 conv and SSD scan, with packed sequences kept apart.

Runs on any device and in float64, so tests compare every other path with it; `mixer_forward` uses it
when no CUDA kernels apply (the `torch` backend).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


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
