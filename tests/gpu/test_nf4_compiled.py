"""The compiled NF4 dequantization (CUDA only) gives torchao's results bit for bit, through autocast too."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bamba_ft.config.schema import QuantConfig
from bamba_ft.model import nf4
from bamba_ft.model.nf4 import NF4LinearLayer, dequantize_nf4
from bamba_ft.model.quant import quantize_layer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
# (out, in, block_size, scaler_block_size): several weight shapes of one model share a compiled graph; a small
# layer gets a shrunken scaler block. A Bamba-9B MLP shape comes first: the kernel is tuned for the first size.
SHAPES = [(4096, 14336, 64, 256), (512, 256, 64, 256), (256, 512, 64, 256), (1024, 1024, 64, 256),
          (24, 16, 64, 256), (96, 64, 32, 8)]


@pytest.fixture(autouse=True)
def fresh_dynamo() -> None:
    """Each test starts without compiled variants, so their count stays under dynamo's recompile limit."""
    torch._dynamo.reset()


def nf4_linear(shape: tuple[int, int, int, int], stored: torch.dtype, bias: bool = False) -> nn.Linear:
    out_f, in_f, block, scaler_block = shape
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(in_f, out_f, bias=bias, device="cuda", dtype=stored))
    with torch.no_grad():
        layer[0].weight.mul_(torch.logspace(-3, 1, out_f, device="cuda")[:, None])  # scales over many binades
    quantize_layer(layer, QuantConfig(method="nf4", block_size=block, scaler_block_size=scaler_block))
    return layer[0]


@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_compiled_dequantize_equals_torchao(stored: torch.dtype, dtype: torch.dtype) -> None:
    for shape in SHAPES:
        w = nf4_linear(shape, stored).weight
        assert torch.equal(dequantize_nf4(w, dtype), w.get_original_weight().to(dtype)), shape
    assert not nf4._FALLBACKS, nf4._FALLBACKS


@pytest.mark.parametrize("stored,x_dtype", [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
                                            (torch.float32, torch.float32)])
@pytest.mark.parametrize("bias", [False, True])
def test_nf4_layer_equals_torchao_under_autocast(stored: torch.dtype, x_dtype: torch.dtype, bias: bool) -> None:
    layer = nf4_linear((256, 512, 64, 256), stored, bias=bias)
    assert type(layer) is NF4LinearLayer
    x0 = torch.randn(3, 50, layer.in_features, device="cuda").to(x_dtype)
    g = torch.randn(3, 50, layer.out_features, device="cuda", dtype=torch.bfloat16)
    runs = []
    for fn in (layer, lambda t: F.linear(t, layer.weight, layer.bias)):  # ours, then torchao's linear_nf4
        x = x0.clone().requires_grad_(True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = fn(x)
        (gx,) = torch.autograd.grad(y, x, g.to(y.dtype))
        runs.append((y, gx))
    (y, gx), (y_ref, gx_ref) = runs
    assert y.dtype == y_ref.dtype and gx.dtype == gx_ref.dtype
    assert torch.equal(y, y_ref)
    assert torch.equal(gx, gx_ref)
    assert not nf4._FALLBACKS, nf4._FALLBACKS
