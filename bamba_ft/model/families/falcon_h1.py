"""TII Falcon-H1 (`FalconH1ForCausalLM`): every layer runs a Mamba-2 mixer and attention side by side on the
same normed input, then a SwiGLU MLP; muP multipliers scale nearly every path.

The mixer differs from Bamba's in three places, reproduced exactly: its input is scaled by `ssm_in_multiplier`
before `in_proj`; the `in_proj` output is multiplied by the per-channel `mup_vector` (from `ssm_multipliers`:
gate, x, B, C, dt); and the gate goes through Falcon's own gated RMSNorm (groups, `mamba_norm_before_gate`) when
`mamba_rms_norm`, else the output is just `y * silu(gate)`. The mixer width is `mamba_d_ssm`. The layer's other
multipliers (ssm_out, attention in/out, key, MLP, embedding) stay in transformers' decoder code, which runs
unchanged; logits are multiplied by `lm_head_multiplier`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import FalconH1Config, FalconH1ForCausalLM
from transformers.models.falcon_h1 import modeling_falcon_h1 as mf

from bamba_ft.model.families import Family, with_mixin
from bamba_ft.ops.fused import RMSNormKernel
from bamba_ft.ops.mamba2 import SegmentAwareMixer


class SegmentAwareFalconH1Mixer(SegmentAwareMixer, mf.FalconH1Mixer):
    """Falcon-H1's mixer with the segment-aware forward."""

    def project_in(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.in_proj(hidden_states * self.ssm_in_multiplier) * self.mup_vector

    def gated_norm(self, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        if self.mamba_rms_norm:
            return self.norm(y, gate)
        return y * F.silu(gate)


FAMILY = Family(
    model_type="falcon_h1",
    name="Falcon-H1",
    config_class=FalconH1Config,
    causal_lm_class=FalconH1ForCausalLM,
    base_model_class=mf.FalconH1Model,
    decoder_layer_class=mf.FalconH1DecoderLayer,
    mixer_class=mf.FalconH1Mixer,
    segment_mixer_class=SegmentAwareFalconH1Mixer,
    attention_class=mf.FalconH1Attention,
    fused={mf.FalconH1RMSNorm: with_mixin(RMSNormKernel, mf.FalconH1RMSNorm, "Fused")},
    config_keys=dict(n_heads="mamba_n_heads", head_dim="mamba_d_head", d_state="mamba_d_state",
                     n_groups="mamba_n_groups", chunk_size="mamba_chunk_size"),
    mlp_targets=("gate_proj", "up_proj", "down_proj"),
    logit_scale=lambda config: config.lm_head_multiplier,
)
