"""The benchmark on a GPU (`pytest -m gpu`): its warm-up leaves no kernel compilation to the timed steps."""

from __future__ import annotations

import pytest
import torch

from bamba_ft.config.schema import BenchConfig, Mixer, ModelConfig, PeftConfig
from bamba_ft.jobs import bench_batches, bench_parts, bench_variants
from bamba_ft.model.lora import apply_peft
from bamba_ft.model.mixer import install_mixer
from bamba_ft.ops.kernels import available_backend
from tests.conftest import make_model

pytestmark = pytest.mark.gpu
CHUNK = 256
# The gated norm normalises groups of 2,048 channels (32 heads x 64), so its backward spreads the rows over one
# program per SM, as at the Bamba-9B shape.
SHAPE = dict(vocab_size=512, hidden_size=1024, intermediate_size=1024, mamba_n_heads=32, mamba_d_head=64,
             mamba_d_state=64, mamba_chunk_size=CHUNK, num_attention_heads=8, num_key_value_heads=2)


def test_warmup_leaves_no_compilation_to_timed_steps_at_the_lengths_that_specialise() -> None:
    """Timed steps at packed lengths that make a derived length a multiple of 16 (chunk count, rows per program
    of the norm's backward), with the length itself a multiple of 16 or not: after the benchmark's warm-up none
    of them compiles a kernel (`compiled_each`, recorded through Triton's compile hook)."""
    if available_backend("cuda") == Mixer.TORCH:
        pytest.skip("mamba-ssm is not installed: no CUDA kernels to compile")
    device = torch.device("cuda")
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    model = make_model(torch.float32, **SHAPE).to(device).to(torch.bfloat16)
    install_mixer(model, "auto")
    model = apply_peft(model, PeftConfig(), fused=True)
    model.train()
    rows = 32 * sms - (1 if (32 * sms - 1) % 16 else 2)  # 32 rows per program, not a multiple of 16
    hard = [16 * CHUNK - 134, 16 * CHUNK - 128, rows, 32 * sms, 5000]  # chunk counts 16, 16; rows 32, 32
    b = BenchConfig(warmup_steps=4, steps=len(hard), seqs_per_step=8, median_len=500, max_len=4096)
    steps = bench_batches.make_steps(b, SHAPE["vocab_size"], 0, divisors=(CHUNK, sms))
    lengths = [[len(s) for s in step] for step in steps[b.warmup_steps :]]
    for step, tokens in zip(lengths, hard):
        bench_batches.resize_step(step, tokens, b.max_len)
    steps[b.warmup_steps :] = bench_batches.random_tokens(lengths, SHAPE["vocab_size"], 1)
    result = bench_variants.measure(bench_variants.VARIANTS["bamba_ft"], model, steps, b, device)
    assert result["tokens_each"] == hard
    assert result["compiled_each"] == [{}] * len(hard), result["compiled_each"]


def test_layer_parts_lists_the_conv_scan_kernels_with_states_recomputed_and_kept() -> None:
    """bench.layer_parts times the fused conv+scan under both scan_states policies and lists its kernels: the
    chunk-state kernel runs twice per forward and backward when recomputing (forward, then backward's recompute)
    and once when the states are kept."""
    if available_backend("cuda") == Mixer.TORCH:
        pytest.skip("mamba-ssm is not installed: no fused conv+scan")
    b = BenchConfig(warmup_steps=1, steps=2, seqs_per_step=4, median_len=100, max_len=300)
    result = bench_parts.layer_parts(ModelConfig(init="random", shape="tiny"), PeftConfig(), b,
                                     torch.device("cuda"), 0, vocab=128)
    parts = {r["part"]: r for r in result["parts"]}
    assert parts["conv+scan"]["device_ms"] > 0 and parts["conv+scan, states kept"]["device_ms"] > 0
    launches = {policy: {name: n for name, _, n in rows} for policy, rows in result["scan_kernels"].items()}
    assert launches["recompute"]["_chunk_state_fwd_kernel"] == 2 and launches["keep"]["_chunk_state_fwd_kernel"] == 1
