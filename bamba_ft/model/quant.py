"""Quantization of the frozen base (torchao's int8/int4/NF4 for QLoRA; float8), and dequantization for merging.

Quantized weights stay inside `nn.Linear` modules: bamba_ft's mixer calls every projection as a module, so
`F.linear` dispatches to the torchao tensor (int8, int4), including its backward to the input. NF4 layers
become `NF4LinearLayer` (bamba_ft.model.nf4), whose forward dequantizes through a fused kernel; fp8 layers become
`FP8Linear` (bamba_ft.model.fp8), whose matmuls run in float8.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from bamba_ft.config.schema import QuantConfig
from bamba_ft.errors import ModelError, pick
from bamba_ft.model.fp8 import FP8Linear, check_fp8_device, quantize_fp8
from bamba_ft.model.nf4 import NF4LinearLayer, quantize_nf4

log = logging.getLogger(__name__)

DECODER_LINEAR = "decoder_linear"
FLOAT8 = (torch.float8_e4m3fn, torch.float8_e5m2)


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
    return pick(configs, cfg.method, "quant.method", where="the torchao weight-only methods")()


def _selected(name: str, cfg: QuantConfig) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    if leaf in cfg.skip_modules or name in cfg.skip_modules:
        return False
    return DECODER_LINEAR in cfg.target_modules or leaf in cfg.target_modules


def _to_nf4(module: nn.Linear, name: str, cfg: QuantConfig) -> bool:
    module.weight = nn.Parameter(quantize_nf4(module.weight, cfg), requires_grad=False)
    module.__class__ = NF4LinearLayer
    return True


def _to_fp8(module: nn.Linear, name: str, cfg: QuantConfig) -> bool:
    return quantize_fp8(module)


def _to_torchao(module: nn.Linear, name: str, cfg: QuantConfig) -> bool:
    from torchao.quantization import quantize_

    if cfg.method == "int4" and module.in_features % cfg.group_size:
        raise ModelError(
            f"quant.group_size={cfg.group_size} does not divide in_features={module.in_features} of {name}."
        )
    quantize_(module, _torchao_config(cfg))
    module.weight.requires_grad_(False)
    return True


# quant.method -> how one selected Linear is quantized in place, False where it stays as it is (none: every layer
# stays as it is).
_QUANTIZERS: dict[str, Callable[[nn.Linear, str, QuantConfig], bool] | None] = {
    "none": None,
    "nf4": _to_nf4,
    "int8": _to_torchao,
    "int4": _to_torchao,
    "fp8": _to_fp8,
}


def check_quant_device(cfg: QuantConfig, device: torch.device) -> None:
    """Refuse a method the device cannot run, before anything is loaded."""
    if cfg.method == "fp8":
        check_fp8_device(device)


def quantize_layer(layer: nn.Module, cfg: QuantConfig) -> int:
    """Quantize the selected Linear weights of one decoder layer in place; returns how many were quantized.

    NF4 modules become `NF4LinearLayer` (same parameters, fused dequantization), fp8 ones `FP8Linear` (those
    whose shape fits); an already quantized layer is no plain `nn.Linear` any more and is skipped.
    """
    quantize = pick(_QUANTIZERS, cfg.method, "quant.method")
    if quantize is None:
        return 0
    count = 0
    for name, module in layer.named_modules():
        if type(module) is not nn.Linear or not _selected(name, cfg):
            continue
        count += quantize(module, name, cfg)
    return count


def is_quantized(t: torch.Tensor) -> bool:
    """A torchao tensor subclass (nf4, int8, int4) or float8 codes (fp8)."""
    return type(t) not in (torch.Tensor, nn.Parameter) or t.dtype in FLOAT8


def dequantize_model(model: nn.Module, dtype: torch.dtype) -> int:
    """Replace every quantized Linear weight by its dequantized `dtype` tensor (before merging adapters).

    peft wraps torchao int8 layers in TorchaoLoraLinear, whose merge re-quantizes; once the base is plain
    again those layers become ordinary LoRA layers, so merging folds the adapter into float weights.
    `NF4LinearLayer`s become plain `nn.Linear` again, as do `FP8Linear`s (codes times scales).
    """
    from peft.tuners.lora.layer import Linear as LoraLinear
    from peft.tuners.lora.torchao import TorchaoLoraLinear

    count = 0
    for module in model.modules():
        if isinstance(module, FP8Linear):
            module.to_linear(dtype)
            count += 1
            continue
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
    if type(t) in (torch.Tensor, nn.Parameter):
        return t.numel() * t.element_size()
    inner, _ = t.__tensor_flatten__()
    return sum(_tensor_bytes(getattr(t, name)) for name in inner)


def base_weight_bytes(model: nn.Module) -> int:
    """Bytes held by the base model's weights, adapters excluded (quantized tensors by their packed storage; fp8
    layers with their scales and transposed codes)."""
    held = [p for n, p in model.named_parameters() if "lora_" not in n]
    held += [t for m in model.modules() if isinstance(m, FP8Linear) for t in (m.weight_scale, m.weight_t)]
    return sum(_tensor_bytes(t) for t in held)


def report_base_memory(model: nn.Module, cfg: QuantConfig) -> None:
    n = sum(1 for m in model.modules() if isinstance(m, nn.Linear) and is_quantized(m.weight))
    size = base_weight_bytes(model)
    shown = f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.2f} MiB"
    log.info("base weights: %s (%d Linear layers %s)", shown, n, cfg.method)
    kept = [name for layer in model.model.layers for name, m in layer.named_modules()
            if type(m) is nn.Linear and _selected(name, cfg) and not is_quantized(m.weight)]
    if kept:
        log.info("%d selected Linear layers kept in %s (%s): quant.method=%s needs in and out features that are "
                 "multiples of 16", len(kept), str(model.dtype).removeprefix("torch."),
                 ", ".join(sorted({k.rsplit(".", 1)[-1] for k in kept})), cfg.method)
