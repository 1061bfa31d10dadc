"""fp8 bases: FP8Linear's forward and input gradient against float64, its storage, and a LoRA model on it (CPU:
torch runs torch._scaled_mm with row scales on the CPU too)."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from bamba_ft.config.schema import ModelConfig, PeftConfig, QuantConfig
from bamba_ft.data.packing import collate_packed
from bamba_ft.errors import ConfigError
from bamba_ft.lit_module import training_mean_loss
from bamba_ft.model.build import build_model
from bamba_ft.model.fp8 import FP8Linear, check_fp8_device, quantize_fp8
from bamba_ft.model.lora import apply_peft, check_adapter_gradients
from bamba_ft.model.mixer import install_mixer
from bamba_ft.model.objective import mean_loss
from bamba_ft.model.quant import base_weight_bytes, dequantize_model, is_quantized
from tests.conftest import LORA_TARGETS, make_model
from tests.unit.test_quant import batch, quantized_model

# Relative Frobenius error of one float8 matmul (inputs and weight rounded to e4m3, 3 mantissa bits) on Gaussian
# data: about 0.036 measured here (bf16 inputs alone: about 0.002). Above 0.06 the quantization is broken; below
# 0.005 the matmul did not run in float8.
FP8_ERROR = (0.005, 0.06)
SHAPES = [(64, 128), (4, 40, 128)]  # x: 2-D and 3-D (rows x in_features)


def fp8_linear(dtype: torch.dtype, bias: bool = False, out_features: int = 96, in_features: int = 128,
               seed: int = 0) -> tuple[nn.Linear, torch.Tensor]:
    """An FP8Linear and the float64 copy of the weight it was quantized from."""
    torch.manual_seed(seed)
    layer = nn.Linear(in_features, out_features, bias=bias).to(dtype)
    with torch.no_grad():
        layer.weight.normal_()
        if bias:
            layer.bias.normal_()
    weight = layer.weight.detach().double().clone()
    assert quantize_fp8(layer) and isinstance(layer, FP8Linear)
    return layer, weight


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.detach().double() - ref).norm() / ref.norm())


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fp8_linear_forward_close_to_float64(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    layer, weight = fp8_linear(dtype, bias=True)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    out = layer(x)
    assert out.dtype == dtype and out.shape == (*shape[:-1], 96)
    ref = x.double() @ weight.t() + layer.bias.detach().double()
    assert FP8_ERROR[0] < rel_err(out, ref) < FP8_ERROR[1], rel_err(out, ref)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fp8_linear_input_gradient_close_to_float64_and_nothing_of_x_saved(dtype: torch.dtype,
                                                                           shape: tuple[int, ...]) -> None:
    layer, weight = fp8_linear(dtype)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(shape, generator=g).to(dtype).requires_grad_(True)
    grad = torch.randn((*shape[:-1], 96), generator=g).to(dtype)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = layer(x)
    # Nothing goes through saved-tensor hooks; the backward node holds the layer's own tensors only.
    assert saved == [], [tuple(t.shape) for t in saved]
    held = {k: v for k, v in vars(out.grad_fn).items() if torch.is_tensor(v)}
    assert held.keys() == {"codes_t", "scale"} and held["codes_t"] is layer.weight_t \
        and held["scale"] is layer.weight_scale
    out.backward(grad)
    assert x.grad.dtype == dtype and x.grad.shape == x.shape
    ref = grad.double() @ weight
    assert FP8_ERROR[0] < rel_err(x.grad, ref) < FP8_ERROR[1], rel_err(x.grad, ref)
    assert layer.weight.grad is None and not layer.weight.requires_grad


def test_fp8_quantization_round_trip_within_e4m3_rounding() -> None:
    """Per element |q s - W| <= 2^-4 |W| (half a unit in the last place of 3 mantissa bits) plus 2^-10 s for the
    rare values below e4m3's normal range (subnormal spacing 2^-9); every row's largest value maps to 448; the
    transposed codes are the codes, bit for bit. Row magnitudes over four decades: the scales are per row."""
    torch.manual_seed(0)
    layer = nn.Linear(256, 64, bias=False)
    with torch.no_grad():
        layer.weight.mul_(torch.logspace(-3, 1, 64)[:, None])
    w = layer.weight.detach().clone()
    assert quantize_fp8(layer)
    q, s = layer.weight, layer.weight_scale
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32 and s.shape == (64,)
    back = layer.dequantized_weight(torch.float32)
    assert torch.all((back - w).abs() <= 2**-4 * w.abs() + 2**-10 * s[:, None])
    assert torch.equal(q.float().abs().amax(dim=1), torch.full((64,), 448.0))
    assert layer.weight_t.shape == (256, 64) and layer.weight_t.is_contiguous()
    assert torch.equal(layer.weight_t.view(torch.uint8), q.t().contiguous().view(torch.uint8))
    assert is_quantized(q) and not is_quantized(w)


def test_fp8_leaves_unaligned_layers_and_keeps_float8_under_casts_and_moves() -> None:
    plain = nn.Linear(100, 64)
    assert not quantize_fp8(plain) and type(plain) is nn.Linear  # 100 is no multiple of 16

    layer, _ = fp8_linear(torch.float32)
    x = torch.randn(8, 128)
    before = layer(x)
    layer.to(torch.bfloat16)  # what Lightning's bf16-true does to the whole model
    assert layer.weight.dtype == layer.weight_t.dtype == torch.float8_e4m3fn
    assert layer.weight_scale.dtype == torch.float32 and layer.compute_dtype == torch.bfloat16
    assert torch.equal(layer(x), before)
    # No buffers (DDP would broadcast them every step), nothing but the codes in the state dict.
    assert list(layer.buffers()) == [] and list(layer.state_dict()) == ["weight"]
    layer.to("meta")
    assert all(t.is_meta for t in (layer.weight, layer.weight_scale, layer.weight_t))


def test_fp8_model_logits_close_to_float_and_base_bytes() -> None:
    """The test model's in_proj (64 -> 292 features) does not fit and stays float32; every other Linear of the
    decoder layers is fp8. Relative logit error measured 0.030; broken quantization gives errors near 1."""
    ref = make_model(torch.float32, mamba_chunk_size=8)
    install_mixer(ref, "torch")
    q = quantized_model("fp8")
    kinds = {name.rsplit(".", 1)[-1]: type(m) for name, m in q.model.layers.named_modules() if isinstance(m, nn.Linear)}
    assert kinds.pop("in_proj") is nn.Linear and set(kinds.values()) == {FP8Linear}, kinds
    # fp8 layers hold 2 bytes per weight (codes and transposed codes) plus 4 per row, against float32's 4
    fp8_layers = [m for m in q.modules() if isinstance(m, FP8Linear)]
    saved = sum(2 * m.weight.numel() - 4 * m.out_features for m in fp8_layers)
    assert base_weight_bytes(ref) - base_weight_bytes(q) == saved
    inputs = {k: v for k, v in batch().items() if k != "labels"}
    with torch.no_grad():
        a, r = q(**inputs).logits, ref(**inputs).logits
    assert 0.005 < float((a - r).norm() / r.norm()) < 0.1


def test_peft_on_fp8_base_keeps_float32_adapters_and_dequantizes_to_codes_times_scales() -> None:
    """Training, the adapter round trip and the merge are tested with the other methods (test_quant.py)."""
    model = apply_peft(quantized_model("fp8"), PeftConfig(r=8, lora_alpha=16, target_modules=LORA_TARGETS + ["gate_proj"]))
    adapters = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert adapters and all(p.dtype == torch.float32 for p in adapters.values())  # not cast to float8 by peft
    norms = check_adapter_gradients(model, batch(), mean_loss)  # raises when an adapter gets no gradient
    assert norms.keys() == adapters.keys()
    layers = {n: m for n, m in model.named_modules() if isinstance(m, FP8Linear)}
    expected = {n: m.dequantized_weight(torch.float32) for n, m in layers.items()}
    # layer 0: out_proj + 3 MLP projections; layer 1: q, k, v, o + 3 MLP projections (in_proj stays float32)
    assert dequantize_model(model, torch.float32) == len(layers) == 11
    modules = dict(model.named_modules())
    for name, weight in expected.items():
        assert type(modules[name]) is nn.Linear and not hasattr(modules[name], "weight_t")
        assert torch.equal(modules[name].weight, weight) and not modules[name].weight.requires_grad
    assert not any(is_quantized(p) for p in model.parameters())


def test_fp8_adapter_gradients_unchanged_by_checkpointing_and_offload() -> None:
    """Recomputed layers (recipe=qlora checkpoints all) and host-offloaded activations give the same gradients, bit
    for bit: the fp8 backward reads only the layer's own tensors."""
    b = collate_packed([{"input_ids": s, "labels": s} for s in ([5, 9, 3, 7] * 12, [4, 8, 6] * 10)])
    grads = []
    for checkpointing, offload in [("none", False), ("all", True)]:
        torch.manual_seed(0)
        cfg = ModelConfig(gradient_checkpointing=checkpointing, activation_offload=offload)
        model = apply_peft(build_model(cfg, QuantConfig(method="fp8"), torch.device("cpu")), PeftConfig())
        training_mean_loss(model, b, offload).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    assert all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])


def test_fp8_build_logs_the_layers_it_keeps(caplog: pytest.LogCaptureFixture) -> None:
    """builtin:tiny's in_proj (128 -> 584 features) in its 3 mixer layers does not fit."""
    caplog.set_level(logging.INFO, logger="bamba_ft")
    model = build_model(ModelConfig(), QuantConfig(method="fp8"), torch.device("cpu"))
    assert sum(isinstance(m, FP8Linear) for m in model.modules()) == 19
    assert "3 selected Linear layers kept in float32 (in_proj): quant.method=fp8 needs in and out features that " \
           "are multiples of 16" in caplog.text
    assert "(19 Linear layers fp8)" in caplog.text


def test_fp8_refused_on_gpus_without_float8(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(ConfigError, match=r"quant.method=fp8 needs float8 matmuls .*this GPU has 8\.0\.\n"
                                          r".*Fix: quant.method=nf4 .* or quant.method=none"):
        build_model(ModelConfig(), QuantConfig(method="fp8"), torch.device("cuda"))
    for capability in [(8, 9), (9, 0), (10, 0)]:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        check_fp8_device(torch.device("cuda"))
    check_fp8_device(torch.device("cpu"))
