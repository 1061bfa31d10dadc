"""Cached Triton launches on CUDA (`pytest -m gpu`): the mamba-ssm kernels and the float8 quantizer give the same
numbers through `bamba_ft.ops.launch.CachedLaunch` as through Triton's own launches, over packed lengths that
change every call (each length recorded once, then repeated from the cache)."""

from __future__ import annotations

import sys

import pytest
import torch

from bamba_ft.ops import launch
from bamba_ft.ops.fused import FusedRMSNorm
from bamba_ft.ops.mamba2 import conv_scan, fused_conv_scan_ok
from tests.conftest import make_model
from tests.gpu.test_cuda_paths import SHAPE, kernels_required, rel

pytestmark = pytest.mark.gpu
LENGTHS = [[100, 1, 37, 200, 64, 3], [513, 7], [100, 1, 37, 200, 64, 3]]  # each new length compiles anew


def _cached_kernels() -> list[launch.CachedLaunch]:
    return [v for name, m in list(sys.modules.items()) if name.startswith("mamba_ssm.ops.triton.")
            for v in vars(m).values() if isinstance(v, launch.CachedLaunch)]


def _conv_scan_grads(mixer, lengths: list[int], dtype: torch.dtype) -> list[torch.Tensor]:  # noqa: ANN001
    seq = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None].cuda().to(torch.int32)
    torch.manual_seed(sum(lengths))
    zxbcdt = torch.randn(1, sum(lengths), mixer.in_proj.out_features, device="cuda", dtype=dtype, requires_grad=True)
    _, xbc, dt = zxbcdt.split([mixer.intermediate_size, mixer.conv_dim, mixer.num_heads], dim=-1)
    params = [mixer.conv1d.weight, mixer.conv1d.bias, mixer.A_log, mixer.D, mixer.dt_bias]
    y = conv_scan(mixer, xbc, dt, seq)
    return [y.detach(), *torch.autograd.grad((y * torch.randn_like(y)).sum(), [zxbcdt, *params])]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_conv_scan_same_through_cached_launches(dtype: torch.dtype) -> None:
    kernels_required()
    model = make_model(torch.float32, **SHAPE).cuda().to(dtype)
    mixer = model.model.layers[0].mamba
    assert fused_conv_scan_ok(mixer)
    kernels = _cached_kernels()
    assert kernels, "mamba-ssm's kernels are not wrapped"
    hits = sum(k.hits for k in kernels)
    for lengths in LENGTHS:
        for _ in range(2):  # the second call of a length repeats its signature
            with launch.triton_launches():
                ref = _conv_scan_grads(mixer, lengths, dtype)
            got = _conv_scan_grads(mixer, lengths, dtype)
            for name, a, b in zip(["y", "zxbcdt", "conv.weight", "conv.bias", "A_log", "D", "dt_bias"], got, ref):
                assert rel(a, b) < 1e-5, (lengths, name)  # same kernels; the backward's atomics may reorder sums
    assert sum(k.hits for k in kernels) > hits
    assert not any(k.failed for k in kernels)


def test_rmsnorm_same_through_cached_launches() -> None:
    kernels_required()
    model = make_model(torch.float32, **SHAPE).cuda().to(torch.bfloat16)
    norm = model.model.layers[0].input_layernorm
    norm.__class__ = FusedRMSNorm
    for tokens in (37, 1000, 37):
        x = torch.randn(1, tokens, model.config.hidden_size, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        g = torch.randn_like(x)
        with launch.triton_launches():
            ref = norm(x)
            ref_grad = torch.autograd.grad(ref, x, g)[0]
        out = norm(x)
        grad = torch.autograd.grad(out, x, g)[0]
        assert torch.equal(out, ref) and rel(grad, ref_grad) < 1e-5


def test_float8_quantizer_same_through_cached_launches() -> None:
    from bamba_ft.ops import float8

    if float8.triton is None or torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("needs Triton and compute capability 8.9+ (float8)")
    kernel = float8._quantize_rows_kernel
    assert isinstance(kernel, launch.CachedLaunch)
    hits = kernel.hits
    for rows, width in ((1000, 4096), (7, 4096), (333, 14336), (334, 14336)):
        x = torch.randn(rows, width, device="cuda", dtype=torch.bfloat16)
        col = torch.rand(width, device="cuda") + 0.5
        for scale in (None, col):
            with launch.triton_launches():
                ref = float8.quantize_rows(x, scale)
            got = float8.quantize_rows(x, scale)
            assert torch.equal(got[0].view(torch.uint8), ref[0].view(torch.uint8)) and torch.equal(got[1], ref[1])
    assert kernel.hits > hits and not kernel.failed
