"""Shared fixtures: tiny seeded Bamba models built from configs (no downloads), the builtin tokenizer."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# pytest -n N (pytest-xdist): N workers share the cores, so each computes on one thread, and so do the CLI processes
# it starts (they inherit OMP_NUM_THREADS): two OpenMP threads per worker on two cores spin-wait for each other.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from bamba_ft import quiet  # noqa: E402

quiet.silence_import_noise()

from transformers import BambaConfig, BambaForCausalLM  # noqa: E402

torch.set_num_threads(min(1 if WORKERS > 1 else 2, torch.get_num_threads()))

# Every projection LoRA can reach in a Bamba layer: the mixer's in/out projections and the attention's q/k/v/o.
LORA_TARGETS = ["in_proj", "out_proj", "q_proj", "k_proj", "v_proj", "o_proj"]


def tiny_config(**overrides) -> BambaConfig:
    """The STYLE.md test shape: 2 layers (Mamba-2, attention), 122k parameters."""
    kw = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        attn_layer_indices=[1],
        num_attention_heads=4,
        num_key_value_heads=2,
        mamba_n_heads=4,
        mamba_d_head=32,
        mamba_d_state=16,
        mamba_chunk_size=16,
        use_cache=False,
        pad_token_id=0,
    )
    kw.update(overrides)
    return BambaConfig(**kw)


def randomize_mixer_params(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-default A_log, D, dt_bias, conv and norm weights: the defaults (ones, log 1..H) hide indexing errors."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("A_log", "D", "dt_bias")) or ".norm.weight" in name or "layernorm" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * 0.5 + (1.0 if "norm" in name else 0.0))


def make_model(dtype: torch.dtype = torch.float64, seed: int = 0, attn: str = "sdpa", **overrides) -> BambaForCausalLM:
    torch.manual_seed(seed)
    cfg = tiny_config(**overrides)
    cfg._attn_implementation = attn
    model = BambaForCausalLM(cfg).to(dtype)
    randomize_mixer_params(model, seed)
    return model.eval()


@pytest.fixture
def tiny_bamba() -> BambaForCausalLM:
    return make_model(torch.float32)


@pytest.fixture(scope="session")
def builtin_tokenizer():
    from bamba_ft.data.builtin import build_char_tokenizer

    return build_char_tokenizer()


def pytest_collection_modifyitems(config, items) -> None:  # noqa: ANN001
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on a GPU machine: pytest -m gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
