"""torchao weight quantization of the frozen base (QLoRA), and dequantization for merging.

Quantized weights stay inside `nn.Linear` modules: bamba_ft's mixer calls every projection as a module, so
`F.linear` dispatches to the torchao tensor (int8, int4), including its backward to the input. NF4 layers
become `NF4LinearLayer` (bamba_ft.model.nf4), whose forward dequantizes through a fused kernel.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from bamba_ft.config.schema import QuantConfig
from bamba_ft.errors import ModelError, pick
from bamba_ft.model.nf4 import NF4LinearLayer, quantize_nf4

log = logging.getLogger(__name__)

DECODER_LINEAR = "decoder_linear"


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


def _to_nf4(module: nn.Linear, name: str, cfg: QuantConfig) -> None:
    module.weight = nn.Parameter(quantize_nf4(module.weight, cfg), requires_grad=False)
    module.__class__ = NF4LinearLayer


def _to_torchao(module: nn.Linear, name: str, cfg: QuantConfig) -> None:
    from torchao.quantization import quantize_

    if cfg.method == "int4" and module.in_features % cfg.group_size:
        raise ModelError(
            f"quant.group_size={cfg.group_size} does not divide in_features={module.in_features} of {name}."
        )
    quantize_(module, _torchao_config(cfg))
    module.weight.requires_grad_(False)


# quant.method -> how one selected Linear is quantized in place (none: every layer stays as it is).
_QUANTIZERS: dict[str, Callable[[nn.Linear, str, QuantConfig], None] | None] = {
    "none": None,
    "nf4": _to_nf4,
    "int8": _to_torchao,
    "int4": _to_torchao,
}


def quantize_layer(layer: nn.Module, cfg: QuantConfig) -> int:
    """Quantize the selected Linear weights of one decoder layer in place; returns how many were quantized.

    NF4 modules become `NF4LinearLayer` (same parameters, fused dequantization); an already quantized layer
    is no plain `nn.Linear` any more and is skipped.
    """
    quantize = pick(_QUANTIZERS, cfg.method, "quant.method")
    if quantize is None:
        return 0
    count = 0
    for name, module in layer.named_modules():
        if type(module) is not nn.Linear or not _selected(name, cfg):
            continue
        quantize(module, name, cfg)
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
