"""bamba_ft's fused LoRA forward against peft's own, and its fallbacks."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.layer import Linear as LoraLinear

from bamba_ft.model.lora import _FusedLoraForward, fuse_lora_forward
from tests.conftest import LORA_TARGETS, make_model


def lora_model(dtype: torch.dtype, **lora_kw) -> torch.nn.Module:
    model = get_peft_model(make_model(dtype), LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, **lora_kw))
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)  # B = 0 would leave A's gradient zero and hide errors
    return model


def loss_and_grads(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids).logits
    logits.float().pow(2).mean().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_fused_forward_equals_peft_float64() -> None:
    model = lora_model(torch.float64)
    ids = torch.randint(3, 256, (2, 21))
    ref_logits, ref_grads = loss_and_grads(model, ids)
    assert fuse_lora_forward(model) == 2 * 3  # in_proj, out_proj (layer 0); q, k, v, o (layer 1)
    logits, grads = loss_and_grads(model, ids)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-12, atol=1e-12)
    assert grads.keys() == ref_grads.keys()
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-10, atol=1e-12, msg=n)
        assert grads[n].abs().max() > 0, n


def test_fused_forward_bf16_base_with_float32_adapters() -> None:
    """peft keeps adapters in float32 on a bfloat16 base; without autocast the fused path casts like peft."""
    model = lora_model(torch.bfloat16)
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float32}
    ids = torch.randint(3, 256, (2, 21))
    ref_logits, ref_grads = loss_and_grads(model, ids)
    fuse_lora_forward(model)
    logits, grads = loss_and_grads(model, ids)
    assert logits.dtype == ref_logits.dtype
    scale = ref_logits.float().abs().max()
    assert (logits.float() - ref_logits.float()).abs().max() / scale < 2e-2  # bf16 rounding of the adapter term
    for n in grads:
        assert grads[n].dtype == torch.float32
        rel = (grads[n] - ref_grads[n]).norm() / ref_grads[n].norm()
        assert rel < 5e-2, (n, float(rel))


@pytest.mark.parametrize("case", ["disabled", "merged", "dora", "dropout"])
def test_fallbacks_and_dropout_match_peft(case: str) -> None:
    kw = {"use_dora": True} if case == "dora" else {"lora_dropout": 0.5} if case == "dropout" else {}
    model = lora_model(torch.float64, **kw)
    ids = torch.randint(3, 256, (1, 13))
    if case == "merged":
        model.merge_adapter()
    model.train(case == "dropout")

    def run() -> torch.Tensor:
        torch.manual_seed(0)  # same dropout masks
        with model.disable_adapter() if case == "disabled" else torch.enable_grad():
            return model(input_ids=ids).logits.detach()

    ref = run()
    fuse_lora_forward(model)
    assert all(isinstance(m, _FusedLoraForward) for m in model.modules() if isinstance(m, LoraLinear))
    torch.testing.assert_close(run(), ref, rtol=1e-12, atol=1e-12)


def test_plain_base_with_bias_runs_one_function_and_matches_peft_float64() -> None:
    """A frozen biased Linear takes `_LoraLinear` (the adapter's input gradient accumulated in the base's GEMM)."""
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(12, 10), torch.nn.Tanh(), torch.nn.Linear(10, 7)).double()
    model = get_peft_model(base, LoraConfig(r=3, lora_alpha=6, target_modules=["0", "2"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    x = torch.randn(5, 4, 12, dtype=torch.float64, requires_grad=True)
    lora = [p for p in model.parameters() if p.requires_grad]

    def run() -> tuple[torch.Tensor, ...]:
        y = model(x)
        return (y, *torch.autograd.grad(y.pow(2).sum(), [x, *lora]))

    ref = run()
    fuse_lora_forward(model)
    got = run()
    assert type(got[0].grad_fn).__name__ == "_LoraLinearBackward"
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_subclassed_or_trainable_bases_keep_autograds_backward() -> None:
    """Only a plain frozen nn.Linear takes `_LoraLinear`: a subclass (e.g. the float8 base, whose `weight` holds
    codes) or a trainable base weight runs the fused forward with autograd's backward."""

    class Subclassed(torch.nn.Linear):
        pass

    base = torch.nn.Sequential(torch.nn.Linear(6, 5, bias=False), torch.nn.Linear(5, 4, bias=False)).double()
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["0", "1"]))
    fuse_lora_forward(model)
    layer = model.base_model.model[1]
    x = torch.randn(3, 6, dtype=torch.float64)
    assert type(model(x).grad_fn).__name__ == "_LoraLinearBackward"
    layer.base_layer.__class__ = Subclassed
    assert type(model(x).grad_fn).__name__ != "_LoraLinearBackward"
    layer.base_layer.__class__ = torch.nn.Linear
    layer.base_layer.weight.requires_grad_(True)
    assert type(model(x).grad_fn).__name__ != "_LoraLinearBackward"
