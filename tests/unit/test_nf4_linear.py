"""NF4 layers: bamba_ft's dequantization and NF4Linear give torchao's linear_nf4 results bit for bit."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import Linear as LoraLinear
from torch import nn

from bamba_ft.config.schema import QuantConfig
from bamba_ft.errors import ModelError
from bamba_ft.model import nf4
from bamba_ft.model.nf4 import NF4LinearLayer, dequantize_nf4
from bamba_ft.model.quant import dequantize_model, is_quantized, quantize_layer
from tests.conftest import LORA_TARGETS, make_model

# (out, in, block_size, scaler_block_size): the default blocks; blocks too few for the scaler block, which
# quantize_layer shrinks (64 blocks -> 64, 6 blocks -> 2); small blocks; several scaler blocks.
SHAPES = [(128, 256, 64, 256), (64, 64, 64, 256), (24, 16, 64, 256), (96, 64, 32, 8), (256, 512, 64, 256)]


def nf4_linear(shape: tuple[int, int, int, int], stored: torch.dtype, bias: bool = False, seed: int = 0) -> nn.Linear:
    out_f, in_f, block, scaler_block = shape
    torch.manual_seed(seed)
    layer = nn.Sequential(nn.Linear(in_f, out_f, bias=bias)).to(stored)
    cfg = QuantConfig(method="nf4", block_size=block, scaler_block_size=scaler_block)
    assert quantize_layer(layer, cfg) == 1
    return layer[0]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_dequantize_equals_torchao_bit_for_bit(shape: tuple, stored: torch.dtype, dtype: torch.dtype) -> None:
    w = nf4_linear(shape, stored).weight
    got = dequantize_nf4(w, dtype)
    assert got.dtype == dtype and got.shape == w.shape
    assert torch.equal(got, w.get_original_weight().to(dtype))
    assert torch.equal(got, w.to(dtype))  # what linear_nf4 dequantizes with


def torchao_linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, layer.weight, layer.bias)  # NF4Tensor's __torch_function__: torchao's linear_nf4


def forward_backward(fn, x: torch.Tensor, autocast: bool) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
    x = x.detach().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = fn(x)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.dtype)
    (gx,) = torch.autograd.grad(y, x, g)
    return y, gx


@pytest.mark.parametrize(
    "stored,x_dtype,autocast",
    [
        (torch.float32, torch.float32, False),
        (torch.bfloat16, torch.bfloat16, False),
        (torch.float32, torch.float32, True),  # autocast casts input and weight to bf16
        (torch.bfloat16, torch.float32, True),
        (torch.bfloat16, torch.bfloat16, True),
    ],
)
@pytest.mark.parametrize("bias", [False, True])
def test_nf4_linear_equals_torchao_linear(stored: torch.dtype, x_dtype: torch.dtype, autocast: bool,
                                          bias: bool) -> None:
    layer = nf4_linear(SHAPES[0], stored, bias=bias)
    assert type(layer) is NF4LinearLayer
    x = torch.randn(2, 5, layer.in_features, generator=torch.Generator().manual_seed(0)).to(x_dtype)
    y, gx = forward_backward(layer, x, autocast)
    y_ref, gx_ref = forward_backward(lambda t: torchao_linear(layer, t), x, autocast)
    assert y.dtype == y_ref.dtype and gx.dtype == gx_ref.dtype == x_dtype
    assert torch.equal(y, y_ref)
    assert torch.equal(gx, gx_ref)
    assert layer.weight.grad is None


def test_quantize_layer_keeps_module_contract() -> None:
    layer = nf4_linear((128, 64, 64, 256), torch.float32, bias=True)
    assert isinstance(layer, nn.Linear) and type(layer) is not nn.Linear
    assert set(nn.Sequential(layer).state_dict()) == set(nn.Sequential(nn.Linear(64, 128)).state_dict())
    assert quantize_layer(nn.Sequential(layer), QuantConfig(method="nf4")) == 0  # already quantized: skipped


def test_peft_wraps_nf4_layers_and_dequantize_restores_linear() -> None:
    model = make_model(torch.float32, mamba_chunk_size=8)
    for layer in model.model.layers:
        quantize_layer(layer, QuantConfig(method="nf4"))
    nf4_names = [n for n, m in model.named_modules() if type(m) is NF4LinearLayer]
    assert {n.rsplit(".", 1)[-1] for n in nf4_names} >= set(LORA_TARGETS)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=LORA_TARGETS))
    wrapped = [m for m in peft_model.modules() if isinstance(m, LoraLinear)]
    assert wrapped and all(type(m.base_layer) is NF4LinearLayer for m in wrapped)

    ids = torch.randint(1, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    peft_model(input_ids=ids).logits.float().pow(2).mean().backward()
    assert all(m.lora_A["default"].weight.grad is not None for m in wrapped)

    assert dequantize_model(peft_model, torch.float32) == len(nf4_names)
    assert not any(isinstance(m, NF4LinearLayer) for m in peft_model.modules())
    assert all(type(m.base_layer) is nn.Linear and not is_quantized(m.base_layer.weight) for m in wrapped)
    merged = peft_model.merge_and_unload()
    assert all(type(merged.get_submodule(n)) is nn.Linear for n in nf4_names)


def test_cpu_never_compiles(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_compile():  # noqa: ANN202
        raise AssertionError("the compiled dequantization was asked for on the CPU")

    monkeypatch.setattr(nf4, "_compiled_dequantize", no_compile)
    w = nf4_linear(SHAPES[0], torch.float32).weight
    assert torch.equal(dequantize_nf4(w, torch.bfloat16), w.to(torch.bfloat16))


def test_failed_compile_falls_back_to_eager_with_one_warning(monkeypatch: pytest.MonkeyPatch,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    calls = []

    def broken(*args):  # noqa: ANN002, ANN202
        calls.append(1)
        raise RuntimeError("no Triton here")

    monkeypatch.setattr(nf4, "_compiled_dequantize", lambda: broken)
    monkeypatch.setattr(nf4, "_FALLBACKS", {})
    w = nf4_linear(SHAPES[0], torch.bfloat16).weight
    data = w.quantized_data.view(-1, w.block_size // 2)
    with caplog.at_level(logging.WARNING, logger=nf4.__name__):
        for _ in range(3):
            out = nf4._dequantize_cuda(data, nf4._block_scales(w), w.nf4, torch.bfloat16)
            assert torch.equal(out.view(w.shape), w.to(torch.bfloat16))
    assert len(calls) == 1 and "failed" in nf4._FALLBACKS
    assert len([r for r in caplog.records if "compiled NF4 dequantization failed" in r.message]) == 1


def test_recompile_limit_runs_that_call_eagerly_and_keeps_compiling(monkeypatch: pytest.MonkeyPatch) -> None:
    class FailOnRecompileLimitHit(Exception):
        pass

    calls = []

    def over_limit(*args):  # noqa: ANN002, ANN202
        calls.append(1)
        raise FailOnRecompileLimitHit

    monkeypatch.setattr(nf4, "_compiled_dequantize", lambda: over_limit)
    monkeypatch.setattr(nf4, "_FALLBACKS", {})
    w = nf4_linear(SHAPES[0], torch.float32).weight
    data = w.quantized_data.view(-1, w.block_size // 2)
    for _ in range(2):
        out = nf4._dequantize_cuda(data, nf4._block_scales(w), w.nf4, torch.bfloat16)
        assert torch.equal(out.view(w.shape), w.to(torch.bfloat16))
    assert len(calls) == 2 and set(nf4._FALLBACKS) == {"recompile_limit"}


def test_a_block_size_that_does_not_divide_a_layer_names_the_key_and_block_sizes_that_do() -> None:
    layer = nn.Sequential(nn.Linear(16, 24))  # 384 weights: 100 does not divide them, powers of two up to 128 do
    with pytest.raises(ModelError, match=r"quant\.block_size=100 .*\nFix: quant\.block_size=64 \(any power of two up to 128 "):
        quantize_layer(layer, QuantConfig(method="nf4", block_size=100))
    assert quantize_layer(nn.Sequential(nn.Linear(16, 24)), QuantConfig(method="nf4", block_size=128)) == 1
