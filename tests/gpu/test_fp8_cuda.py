"""fp8 bases on CUDA (`pytest -m gpu`, compute capability 8.9+): torch._scaled_mm with the Triton quantizer against
float64, with the CPU tests' tolerances, on Bamba-9B's Linear shapes, and the quantizer against the torch reference.
A model on an fp8 base trains through the bamba_ft mixer in test_cuda_paths.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bamba_ft.model import fp8
from bamba_ft.model.fp8 import quantize_fp8, quantize_rows
from bamba_ft.ops import float8
from tests.unit.test_fp8 import FP8_ERROR


def _has_float8() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= fp8.MIN_CAPABILITY


pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not _has_float8(), reason="needs a CUDA GPU of compute capability 8.9+ (float8)")]
# (out_features, in_features): Bamba-9B's MLP up/down, attention q and k/v, mamba in_proj and out_proj
SHAPES = [(14336, 4096), (4096, 14336), (4096, 4096), (1024, 4096), (16768, 4096), (4096, 8192)]
ROWS = [(1000,), (2, 333), (1,)]  # packed rows of any length, a batch of rows, one token (generation)


def cuda_fp8_linear(shape: tuple[int, int], dtype: torch.dtype) -> tuple[nn.Linear, torch.Tensor]:
    torch.manual_seed(0)
    layer = nn.Linear(shape[1], shape[0], bias=False, device="cuda", dtype=dtype)
    with torch.no_grad():
        layer.weight.normal_()
    weight = layer.weight.detach().double().clone()
    assert quantize_fp8(layer)
    return layer, weight


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.detach().double() - ref).norm() / ref.norm())


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
def test_fp8_linear_cuda_forward_and_input_gradient_close_to_float64(shape: tuple[int, int], dtype: torch.dtype,
                                                                     rows: tuple[int, ...]) -> None:
    layer, weight = cuda_fp8_linear(shape, dtype)
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn((*rows, shape[1]), generator=g, device="cuda").to(dtype).requires_grad_(True)
    grad = torch.randn((*rows, shape[0]), generator=g, device="cuda").to(dtype)
    out = layer(x)
    assert out.dtype == dtype
    assert FP8_ERROR[0] < rel_err(out, x.detach().double() @ weight.t()) < FP8_ERROR[1]
    out.backward(grad)
    assert x.grad.dtype == dtype
    assert FP8_ERROR[0] < rel_err(x.grad, grad.double() @ weight) < FP8_ERROR[1]
    assert layer.weight.grad is None
    assert fp8._quantize._compiled is float8.quantize_rows and not fp8._quantize.failed  # the Triton kernels ran
    assert fp8._quantize_grad._compiled is float8.quantize_rows and not fp8._quantize_grad.failed


def test_fp8_linear_cuda_under_autocast_float32_weights() -> None:
    """A float32 model under bf16 autocast (bf16-mixed): the output comes in bf16, the input gradient in float32."""
    layer, weight = cuda_fp8_linear((4096, 4096), torch.float32)
    x = torch.randn(777, 4096, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    assert FP8_ERROR[0] < rel_err(out, x.detach().double() @ weight.t()) < FP8_ERROR[1]
    grad = torch.randn_like(out)
    out.backward(grad)
    assert x.grad.dtype == torch.float32
    assert FP8_ERROR[0] < rel_err(x.grad, grad.double() @ weight) < FP8_ERROR[1]


@pytest.mark.parametrize("width", [4096, 16768, 14336, 1000])
@pytest.mark.parametrize("col_scaled", [False, True])
def test_triton_quantizer_matches_torch_reference(width: int, col_scaled: bool) -> None:
    """The kernel against `quantize_rows` / `quantize_grad_rows` on rows spanning 6 decades (one row all zeros):
    same scales to float32 rounding, and codes equal (IEEE division and round-to-nearest-even on both sides), or one
    e4m3 step apart for at most 1 in 10^4 codes should the two amax reductions differ in their last bit."""
    g = torch.Generator(device="cuda").manual_seed(3)
    x = torch.randn(3000, width, generator=g, device="cuda") * torch.logspace(-4, 2, 3000, device="cuda")[:, None]
    x[7] = 0
    x = x.bfloat16()
    col = torch.rand(1, width, generator=g, device="cuda") * 1e-2 if col_scaled else None
    codes, scales = float8.quantize_rows(x, col)
    ref_codes, ref_scales = quantize_rows(x) if col is None else fp8.quantize_grad_rows(x, col)
    assert codes.dtype == torch.float8_e4m3fn and codes.shape == x.shape and scales.shape == (3000, 1)
    torch.testing.assert_close(scales, ref_scales, rtol=1e-6, atol=0)
    differ = (codes.view(torch.uint8).int() - ref_codes.view(torch.uint8).int()).abs()
    assert int(differ.max()) <= 1 and float((differ > 0).float().mean()) < 1e-4
    assert int(codes[7].view(torch.uint8).int().abs().sum()) == 0


def test_triton_quantizer_takes_no_rows() -> None:
    codes, scales = float8.quantize_rows(torch.zeros(0, 4096, device="cuda", dtype=torch.bfloat16))
    assert codes.shape == (0, 4096) and scales.shape == (0, 1)
