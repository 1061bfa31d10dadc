"""torchao weight quantization of the frozen base (QLoRA), and dequantization for merging.

Quantized weights stay inside ordinary `nn.Linear` modules: bamba_ft's mixer calls every projection as a
module, so `F.linear` dispatches to the torchao tensor (NF4, int8, int4), including its backward to the input.
"""

from __future__ import annotations

import logging

import torch
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


def _torchao_config(cfg: QuantConfig):  # noqa: ANN202
    try:
        from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig
        from torchao.quantization.granularity import PerGroup
    except ImportError as e:
        raise ModelError(f"quant.method={cfg.method} needs torchao>=0.18 ({e}). Fix: pip install 'torchao>=0.18'.") from e
    if cfg.method == "int8":
        return Int8WeightOnlyConfig()
    return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(cfg.group_size))


def _selected(name: str, cfg: QuantConfig) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    if leaf in cfg.skip_modules or name in cfg.skip_modules:
        return False
    return DECODER_LINEAR in cfg.target_modules or leaf in cfg.target_modules


def quantize_layer(layer: nn.Module, cfg: QuantConfig) -> int:
    """Quantize the selected Linear weights of one decoder layer in place; returns how many were quantized."""
    if cfg.method == "none":
        return 0
    count = 0
    for name, module in layer.named_modules():
        if type(module) is not nn.Linear or not _selected(name, cfg):
            continue
        if cfg.method == "nf4":
            module.weight = nn.Parameter(_nf4(module.weight, cfg), requires_grad=False)
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
