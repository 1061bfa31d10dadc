"""NF4 base weights (QLoRA): torchao's NF4 storage, with a fused dequantization in the linear layer.

NF4 layers become `NF4LinearLayer`, an `nn.Linear` whose forward dequantizes through a compiled kernel on CUDA
instead of torchao's `linear_nf4`, which runs about ten unfused ops over the whole weight in forward and in
backward. The dequantized weight is bit for bit torchao's `weight.to(dtype)`.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from bamba_ft.config.schema import QuantConfig
from bamba_ft.errors import ModelError

log = logging.getLogger(__name__)


def quantize_nf4(weight: torch.Tensor, cfg: QuantConfig) -> torch.Tensor:
    """`weight` as a torchao NF4Tensor with `quant.block_size` and `quant.scaler_block_size` (shrunk to fit)."""
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

    if weight.numel() % cfg.block_size:
        fits = weight.numel() & -weight.numel()  # the largest power of two that divides it
        raise ModelError(
            f"quant.block_size={cfg.block_size} does not divide the {weight.numel():,} weights of a layer of shape "
            f"{tuple(weight.shape)}.\nFix: quant.block_size={min(64, fits)} (any power of two up to {fits} divides "
            f"them; 64 is the default)."
        )
    # torchao needs the number of blocks to be a multiple of the scaler block; small layers get a smaller one.
    blocks = weight.numel() // cfg.block_size
    scaler = cfg.scaler_block_size
    while blocks % scaler:
        scaler //= 2
    return to_nf4(weight.detach(), block_size=cfg.block_size, scaler_block_size=max(scaler, 1))


@functools.cache
def _nf4_tensor_type() -> type:
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import NF4Tensor

    return NF4Tensor


# Integer types for an element's bits and for a pair of elements, by element size.
_PAIRS = {2: (torch.int16, torch.int32), 4: (torch.int32, torch.int64)}


def _dequantize_blocks(
    data: torch.Tensor, scales: torch.Tensor, table: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """NF4 codes times their block scale, rounded once to `dtype`, as (n_blocks, block_size).

    data holds (n_blocks, block_size // 2) bytes, element 2i in the high nibble of byte i and 2i + 1 in the
    low one; scales is (n_blocks, 1). The product of two 16-bit floats is exact in float32, so one rounding
    gives eager's 16-bit multiply. Where the platform allows, each pair is written as one integer twice the
    element's width: the compiled kernel then loads each byte once and stores whole words (about 1.4x faster
    on an H200 than interleaving with torch.stack).
    """
    acc = torch.promote_types(scales.dtype, torch.float32)

    def nibble(codes: torch.Tensor) -> torch.Tensor:
        return (table[codes.long()].to(acc) * scales.to(acc)).to(dtype)

    first, second = nibble(data >> 4), nibble(data & 0b1111)
    if dtype.itemsize not in _PAIRS or sys.byteorder != "little":
        return torch.stack([first, second], dim=-1).flatten(1)
    bits, pair = _PAIRS[dtype.itemsize]
    width = 8 * dtype.itemsize
    word = (first.view(bits).to(pair) & ((1 << width) - 1)) | (second.view(bits).to(pair) << width)
    return word.view(dtype)


def _block_scales(weight: torch.Tensor) -> torch.Tensor:
    """torchao's double-quantized block scales (NF4Tensor.dequantize_scalers), as (n_blocks, 1).

    Eager on purpose: one value per block (1/64 of the weight) costs little, and eager's division is
    correctly rounded where Triton's float32 division is approximate unless a version-specific inductor
    flag is set.
    """
    scalers = weight.quantized_scalers.view(-1, weight.scaler_block_size)
    scales = (scalers / weight.quantization_factor.unsqueeze(-1)).flatten().to(weight.dtype)
    scales = scales + weight.scaler_mean
    return scales.view(-1, 1)


@functools.cache
def _compiled_dequantize() -> Callable[..., torch.Tensor]:
    """`_dequantize_blocks` compiled into one kernel, built on first use on CUDA.

    `_dequantize_cuda` marks the block count dynamic and the block size static, so every weight shape of a
    model shares one graph with constant index arithmetic. Graphs then differ only by dtype and autocast
    state (forward runs under autocast, backward outside it): two for a bf16 model, within dynamo's recompile
    limit of 8 per function, which static shapes (5 block counts in Bamba-9B, times 2) would pass.
    One tile dimension: with two, inductor sizes the tiles from the first weight's block count, and a kernel
    compiled for a small layer ran 10x slower on a large one (H200).
    """
    import torch._inductor.config as inductor

    options = {"triton.max_tiles": 1} if hasattr(inductor.triton, "max_tiles") else {}
    return torch.compile(_dequantize_blocks, fullgraph=True, dynamic=None, options=options)


# Why CUDA dequantization left the compiled kernel, first time only: "failed" (never tried again) and
# "recompile_limit" (that dtype/autocast variant runs eagerly).
_FALLBACKS: dict[str, str] = {}


def _dequantize_cuda(
    data: torch.Tensor, scales: torch.Tensor, table: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """The compiled kernel; the eager ops (same bits, slower) once compiling fails, with one warning."""
    if "failed" not in _FALLBACKS:
        torch._dynamo.maybe_mark_dynamic(data, 0)
        torch._dynamo.maybe_mark_dynamic(scales, 0)
        torch._dynamo.mark_static(data, 1)
        try:
            return _compiled_dequantize()(data, scales, table, dtype)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as e:  # inductor or Triton missing or broken, or too many variants
            kind = "recompile_limit" if "LimitHit" in type(e).__name__ else "failed"
            if kind not in _FALLBACKS:
                _FALLBACKS[kind] = repr(e)
                log.warning("compiled NF4 dequantization %s (%s); using the eager ops (slower)",
                            "hit dynamo's recompile limit" if kind == "recompile_limit" else "failed", e)
    return _dequantize_blocks(data, scales, table, dtype)


def dequantize_nf4(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`weight.to(dtype)` of a torchao NF4Tensor, bit for bit: compiled on CUDA, eager elsewhere.

    torchao multiplies in the stored dtype, then casts. A float32 product rounds once to `dtype` in the
    kernel; a 16-bit one is rounded to its own dtype there and cast after, since inductor may drop a rounding
    to 16 bits that is followed by a cast to 32 (seen with torch 2.11).
    """
    data = weight.quantized_data.view(-1, weight.block_size // 2)
    scales = _block_scales(weight)
    out = dtype if weight.dtype == torch.float32 else weight.dtype
    if weight.device.type == "cuda":
        blocks = _dequantize_cuda(data, scales, weight.nf4, out)
    else:
        blocks = _dequantize_blocks(data, scales, weight.nf4, out)
    return blocks.view(weight.shape).to(dtype)


def linear_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype F.linear computes in: autocast's for a float32 input under autocast, else the input's.

    torchao dequantizes to x.dtype and lets autocast cast the weight again; dequantizing straight to the
    autocast dtype gives the same bits (the stored value rounded once) without the float32 round trip.
    """
    device = x.device.type
    if x.dtype == torch.float32 and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


class NF4Linear(torch.autograd.Function):
    """`F.linear(x, w)` for a frozen NF4 weight: torchao's `linear_nf4` with `dequantize_nf4`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight)
        return F.linear(x, dequantize_nf4(weight, linear_dtype(x)))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, None]:
        (weight,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None
        return grad @ dequantize_nf4(weight, grad.dtype), None


class NF4LinearLayer(nn.Linear):
    """An `nn.Linear` holding a frozen NF4 weight, installed by `quantize_layer` through `__class__`.

    Still an `nn.Linear` (peft wraps it in lora.Linear, bamba_ft's isinstance checks hold) with the same
    parameters and state dict; `dequantize_model` turns it back into a plain `nn.Linear`.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(self.weight, _nf4_tensor_type()):
            return super().forward(x)
        out = NF4Linear.apply(x, self.weight)
        # torchao adds the bias after the product too (not fused into addmm), so the sums round alike.
        return out if self.bias is None else out + self.bias
