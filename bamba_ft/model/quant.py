"""torchao weight quantization of the frozen base (QLoRA), and dequantization for merging.

Quantized weights stay inside `nn.Linear` modules: bamba_ft's mixer calls every projection as a module, so
`F.linear` dispatches to the torchao tensor (int8, int4), including its backward to the input. NF4 layers
become `NF4LinearLayer`, an `nn.Linear` whose forward dequantizes through a compiled kernel on CUDA instead of
torchao's `linear_nf4`, which runs about ten unfused ops over the whole weight in forward and in backward.
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

DECODER_LINEAR = "decoder_linear"


def _nf4(weight: torch.Tensor, cfg: QuantConfig) -> torch.Tensor:
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

    if weight.numel() % cfg.block_size:
        raise ModelError(
            f"quant.block_size={cfg.block_size} does not divide a weight of shape {tuple(weight.shape)}."
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


def _linear_dtype(x: torch.Tensor) -> torch.dtype:
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
        return F.linear(x, dequantize_nf4(weight, _linear_dtype(x)))

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


def _torchao_config(cfg: QuantConfig):  # noqa: ANN202
    try:
        from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig
        from torchao.quantization.granularity import PerGroup
    except ImportError as e:
        raise ModelError(f"quant.method={cfg.method} needs torchao>=0.18 ({e}). Fix: pip install 'torchao>=0.18'.") from e
    configs = {
        "int8": Int8WeightOnlyConfig,
        "int4": lambda: IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(cfg.group_size)),
    }
    if cfg.method not in configs:
        raise ModelError(f"quant.method={cfg.method} is not a torchao weight-only method ({', '.join(configs)}).")
    return configs[cfg.method]()


def _selected(name: str, cfg: QuantConfig) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    if leaf in cfg.skip_modules or name in cfg.skip_modules:
        return False
    return DECODER_LINEAR in cfg.target_modules or leaf in cfg.target_modules


def quantize_layer(layer: nn.Module, cfg: QuantConfig) -> int:
    """Quantize the selected Linear weights of one decoder layer in place; returns how many were quantized.

    NF4 modules become `NF4LinearLayer` (same parameters, fused dequantization); an already quantized layer
    is no plain `nn.Linear` any more and is skipped.
    """
    if cfg.method == "none":
        return 0
    count = 0
    for name, module in layer.named_modules():
        if type(module) is not nn.Linear or not _selected(name, cfg):
            continue
        if cfg.method == "nf4":
            module.weight = nn.Parameter(_nf4(module.weight, cfg), requires_grad=False)
            module.__class__ = NF4LinearLayer
        else:
            from torchao.quantization import quantize_

            if cfg.method == "int4" and module.in_features % cfg.group_size:
                raise ModelError(
                    f"quant.group_size={cfg.group_size} does not divide in_features={module.in_features} of {name}."
                )
            quantize_(module, _torchao_config(cfg))
            module.weight.requires_grad_(False)
        count += 1
    return count


def is_quantized(t: torch.Tensor) -> bool:
    return type(t) not in (torch.Tensor, nn.Parameter)


def dequantize_model(model: nn.Module, dtype: torch.dtype) -> int:
    """Replace every quantized Linear weight by its dequantized `dtype` tensor (before merging adapters).

    peft wraps torchao int8 layers in TorchaoLoraLinear, whose merge re-quantizes; once the base is plain
    again those layers become ordinary LoRA layers, so merging folds the adapter into float weights.
    `NF4LinearLayer`s become plain `nn.Linear` again.
    """
    from peft.tuners.lora.layer import Linear as LoraLinear
    from peft.tuners.lora.torchao import TorchaoLoraLinear

    count = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, nn.Linear) and weight is not None and is_quantized(weight):
            plain = weight.get_original_weight() if hasattr(weight, "get_original_weight") else weight.dequantize()
            module.weight = nn.Parameter(plain.to(dtype), requires_grad=False)
            count += 1
        if isinstance(module, NF4LinearLayer):
            module.__class__ = nn.Linear
    for module in model.modules():
        if isinstance(module, TorchaoLoraLinear):
            module.__class__ = LoraLinear
    return count


def _tensor_bytes(t: torch.Tensor) -> int:
    if not is_quantized(t):
        return t.numel() * t.element_size()
    inner, _ = t.__tensor_flatten__()
    return sum(_tensor_bytes(getattr(t, name)) for name in inner)


def base_weight_bytes(model: nn.Module) -> int:
    """Bytes held by the base model's weights, adapters excluded (quantized tensors by their packed storage)."""
    return sum(_tensor_bytes(p) for n, p in model.named_parameters() if "lora_" not in n)


def report_base_memory(model: nn.Module, cfg: QuantConfig) -> None:
    n = sum(1 for m in model.modules() if isinstance(m, nn.Linear) and is_quantized(m.weight))
    size = base_weight_bytes(model)
    shown = f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.2f} MiB"
    log.info("base weights: %s (%d Linear layers %s)", shown, n, cfg.method)
