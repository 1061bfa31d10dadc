"""IBM Bamba (`BambaForCausalLM`): Mamba-2 layers with attention at `attn_layer_indices`, SwiGLU MLPs."""

from __future__ import annotations

from transformers import BambaConfig, BambaForCausalLM
from transformers.models.bamba import modeling_bamba as mb

from bamba_ft.model.families import Family
from bamba_ft.ops.fused import FusedBambaMLP, FusedRMSNorm
from bamba_ft.ops.mamba2 import FusedGatedRMSNorm, SegmentAwareBambaMixer

FAMILY = Family(
    model_type="bamba",
    name="Bamba",
    config_class=BambaConfig,
    causal_lm_class=BambaForCausalLM,
    base_model_class=mb.BambaModel,
    decoder_layer_class=mb.BambaDecoderLayer,
    mixer_class=mb.BambaMixer,
    segment_mixer_class=SegmentAwareBambaMixer,
    attention_class=mb.BambaAttention,
    fused={mb.BambaRMSNormGated: FusedGatedRMSNorm, mb.BambaMLP: FusedBambaMLP, mb.BambaRMSNorm: FusedRMSNorm},
    config_keys=dict(n_heads="mamba_n_heads", head_dim="mamba_d_head", d_state="mamba_d_state",
                     n_groups="mamba_n_groups", chunk_size="mamba_chunk_size"),
    mlp_targets=("gate_proj", "up_proj", "down_proj"),
)
