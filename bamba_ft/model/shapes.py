"""Named architectures for `model.init=random` (benchmarks, pretraining the builtin base, offline smoke runs).

Each entry is the keyword arguments of its family's transformers config, plus `model_type` (default `bamba`).
The `tiny-random-<model_type>` shapes are small random models of each supported family: vocabulary 128 (the
builtin character tokenizer's), a Mamba-2 layer on each side of an attention layer, and non-trivial values for
every multiplier the family has, so that tests and offline runs exercise them.
"""

from __future__ import annotations

from typing import Any

SHAPES: dict[str, dict[str, Any]] = {
    # builtin:tiny: 4 layers (attention at layer 2), 0.8M parameters, character vocabulary.
    "tiny": dict(
        vocab_size=128,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        attn_layer_indices=[2],
        num_attention_heads=4,
        num_key_value_heads=2,
        mamba_n_heads=8,
        mamba_d_head=32,
        mamba_d_state=32,
        mamba_n_groups=1,
        mamba_chunk_size=32,
        mamba_expand=2,
        max_position_embeddings=4096,
        pad_token_id=0,
        eos_token_id=2,
        bos_token_id=None,
    ),
    # ibm-ai-platform/Bamba-9B-v2 (config.json): 9.78B parameters.
    "bamba-9b": dict(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        attn_layer_indices=[9, 18, 27],
        num_attention_heads=32,
        num_key_value_heads=8,
        mamba_n_heads=128,
        mamba_d_head=64,
        mamba_d_state=128,
        mamba_n_groups=1,
        mamba_d_conv=4,
        mamba_chunk_size=256,
        mamba_expand=2,
        max_position_embeddings=262144,
    ),
    # Granite 4.0-H style: NoPE attention, a shared MLP and top-k MoE experts in every layer.
    "tiny-random-granitemoehybrid": dict(
        model_type="granitemoehybrid",
        vocab_size=128,
        hidden_size=64,
        intermediate_size=32,
        shared_intermediate_size=64,
        num_local_experts=4,
        num_experts_per_tok=2,
        num_hidden_layers=3,
        layer_types=["mamba", "attention", "mamba"],
        num_attention_heads=4,
        num_key_value_heads=2,
        mamba_n_heads=4,
        mamba_d_head=32,
        mamba_d_state=16,
        mamba_n_groups=1,
        mamba_chunk_size=16,
        position_embedding_type="nope",
        embedding_multiplier=2.0,
        residual_multiplier=0.5,
        attention_multiplier=0.25,
        logits_scaling=4.0,
        max_position_embeddings=4096,
        pad_token_id=0,
        eos_token_id=2,
        bos_token_id=None,
        tie_word_embeddings=True,
    ),
    # ibm-granite/granite-4.0-h-tiny: 7B parameters (1B active). Shape fields from its published config.json (as
    # copied in a public test fixture; the multipliers, which do not change the cost, keep the config defaults).
    "granite-4.0-h-tiny": dict(
        model_type="granitemoehybrid",
        vocab_size=100352,
        hidden_size=1536,
        intermediate_size=512,
        shared_intermediate_size=1024,
        num_local_experts=64,
        num_experts_per_tok=6,
        num_hidden_layers=40,
        layer_types=(["mamba"] * 5 + ["attention"] + ["mamba"] * 9 + ["attention"] + ["mamba"] * 9 + ["attention"]
                     + ["mamba"] * 9 + ["attention"] + ["mamba"] * 4),
        num_attention_heads=12,
        num_key_value_heads=4,
        mamba_n_heads=48,
        mamba_d_head=64,
        mamba_d_state=128,
        mamba_n_groups=1,
        mamba_d_conv=4,
        mamba_chunk_size=256,
        mamba_expand=2,
        position_embedding_type="nope",
        max_position_embeddings=131072,
        tie_word_embeddings=True,
    ),
    # Falcon-H1 style: Mamba-2 and attention in parallel in each layer, muP multipliers all away from 1, a mixer
    # width (mamba_d_ssm) unrelated to the hidden size, Falcon's grouped gated RMSNorm.
    "tiny-random-falcon_h1": dict(
        model_type="falcon_h1",
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        mamba_d_ssm=96,
        mamba_n_heads=4,
        mamba_d_head=24,
        mamba_d_state=16,
        mamba_n_groups=1,
        mamba_chunk_size=16,
        mamba_rms_norm=True,
        mamba_norm_before_gate=False,
        embedding_multiplier=2.0,
        lm_head_multiplier=0.5,
        attention_in_multiplier=0.7,
        attention_out_multiplier=1.3,
        key_multiplier=0.9,
        ssm_in_multiplier=0.8,
        ssm_out_multiplier=1.2,
        ssm_multipliers=[1.1, 0.6, 1.4, 0.8, 1.3],
        mlp_multipliers=[1.1, 0.9],
        max_position_embeddings=4096,
        pad_token_id=0,
        eos_token_id=2,
        bos_token_id=None,
    ),
}
