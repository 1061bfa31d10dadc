"""Model families bamba_ft fine-tunes: one small module per transformers `model_type`.

A family says which transformers classes make up the model, which mixer class gets bamba_ft's segment-aware
forward (and how that mixer differs from Bamba's), which norms take the fused CUDA kernels, the names of the
Mamba-2 fields in its config, its LM head scale, which LoRA targets it has, and whether sdpa/eager attention keep
packed sequences apart. Every transformers Mamba-2 mixer keeps `in_proj`, `conv1d`, `dt_bias`, `A_log`, `D`,
`norm` and `out_proj` under those names, so the mixer forward itself is shared (bamba_ft/ops/mamba2.py).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from bamba_ft.errors import ConfigError


@dataclass(frozen=True)
class Family:
    model_type: str
    name: str
    """What the family is called in text (model cards): Bamba, Granite 4.0-H, ..."""
    config_class: type
    causal_lm_class: type
    base_model_class: type
    """The decoder stack (`causal_lm.model`): its forward gets the packing keyword completion hook."""
    decoder_layer_class: type
    """The class of every entry of `model.layers`: one FSDP unit each (bamba_ft/model/shard.py)."""
    mixer_class: type
    """transformers' Mamba-2 mixer of this family."""
    segment_mixer_class: type
    """Its segment-aware subclass (bamba_ft.ops.mamba2.SegmentAwareMixer first in the MRO)."""
    attention_class: type
    """transformers' attention module of this family (which layers `model.gradient_checkpointing=attention` picks)."""
    fused: dict[type, type] = field(default_factory=dict)
    """transformers class -> subclass with a fused CUDA forward (same math; transformers' forward on the CPU)."""
    config_keys: dict[str, str] = field(default_factory=dict)
    """Generic Mamba-2 field -> this family's config attribute: n_heads, head_dim, d_state, n_groups, chunk_size."""
    mlp_targets: tuple[str, ...] = ()
    """Linear leaf names of the MLP / shared-expert / expert-free feed-forward (for LoRA on the MLP too)."""
    packed_masks: bool = True
    """sdpa/eager keep packed sequences apart (the decoder builds its mask from packed `position_ids`). When
    False only `varlen` and `flash_attention_2` (which read `cu_seq_lens_*`) are packing-safe."""
    logit_scale: Callable[[Any], float] = lambda config: 1.0
    """logits = lm_head(hidden) * logit_scale(config), as the family's ForCausalLM computes them."""
    router_aux_loss: Callable[[Any, tuple, Any], Any] | None = None
    """MoE families: (config, the decoder's router_logits, the batch's 2-D attention mask or None) -> the routers'
    load-balancing loss, which the family's ForCausalLM adds to its loss, times config.router_aux_loss_coef, when
    config.output_router_logits is set."""

    @property
    def stock_classes(self) -> dict[type, type]:
        """Our class -> transformers' class."""
        return {ours: stock for stock, ours in self.fused.items()} | {self.segment_mixer_class: self.mixer_class}


@functools.cache
def with_mixin(mixin: type, cls: type, prefix: str) -> type:
    """`class <prefix><cls>(mixin, cls)`, made once per pair (so isinstance against it is stable)."""
    return type(f"{prefix}{cls.__name__}", (mixin, cls), {"__module__": cls.__module__})


SUPPORTED = ("bamba", "granitemoehybrid", "falcon_h1", "nemotron_h")  # module names in this package, one per model_type

# Families whose checkpoints bamba_ft refuses, with the reason (model_type -> why).
REFUSED: dict[str, str] = {
    "zamba2": (
        "Zamba2's shared transformer blocks are one set of weights tied across several hybrid layers "
        "(`_tied_weights_keys`), each use with its own built-in adapter and its own attention cache slot. peft "
        "would give every use its own LoRA adapter on the same tied weight, which cannot be merged back into one "
        "weight, so an export would not be the model that was trained; and its shared attention takes the "
        "layer index as an argument that bamba_ft's packed attention path does not carry."
    ),
}


def has_attention_layers(model: nn.Module) -> bool:
    """Whether `model` holds layers of its family's attention class (an attention-free Granite 4.0-H holds none).
    transformers' generate sizes the attention mask through the cache's attention layers and raises for a cache
    without any, so such a model generates without a cache."""
    try:
        attention = family_for(getattr(getattr(model, "config", None), "model_type", "bamba")).attention_class
    except ConfigError:
        return True
    return any(isinstance(m, attention) for m in model.modules())


@functools.cache
def families() -> dict[str, Family]:
    import importlib

    modules = [importlib.import_module(f"{__name__}.{name}") for name in SUPPORTED]
    return {m.FAMILY.model_type: m.FAMILY for m in modules}


def family_for(model_type: str, where: str = "model.name_or_path") -> Family:
    """The family of `model_type`, or a ConfigError naming the supported ones (and why, for refused ones)."""
    found = families().get(model_type)
    if found is not None:
        return found
    supported = ", ".join(families())
    if model_type in REFUSED:
        raise ConfigError(f"{where}: model_type '{model_type}' is not supported: {REFUSED[model_type]}\n"
                          f"Supported model types: {supported}.")
    raise ConfigError(f"{where}: model_type '{model_type}' is not a Mamba-2 hybrid bamba_ft supports.\n"
                      f"Supported model types: {supported}.")


def family_of(model: nn.Module) -> Family:
    """The family of a built model (a peft wrapper, the ForCausalLM or its decoder stack)."""
    config = getattr(model, "config", None)
    if config is None and hasattr(model, "get_base_model"):
        config = model.get_base_model().config
    if config is None:
        raise ConfigError(f"{type(model).__name__} has no transformers config; bamba_ft needs a transformers model.")
    return family_for(config.model_type)
