"""NVIDIA Nemotron-H (`NemotronHForCausalLM`): a stack of single-purpose blocks chosen by `layers_block_type`
(Mamba-2 mixer, attention without positional encoding, ReLU² MLP, or MoE), each `x + mixer(norm(x))`.

Its Mamba-2 mixer is Bamba's math with limits on dt (`config.time_step_limit`, e.g. `(0.01, inf)`; transformers'
default `(0, inf)` sets none; `time_step_min` only sets the initial dt bias), which bamba_ft's scan applies as the
kernels do. Its RMSNorm multiplies by the weight in float32 before rounding,
unlike Bamba's, so it keeps transformers' forward; the gated norm is Bamba's.
"""

from __future__ import annotations

from transformers import NemotronHConfig, NemotronHForCausalLM
from transformers.models.nemotron_h import modeling_nemotron_h as mn

from bamba_ft.model.families import Family, with_mixin
from bamba_ft.ops.mamba2 import GatedRMSNormKernel, SegmentAwareMixer

FAMILY = Family(
    model_type="nemotron_h",
    name="Nemotron-H",
    config_class=NemotronHConfig,
    causal_lm_class=NemotronHForCausalLM,
    base_model_class=mn.NemotronHModel,
    decoder_layer_class=mn.NemotronHBlock,
    mixer_class=mn.NemotronHMamba2Mixer,
    segment_mixer_class=with_mixin(SegmentAwareMixer, mn.NemotronHMamba2Mixer, "SegmentAware"),
    attention_class=mn.NemotronHAttention,
    fused={mn.NemotronHRMSNormGated: with_mixin(GatedRMSNormKernel, mn.NemotronHRMSNormGated, "Fused")},
    config_keys=dict(n_heads="mamba_num_heads", head_dim="mamba_head_dim", d_state="ssm_state_size",
                     n_groups="n_groups", chunk_size="chunk_size"),
    mlp_targets=("up_proj", "down_proj"),
)
