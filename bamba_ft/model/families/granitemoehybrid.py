"""IBM Granite 4.0 hybrids (`GraniteMoeHybridForCausalLM`): Mamba-2 and attention layers by `layer_types`, each
followed by a shared SwiGLU MLP (`shared_mlp.input_linear/output_linear`) plus, when `num_local_experts > 0`,
a top-k MoE whose experts are 3-D parameters (not Linear modules, so LoRA does not reach them). Attention-free
variants have every layer a Mamba-2 layer. Granite 4.0-H uses no positional encoding (NoPE).

Its mixer is Bamba's (same fields, same math). The decoder builds its attention mask without `position_ids`, so
sdpa/eager attention would let packed sequences see each other: packing needs varlen or flash attention, which
read `cu_seq_lens_*`. Logits are divided by `logits_scaling`. With `output_router_logits` in its config, training
adds the routers' load-balancing loss times `router_aux_loss_coef`, as its ForCausalLM does.
"""

from __future__ import annotations

from transformers import GraniteMoeHybridConfig, GraniteMoeHybridForCausalLM
from transformers.models.granitemoehybrid import modeling_granitemoehybrid as mg

from bamba_ft.model.families import Family, with_mixin
from bamba_ft.ops.fused import RMSNormKernel
from bamba_ft.ops.mamba2 import GatedRMSNormKernel, SegmentAwareMixer

FAMILY = Family(
    model_type="granitemoehybrid",
    name="Granite 4.0-H",
    config_class=GraniteMoeHybridConfig,
    causal_lm_class=GraniteMoeHybridForCausalLM,
    base_model_class=mg.GraniteMoeHybridModel,
    decoder_layer_class=mg.GraniteMoeHybridDecoderLayer,
    mixer_class=mg.GraniteMoeHybridMambaLayer,
    segment_mixer_class=with_mixin(SegmentAwareMixer, mg.GraniteMoeHybridMambaLayer, "SegmentAware"),
    attention_class=mg.GraniteMoeHybridAttention,
    fused={
        mg.GraniteMoeHybridRMSNormGated: with_mixin(GatedRMSNormKernel, mg.GraniteMoeHybridRMSNormGated, "Fused"),
        mg.GraniteMoeHybridRMSNorm: with_mixin(RMSNormKernel, mg.GraniteMoeHybridRMSNorm, "Fused"),
    },
    config_keys=dict(n_heads="mamba_n_heads", head_dim="mamba_d_head", d_state="mamba_d_state",
                     n_groups="mamba_n_groups", chunk_size="mamba_chunk_size"),
    mlp_targets=("input_linear", "output_linear"),
    packed_masks=False,
    logit_scale=lambda config: 1.0 / config.logits_scaling,
    router_aux_loss=lambda config, router_logits, mask: mg.load_balancing_loss_func(
        router_logits, config.num_local_experts, config.num_experts_per_tok, mask),
)
