"""Row-wise float8 (e4m3) quantization on CUDA as one Triton kernel: the fp8 base's per-step quantizations.

`quant.method=fp8` quantizes every base matmul's input rows in the forward and its output-gradient rows in the
backward. Each is memory-bound: read a bf16 row, find its largest magnitude, write one byte per element and one
scale. torch.compile of the same math (dynamic shapes) made a reduction kernel and a pointwise kernel with float32
intermediates; this kernel is one program per row that reads the row twice (the second time from L2) and writes
only the codes and the scale.

The math is `bamba_ft.model.fp8.quantize_rows` (optionally times per-column scales first, for the gradient): the
scale is amax / 448 (at least the smallest normal float32), each element is divided by it (IEEE division), clamped
to +-448 and rounded to nearest-even e4m3. On the CPU, or where this kernel fails, callers run that function
(bamba_ft.ops.fused.Compiled).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs: callers run the torch reference (quantize_rows is CUDA-only)
    triton = None


if triton is not None:

    @triton.jit
    def _scaled_block(x_row, col_scale_ptr, cols, n_cols, HAS_COL_SCALE: tl.constexpr):
        mask = cols < n_cols
        v = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_COL_SCALE:
            v = v * tl.load(col_scale_ptr + cols, mask=mask, other=0.0)
        return v

    @triton.jit
    def _quantize_rows_kernel(x_ptr, col_scale_ptr, q_ptr, s_ptr, n_cols, x_stride, q_stride,
                              HAS_COL_SCALE: tl.constexpr, BLOCK: tl.constexpr, QMAX: tl.constexpr,
                              MIN_SCALE: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row * x_stride
        q_row = q_ptr + row * q_stride
        amax = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK):
            v = _scaled_block(x_row, col_scale_ptr, start + tl.arange(0, BLOCK), n_cols, HAS_COL_SCALE)
            amax = tl.maximum(amax, tl.abs(v))
        scale = tl.maximum(tl.max(amax, axis=0) / QMAX, MIN_SCALE)
        tl.store(s_ptr + row, scale)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            v = _scaled_block(x_row, col_scale_ptr, cols, n_cols, HAS_COL_SCALE)
            q = tl.minimum(tl.maximum(tl.math.div_rn(v, scale), -QMAX), QMAX)
            tl.store(q_row + cols, q.to(tl.float8e4nv), mask=cols < n_cols)


def quantize_rows(x: torch.Tensor, col_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of `x` (M, K; CUDA, rows contiguous), each first multiplied by `col_scale` (K floats) if given, as
    e4m3 codes (M, K, row-major) and float32 scales (M, 1)."""
    m, k = x.shape
    assert x.stride(1) == 1, "rows must be contiguous"
    codes = torch.empty((m, k), dtype=torch.float8_e4m3fn, device=x.device)
    scales = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m == 0:
        return codes, scales
    has_col_scale = col_scale is not None
    col = col_scale.reshape(-1).float().contiguous() if has_col_scale else scales  # unread without col_scale
    block = min(2048, triton.next_power_of_2(k))
    _quantize_rows_kernel[(m,)](
        x, col, codes, scales, k, x.stride(0), codes.stride(0), HAS_COL_SCALE=has_col_scale, BLOCK=block,
        QMAX=torch.finfo(torch.float8_e4m3fn).max, MIN_SCALE=torch.finfo(torch.float32).tiny,
        num_warps=8 if block >= 2048 else 4,
    )
    return codes, scales
