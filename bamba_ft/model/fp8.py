"""Float8 base weights: the frozen base's matmuls run in float8 (e4m3) on GPUs that have it, for speed.

A selected Linear becomes `FP8Linear`. Its weight W (N x K) is stored as float8_e4m3fn codes q with one float32
scale per output row, s = amax|W_row| / 448 (W ~= q * s), plus q_t = q.t().contiguous(): the backward needs the
weight the other way round, and transposing a float8 weight on every step costs nearly as much as the matmul it
feeds (measured on an H200 for Bamba-9B's shapes). q and q_t take one byte per weight each, as much as bf16: this
method is for speed; quant.method=nf4 is the one that saves memory.

Forward: the rows of x are quantized the same way (their own scale each) and `torch._scaled_mm` multiplies the
codes, applying both row scales to its float32 accumulator. Backward: the weight is frozen, so only the input
gradient is computed, dX = dY @ W = (dY * s) @ q: the weight's scales fold into the output gradient, whose rows are
quantized and multiplied by q_t. Nothing of x is kept for the backward. On CUDA both quantizations are one Triton
kernel each (bamba_ft.ops.float8).

What it trades: every base matmul's inputs (activations, weights, output gradients) are rounded to 3 mantissa
bits. On Gaussian data a matmul's output is then off by about 3.7% (relative Frobenius norm; bf16 inputs: about
0.2%). LoRA weights, norms, the scan and the loss stay in bf16/float32, and the adapter is trained against exactly
the float8 weights it will be merged into.

Needs CUDA compute capability 8.9 or newer (Ada, Hopper and later); torch runs the same ops on the CPU (slowly).
`torch._scaled_mm` needs both feature counts to be multiples of 16: other layers stay as they are.
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import nn

from bamba_ft.errors import ConfigError
from bamba_ft.model.nf4 import linear_dtype
from bamba_ft.ops import float8
from bamba_ft.ops.fused import Compiled

log = logging.getLogger(__name__)

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max  # 448
# A row of zeros gets the smallest normal float32 as its scale (its codes are zeros whatever the scale).
MIN_SCALE = torch.finfo(torch.float32).tiny
MIN_CAPABILITY = (8, 9)
ALIGNMENT = 16  # torch._scaled_mm: both dimensions of the second operand


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of `x` (M, K) as e4m3 codes (M, K) and float32 scales (M, 1): x ~= codes * scales.

    Each row's largest magnitude maps to 448, e4m3's largest value. The clamp keeps a quotient that rounds just
    above 448 from becoming NaN (e4m3fn has no infinity).
    """
    x32 = x.float()
    scale = (x32.abs().amax(dim=-1, keepdim=True) / E4M3_MAX).clamp(min=MIN_SCALE)
    return (x32 / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


def quantize_grad_rows(grad: torch.Tensor, weight_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_rows(grad * weight_scale)`: weight_scale (1, N) holds the weight's row scales, so that
    grad @ W = (grad * weight_scale) @ codes."""
    return quantize_rows(grad.float() * weight_scale)


# On CUDA both run as the Triton kernel of bamba_ft.ops.float8 (quantize_grad_rows's weight_scale is its col_scale).
_quantize = Compiled(quantize_rows, "float8 input quantization", kernel=float8.quantize_rows)
_quantize_grad = Compiled(quantize_grad_rows, "float8 gradient quantization", kernel=float8.quantize_rows)


def scaled_mm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
              dtype: torch.dtype) -> torch.Tensor:
    """(a * a_scale) @ (b * b_scale) in `dtype`: a (M, K) row-major e4m3 with scales (M, 1), b (K, N) column-major
    e4m3 with scales (1, N).

    On CUDA the row-scaled kernel writes bf16 (torch 2.11 accepts no other output type there); a float32 result
    is cast from it: bf16's rounding (0.4%) is small beside float8's.
    """
    out = torch.bfloat16 if a.is_cuda else dtype
    return torch._scaled_mm(a, b, scale_a=a_scale, scale_b=b_scale, out_dtype=out).to(dtype)


@functools.cache
def _ones(n: int, device: torch.device) -> torch.Tensor:
    """(1, n) float32 ones: the column scales of the backward's second operand (its scales are folded into the
    gradient), made once per width and device rather than on every backward."""
    return torch.ones(1, n, dtype=torch.float32, device=device)


class FP8Matmul(torch.autograd.Function):
    """x @ W.T for a frozen float8 weight (codes, row scales (N,), transposed codes); only x gets a gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, codes_t: torch.Tensor,  # noqa: ANN001
                dtype: torch.dtype) -> torch.Tensor:
        # The frozen layer's own tensors, held directly rather than through save_for_backward: saved-tensor hooks
        # (activation offload) would copy them to the host. Nothing of x is kept.
        ctx.codes_t, ctx.scale, ctx.x_dtype = codes_t, scale, x.dtype
        # contiguous rows in, contiguous (row-major) codes out, as torch._scaled_mm's first operand must be
        xq, x_scale = _quantize(x.reshape(-1, x.shape[-1]).contiguous())
        out = scaled_mm(xq, x_scale, codes.t(), scale.view(1, -1), dtype)
        return out.view(*x.shape[:-1], codes.shape[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None, None]:  # noqa: ANN001
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        codes_t, scale = ctx.codes_t, ctx.scale
        gq, g_scale = _quantize_grad(grad.reshape(-1, grad.shape[-1]).contiguous(), scale.view(1, -1))
        dx = scaled_mm(gq, g_scale, codes_t.t(), _ones(codes_t.shape[0], grad.device), ctx.x_dtype)
        return dx.view(*grad.shape[:-1], codes_t.shape[0]), None, None, None, None


def fits_fp8(module: nn.Linear) -> bool:
    """Whether torch._scaled_mm takes this layer's shape (both feature counts multiples of 16)."""
    return module.in_features % ALIGNMENT == 0 and module.out_features % ALIGNMENT == 0


class FP8Linear(nn.Linear):
    """An `nn.Linear` whose frozen weight is float8 codes (`weight`, N x K), their row scales (`weight_scale`, N,
    float32) and the transposed codes (`weight_t`, K x N), installed by `quantize_fp8` through `__class__`.

    Still an `nn.Linear` (peft wraps it in lora.Linear; `compute_dtype`, the dtype it was built in, is what peft
    casts the adapters to instead of the weight's float8). The scales and transposed codes are plain attributes,
    moved with the module by `_apply`: as buffers, DDP would broadcast them from rank 0 before every forward
    (broadcast_buffers, Lightning's default), a second copy of the base per step. They are in no state dict:
    checkpoints hold only the trained adapters, and exports dequantize (`to_linear`).
    """

    weight_scale: torch.Tensor
    weight_t: torch.Tensor
    compute_dtype: torch.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = FP8Matmul.apply(x, self.weight, self.weight_scale, self.weight_t, linear_dtype(x))
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """codes * scales (exact in float32), rounded once to `dtype`."""
        return (self.weight.float() * self.weight_scale[:, None]).to(dtype)

    def to_linear(self, dtype: torch.dtype) -> None:
        """Become a plain `nn.Linear` holding the dequantized weight in `dtype` (before merging adapters)."""
        weight = self.dequantized_weight(dtype)
        del self.weight_scale, self.weight_t, self.compute_dtype
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.__class__ = nn.Linear

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001, ANN202
        """Device moves apply to the codes, scales and transposed codes too; dtype casts (`model.to(torch.bfloat16)`,
        as Lightning's bf16-true does) leave them in their dtypes and move `compute_dtype` along with the bias."""

        def keep_dtype(t: torch.Tensor) -> torch.Tensor:
            out = fn(t)
            # a cast would round the scales: take the device only, from the tensor itself
            return t.to(out.device) if out.dtype != t.dtype else out

        self.weight_scale, self.weight_t = keep_dtype(self.weight_scale), keep_dtype(self.weight_t)
        self.compute_dtype = fn(torch.zeros((), dtype=self.compute_dtype)).dtype
        codes = self.weight
        return super()._apply(lambda t: keep_dtype(t) if t is codes else fn(t), recurse)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, float8_e4m3fn weight with row scales"


def quantize_fp8(module: nn.Linear) -> bool:
    """Turn `module` into an `FP8Linear` in place; False (left as it is) when its shape does not fit."""
    if not fits_fp8(module):
        return False
    weight = module.weight.detach()
    codes, scale = quantize_rows(weight)
    module.weight = nn.Parameter(codes, requires_grad=False)
    module.weight_scale = scale.view(-1)
    module.weight_t = codes.t().contiguous()
    module.compute_dtype = weight.dtype
    module.__class__ = FP8Linear
    return True


def check_fp8_device(device: torch.device) -> None:
    """quant.method=fp8 on a CUDA device without float8 matmuls fails here, before any weight is loaded."""
    if device.type != "cuda":
        return
    capability = torch.cuda.get_device_capability(device)
    if tuple(capability) < MIN_CAPABILITY:
        raise ConfigError(
            f"quant.method=fp8 needs float8 matmuls (CUDA compute capability {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} "
            f"or newer: Ada, Hopper and later); this GPU has {capability[0]}.{capability[1]}.\n"
            "Fix: quant.method=nf4 (4-bit base, QLoRA) or quant.method=none."
        )
