"""Named Bamba architectures for `model.init=random` (benchmarks, pretraining the builtin base)."""

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
}
