"""CUDA paths (run on a GPU machine: `pytest -m gpu`): kernels against the exact torch reference.

Tolerances are relative Frobenius errors ||a - b|| / ||b||: float32 runs through Triton's tf32 dots
(~1e-3 expected), bfloat16 inputs ~1e-2.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from bamba_ft.config.schema import Mixer, PeftConfig, QuantConfig
from bamba_ft.data.packing import collate_packed
from bamba_ft.model.lora import apply_peft, check_adapter_gradients
from bamba_ft.model.mixer import install_mixer
from bamba_ft.model.objective import mean_loss
from bamba_ft.model.quant import quantize_layer
from bamba_ft.ops.attention import _padded_sdpa, register_varlen_attention, varlen_available
from bamba_ft.ops.fused import FusedBambaMLP, FusedRMSNorm
from bamba_ft.ops.kernels import available_backend
from bamba_ft.ops.mamba2 import conv_scan, fused_conv_scan_ok, mixer_forward, unfused_conv_scan
from tests.conftest import LORA_TARGETS, make_model

pytestmark = pytest.mark.gpu
LENGTHS = [100, 1, 37, 200, 64, 3]  # mid-chunk and chunk-edge boundaries, length-1 sequences
SHAPE = dict(hidden_size=256, intermediate_size=512, mamba_n_heads=8, mamba_d_head=64, mamba_d_state=64,
             mamba_chunk_size=64, num_attention_heads=8, num_key_value_heads=2)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12))


def kernels_required() -> None:
    if available_backend("cuda") == Mixer.TORCH:
        pytest.skip("mamba-ssm is not installed: no CUDA kernel backend to compare")


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 5e-3), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("groups", [1, 2])
def test_kernel_mixer_matches_torch_reference(dtype: torch.dtype, tol: float, groups: int) -> None:
    kernels_required()
    model = make_model(torch.float32, mamba_n_groups=groups, **SHAPE).cuda().to(dtype)
    mixer = model.model.layers[0].mamba
    install_mixer(model, "auto")
    torch.manual_seed(0)
    h = torch.randn(1, sum(LENGTHS), model.config.hidden_size, device="cuda", dtype=dtype, requires_grad=True)
    seq = torch.repeat_interleave(torch.arange(len(LENGTHS)), torch.tensor(LENGTHS))[None].cuda()
    w = torch.randn_like(h)
    params = dict(mixer.named_parameters())
    outs, grads = {}, {}
    for backend in (available_backend("cuda"), Mixer.TORCH):
        y = mixer_forward(mixer, h, seq_idx=seq, backend=backend)
        g = torch.autograd.grad((y * w).sum(), [h, *params.values()])
        outs[backend], grads[backend] = y, dict(zip(["input", *params], g))
    kernel = available_backend("cuda")
    assert rel(outs[kernel], outs[Mixer.TORCH]) < tol
    for name in grads[Mixer.TORCH]:  # the input and every parameter: conv, A_log, D, dt_bias, norm, projections
        assert rel(grads[kernel][name], grads[Mixer.TORCH][name]) < tol, name


@pytest.mark.parametrize("states", ["recompute", "keep"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_conv_scan_equals_unfused_kernels(dtype: torch.dtype, states: str) -> None:
    """Recomputing the conv in backward, and keeping the scan's chunk states from forward (`model.scan_states`),
    change nothing: same kernels, same numbers (scan atomics aside)."""
    kernels_required()
    model = make_model(torch.float32, **SHAPE).cuda().to(dtype)
    install_mixer(model, "auto", scan_states=states)
    mixer = model.model.layers[0].mamba
    assert fused_conv_scan_ok(mixer) and mixer.keeps_scan_states() == (states == "keep")
    seq = torch.repeat_interleave(torch.arange(len(LENGTHS)), torch.tensor(LENGTHS))[None].cuda().to(torch.int32)
    torch.manual_seed(0)
    zxbcdt = torch.randn(1, sum(LENGTHS), mixer.in_proj.out_features, device="cuda", dtype=dtype, requires_grad=True)
    _, xbc, dt = zxbcdt.split([mixer.intermediate_size, mixer.conv_dim, mixer.num_heads], dim=-1)
    params = [mixer.conv1d.weight, mixer.conv1d.bias, mixer.A_log, mixer.D, mixer.dt_bias]
    ref = unfused_conv_scan(mixer, xbc, dt, seq, Mixer.KERNELS)
    w = torch.randn_like(ref)
    g_ref = torch.autograd.grad((ref * w).sum(), [zxbcdt, *params])
    y = conv_scan(mixer, xbc, dt, seq)
    g = torch.autograd.grad((y * w).sum(), [zxbcdt, *params])
    assert rel(y, ref) < 1e-6
    for name, a, b in zip(["zxbcdt", "conv.weight", "conv.bias", "A_log", "D", "dt_bias"], g, g_ref):
        assert rel(a, b) < 1e-4, name


def test_fused_mlp_and_norm_match_transformers_bf16() -> None:
    """Compiled SwiGLU and torch's fused RMSNorm against transformers' forward: bf16 rounding only."""
    kernels_required()
    model = make_model(torch.float32, **SHAPE).cuda().to(torch.bfloat16)
    mlp, norm = model.model.layers[0].feed_forward, model.model.layers[0].input_layernorm
    x = torch.randn(2, 300, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(2, 300, 256, device="cuda", dtype=torch.bfloat16)
    results = {}
    for fused in (False, True):
        install = {mlp: FusedBambaMLP, norm: FusedRMSNorm} if fused else {}
        for m, cls in install.items():
            m.__class__ = cls
        y = mlp(norm(x))
        results[fused] = (y, *torch.autograd.grad((y * w).sum(), [x, *mlp.parameters(), *norm.parameters()]))
    for a, b in zip(results[True], results[False]):
        assert rel(a, b) < 2e-2


def test_fused_lora_matches_peft_under_autocast() -> None:
    from bamba_ft.model.lora import fuse_lora_forward

    model = make_model(torch.float32, **SHAPE).cuda().to(torch.bfloat16)
    install_mixer(model, "auto")
    model = get_peft_model(model, LoraConfig(r=8, target_modules=LORA_TARGETS))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    ids = torch.randint(1, 256, (2, 200), device="cuda")
    runs = []
    for fuse in (False, True):
        if fuse:
            assert fuse_lora_forward(model) > 0
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(input_ids=ids).logits
        logits.float().pow(2).mean().backward()
        runs.append((logits, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    assert rel(runs[1][0], runs[0][0]) < 2e-2
    for n, g in runs[0][1].items():
        assert rel(runs[1][1][n], g) < 5e-2, n


def test_kernel_packed_rows_equal_sequences_alone() -> None:
    kernels_required()
    model = make_model(torch.float32, attn="sdpa", **SHAPE).cuda()
    install_mixer(model, "auto")
    register_varlen_attention()
    model.config._attn_implementation = "varlen"
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(1, 256, (n,), generator=g).tolist() for n in LENGTHS]
    batch = collate_packed([{"input_ids": s, "labels": s} for s in seqs])
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        packed = model(**batch).logits[0]
        alone = torch.cat([model(input_ids=torch.tensor([s], device="cuda")).logits[0] for s in seqs])
    assert rel(packed, alone) < 5e-3


def test_out_proj_lora_trains_on_gpu_kernels() -> None:
    kernels_required()
    model = make_model(torch.float32, **SHAPE).cuda().to(torch.bfloat16)
    install_mixer(model, "auto")
    model = apply_peft(model, PeftConfig(r=8, target_modules=LORA_TARGETS))
    batch = collate_packed([{"input_ids": list(range(1, 90)), "labels": list(range(1, 90))}])
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        norms = check_adapter_gradients(model, batch, mean_loss)
    assert any("out_proj.lora_A" in n for n in norms) and all(v > 0 for v in norms.values())


def test_stock_fused_path_gives_out_proj_adapter_no_gradient() -> None:
    """The defect bamba_ft exists to fix, measured: transformers' fused CUDA path skips out_proj's adapter."""
    kernels_required()
    model = make_model(torch.float32, **SHAPE).cuda().to(torch.bfloat16).train()
    model = get_peft_model(model, LoraConfig(r=8, target_modules=LORA_TARGETS))
    ids = torch.randint(1, 256, (1, 128), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    out_proj_b = [p for n, p in model.named_parameters() if "mamba.out_proj.lora_B" in n]
    in_proj_b = [p for n, p in model.named_parameters() if "mamba.in_proj.lora_B" in n]
    assert all(p.grad is None for p in out_proj_b)
    assert all(p.grad is not None for p in in_proj_b)


def test_varlen_attention_matches_padded_sdpa() -> None:
    if not varlen_available():
        pytest.skip("torch varlen attention needs an Ampere or newer GPU")
    from bamba_ft.ops.attention import varlen_attention_forward

    torch.manual_seed(2)
    t, hq, hk, d = sum(LENGTHS), 8, 2, 64
    q, k, v = (torch.randn(1, h, t, d, device="cuda", dtype=torch.bfloat16) for h in (hq, hk, hk))
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    module = torch.nn.Module()
    out, _ = varlen_attention_forward(module, q, k, v, None, scaling=d**-0.5, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                                      max_length_q=max(LENGTHS), max_length_k=max(LENGTHS))
    ref = _padded_sdpa(*(x[0].transpose(0, 1) for x in (q, k, v)), cu, max(LENGTHS), d**-0.5, hq // hk)
    assert rel(out[0], ref) < 1e-2


FLOAT8 = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


@pytest.mark.parametrize("method", ["nf4", "int8", pytest.param("fp8", marks=pytest.mark.skipif(
    not FLOAT8, reason="needs a CUDA GPU of compute capability 8.9+ (float8)"))])
def test_quantized_base_trains_through_bamba_mixer(method: str) -> None:
    model = make_model(torch.float32, **SHAPE).cuda().to(torch.bfloat16)
    for layer in model.model.layers:
        quantize_layer(layer, QuantConfig(method=method))
    install_mixer(model, "auto")
    model = apply_peft(model, PeftConfig(r=8, target_modules=LORA_TARGETS))
    batch = collate_packed([{"input_ids": list(range(1, 70)), "labels": list(range(1, 70))},
                            {"input_ids": list(range(3, 40)), "labels": list(range(3, 40))}])
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        norms = check_adapter_gradients(model, batch, mean_loss)
    assert all(v > 0 for v in norms.values())


def test_a_packed_training_step_never_waits_for_the_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """The host queues a Bamba step's kernels only a little faster than the GPU runs them, so a sync mid-step
    costs the lead it had (bamba_ft.model.objective): forward, loss, backward and optimizer step run without one."""
    kernels_required()
    if not varlen_available():
        pytest.skip("torch varlen attention needs an Ampere or newer GPU")
    from bamba_ft.config.schema import ModelConfig
    from bamba_ft.jobs.bench_variants import VARIANTS, build_variant
    from bamba_ft.jobs.runtime import autocast_for, to_device
    from bamba_ft.model import shapes
    from bamba_ft.ops.loss import causal_lm

    # the tiny shape with this file's mixer sizes, so the kernels compiled by the tests above serve this one too
    monkeypatch.setitem(shapes.SHAPES, "gpu-test", {**shapes.SHAPES["tiny"], **SHAPE})
    device = torch.device("cuda")
    model = build_variant(VARIANTS["bamba_ft"], ModelConfig(init="random", shape="gpu-test", dtype="bfloat16"),
                          PeftConfig(), device, 0)["model"]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    seqs = [[3 + i % 100 for i in range(n)] for n in LENGTHS]  # the tiny shape has 128 token ids
    batch = to_device(collate_packed([{"input_ids": s, "labels": [-100] + s[1:]} for s in seqs]), device)

    def step() -> None:
        with autocast_for(causal_lm(model), device):
            loss = mean_loss(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # compiles and autotunes the kernels, which may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_compiled_softmax_cross_entropy_matches_eager(dtype: torch.dtype, tol: float) -> None:
    from bamba_ft.ops.loss import _softmax_cross_entropy, softmax_cross_entropy

    # One graph per (dtype, with_grad) serves every scale (tests/unit/test_loss.py counts them on CPU), so both dtypes
    # stay within dynamo's recompile limit (8 per function). A fresh cache, whatever ran before.
    torch._dynamo.reset()
    _softmax_cross_entropy._compiled, _softmax_cross_entropy.failed = None, False
    torch.manual_seed(0)
    for rows in (37, 300):  # a second row count: dynamic shapes
        logits = torch.randn(rows, 50_003, device="cuda", dtype=dtype) * 4
        targets = torch.randint(0, logits.shape[1], (rows,), device="cuda")
        for scale in (1.0, 0.25):
            loss, grad = _softmax_cross_entropy(logits, targets, scale, True)
            assert not _softmax_cross_entropy.failed, "the compiled loss fell back to eager"
            want_loss, want_grad = softmax_cross_entropy(logits.clone(), targets, scale, True)  # consumes its logits
            assert grad.dtype == dtype and rel(loss, want_loss) < 1e-6 and rel(grad, want_grad) < tol
            assert rel(_softmax_cross_entropy(logits, targets, scale, False)[0], want_loss) < 1e-6
