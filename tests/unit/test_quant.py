"""Quantized bases (torchao, fp8): each method trains adapters only, round-trips, and merges within tolerance."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel

from bamba_ft.config.schema import CHOICES, PeftConfig, QuantConfig
from bamba_ft.data.packing import collate_packed
from bamba_ft.errors import ConfigError
from bamba_ft.model.lora import apply_peft
from bamba_ft.model.mixer import install_mixer
from bamba_ft.model.objective import mean_loss
from bamba_ft.model.quant import base_weight_bytes, dequantize_model, is_quantized, quantize_layer
from tests.conftest import LORA_TARGETS, make_model

# Relative logit error ||q - f|| / ||f|| of the quantized base against float32, measured on this random tiny
# model: nf4 0.104, int4 0.101, int8 0.0064. Bounds are ~2-3x that; broken quantization (zeroed or transposed
# weights) gives errors near 1.
QUANT_ERROR = {"nf4": 0.2, "int8": 0.02, "int4": 0.2}
# Max |logit change| from merging the adapter into the dequantized base. torchao methods: the merged model multiplies
# the same dequantized weights, float32 rounding only. fp8 also rounds every matmul's activations to float8, which
# the merged model does not: measured 0.017, with logits up to 1.4.
MERGE_ERROR = {"nf4": 1e-4, "int8": 1e-4, "int4": 1e-4, "fp8": 0.05}


def quantized_model(method: str, seed: int = 0) -> torch.nn.Module:
    model = make_model(torch.float32, seed=seed, mamba_chunk_size=8)
    for layer in model.model.layers:
        quantize_layer(layer, QuantConfig(method=method, group_size=32))
    install_mixer(model, "torch")
    return model


def batch() -> dict:
    g = torch.Generator().manual_seed(5)
    seqs = [torch.randint(1, 256, (n,), generator=g).tolist() for n in (17, 9, 30)]
    return collate_packed([{"input_ids": s, "labels": s} for s in seqs])


@pytest.mark.parametrize("method", ["nf4", "int8", "int4"])
def test_quantized_logits_close_to_float(method: str) -> None:
    ref = make_model(torch.float32, mamba_chunk_size=8)
    install_mixer(ref, "torch")
    q = quantized_model(method)
    assert all(is_quantized(layer.mamba.in_proj.weight) for layer in q.model.layers if hasattr(layer, "mamba"))
    assert base_weight_bytes(q) < base_weight_bytes(ref)
    b = {k: v for k, v in batch().items() if k != "labels"}
    with torch.no_grad():
        a, r = q(**b).logits, ref(**b).logits
    err = float((a - r).norm() / r.norm())
    assert err < QUANT_ERROR[method], err


@pytest.mark.parametrize("method", ["nf4", "int8", "int4", "fp8"])
def test_adapters_train_on_quantized_base(method: str, tmp_path: Path) -> None:
    model = apply_peft(quantized_model(method), PeftConfig(r=8, lora_alpha=16, target_modules=LORA_TARGETS))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad
              and not is_quantized(p)}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    b = batch()
    losses = []
    for _ in range(8):
        loss = mean_loss(model, b)
        loss.backward()
        assert all(p.grad is None for p in model.parameters() if not p.requires_grad)  # base gets no gradient
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 0.5, losses
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)

    # Adapter round trip: save, load onto a freshly quantized base, same logits.
    model.save_pretrained(tmp_path / "adapter")
    again = PeftModel.from_pretrained(quantized_model(method), str(tmp_path / "adapter")).eval()
    model.eval()
    inputs = {k: v for k, v in b.items() if k != "labels"}
    with torch.no_grad():
        torch.testing.assert_close(again(**inputs).logits, model(**inputs).logits, rtol=0, atol=1e-6)

    # Merge: dequantize the base, fold the adapter in; the plain model matches the quantized one with adapter.
    with torch.no_grad():
        before = model(**inputs).logits
        assert dequantize_model(model, torch.float32) > 0
        merged = model.merge_and_unload()
        after = merged(**inputs).logits
    assert float((after - before).abs().max()) < MERGE_ERROR[method]


def test_quantize_layer_refuses_an_unknown_method_naming_every_quant_method() -> None:
    valid = ", ".join(CHOICES["quant.method"])
    assert valid == "none, nf4, int8, int4, fp8"
    layer = make_model(torch.float32).model.layers[0]
    with pytest.raises(ConfigError, match=rf"quant.method='nf5' is not an option\. Did you mean 'nf4'\? Valid: {valid}"):
        quantize_layer(layer, QuantConfig(method="nf5"))
    assert quantize_layer(layer, QuantConfig(method="none")) == 0
    assert not any(is_quantized(p) for p in layer.parameters())


def test_an_int8_runs_adapter_loads_without_peft_warning_that_it_cannot_merge(tmp_path: Path) -> None:
    """peft warns that a TorchaoLoraLinear cannot merge(); bamba_ft merges into the dequantized base instead, so
    eval, generate and export, which load a trained adapter, must not print that warning (training does not)."""
    import warnings

    from bamba_ft.model.lora import load_adapter

    apply_peft(quantized_model("int8"), PeftConfig(r=8, lora_alpha=16, target_modules=LORA_TARGETS)).save_pretrained(
        tmp_path / "adapter")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        loaded = load_adapter(quantized_model("int8"), str(tmp_path / "adapter"))
    assert isinstance(loaded, PeftModel)
    assert not [w for w in seen if "get_apply_tensor_subclass" in str(w.message)], [str(w.message) for w in seen]
