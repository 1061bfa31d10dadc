"""A packed row must give every sequence exactly what it gets alone: logits and LoRA gradients (float64)."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from bamba_ft.config.schema import DataConfig, PeftConfig
from bamba_ft.data.packing import collate_packed
from bamba_ft.errors import ConfigError, ModelError
from bamba_ft.model.lora import apply_peft, check_adapter_gradients
from bamba_ft.model.mixer import install_mixer, packing_safe
from bamba_ft.model.objective import mean_loss
from bamba_ft.ops.attention import register_varlen_attention
from tests.conftest import LORA_TARGETS, make_model


@pytest.fixture(autouse=True)
def float64_throughout(monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers' BambaRMSNorm and eager attention softmax round to float32 even for float64 inputs, so
    rows of different lengths differ at ~1e-8 from float32 summation order alone. Widen both to the input
    dtype so these comparisons measure packing alone."""
    from transformers.models.bamba import modeling_bamba as mb

    def rmsnorm(self, x):  # noqa: ANN001, ANN202
        h = x.to(torch.promote_types(x.dtype, torch.float32))
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)).to(x.dtype)

    def eager(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):  # noqa: ANN001, ANN202
        key, value = mb.repeat_kv(key, module.num_key_value_groups), mb.repeat_kv(value, module.num_key_value_groups)
        scores = torch.matmul(query, key.transpose(2, 3)) * scaling
        if attention_mask is not None:
            scores = scores + attention_mask
        weights = torch.softmax(scores.to(torch.promote_types(query.dtype, torch.float32)), dim=-1).to(query.dtype)
        return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights

    monkeypatch.setattr(mb.BambaRMSNorm, "forward", rmsnorm)
    monkeypatch.setattr(mb, "eager_attention_forward", eager)


def lora_model(attn: str, chunk: int, groups: int, seed: int = 0) -> torch.nn.Module:
    if attn == "varlen":
        register_varlen_attention()
    model = make_model(torch.float64, seed=seed, attn=attn, mamba_chunk_size=chunk, mamba_n_groups=groups)
    install_mixer(model, "torch")
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # non-zero B: with B = 0 the A gradients vanish and hide bugs
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)
    return model.double()


def packed_vs_alone(model: torch.nn.Module, lengths: list[int], vocab: int = 256) -> tuple[float, float]:
    """(max |logit diff|, max |grad diff|) between one packed row and the sequences run one by one."""
    g = torch.Generator().manual_seed(7)
    seqs = [torch.randint(1, vocab, (n,), generator=g) for n in lengths]
    weights = [torch.randn(n, vocab, generator=g, dtype=torch.float64) for n in lengths]
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}

    model.zero_grad()
    batch = collate_packed([{"input_ids": s.tolist(), "labels": s.tolist()} for s in seqs])
    batch.pop("labels")
    logits = model(**batch, use_cache=False).logits[0]
    (logits * torch.cat(weights)).sum().backward()
    packed_grads = {n: p.grad.clone() for n, p in params.items()}
    packed_logits = logits.detach()

    model.zero_grad()
    alone = []
    for s, w in zip(seqs, weights):
        out = model(input_ids=s[None], use_cache=False).logits[0]
        (out * w).sum().backward()  # gradients accumulate over the sequences, as in the packed row
        alone.append(out.detach())
    logit_diff = float((packed_logits - torch.cat(alone)).abs().max())
    grad_diff = max(float((packed_grads[n] - p.grad).abs().max()) for n, p in params.items())
    assert all(float(p.grad.abs().max()) > 0 for p in params.values())
    return logit_diff, grad_diff


@pytest.mark.parametrize("attn", ["eager", "sdpa", "varlen"])
@pytest.mark.parametrize("chunk,groups,lengths", [
    (4, 1, [8, 1, 4, 7, 1, 3]),  # edges on chunk boundaries, length-1 sequences
    (8, 2, [5, 11, 1, 16, 2]),  # mid-chunk boundaries, two groups
    (16, 1, [33, 3, 1, 20]),  # sequences spanning several chunks
])
def test_packed_equals_alone_float64(attn: str, chunk: int, groups: int, lengths: list[int]) -> None:
    model = lora_model(attn, chunk, groups)
    logit_diff, grad_diff = packed_vs_alone(model, lengths)
    assert logit_diff < 1e-8, logit_diff
    assert grad_diff < 1e-8, grad_diff


def test_stock_transformers_mixer_leaks_across_packed_sequences() -> None:
    """Why packing is refused on model.mixer=hf: transformers' torch path carries state into the next sequence."""
    model = make_model(torch.float64, mamba_chunk_size=4)
    lengths = [6, 5]
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(1, 256, (n,), generator=g) for n in lengths]
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    with torch.no_grad():
        packed = model(input_ids=torch.cat(seqs)[None], position_ids=pos).logits[0]
        second = model(input_ids=seqs[1][None]).logits[0]
    assert float((packed[6:] - second).abs().max()) > 1e-3


def test_packing_safe_only_with_exact_mixer() -> None:
    model = make_model(torch.float32)
    assert install_mixer(model, "hf") == "hf"
    assert not packing_safe(model)
    install_mixer(model, "torch")
    assert packing_safe(model)


def test_every_lora_tensor_gets_gradient() -> None:
    model = make_model(torch.float32)
    install_mixer(model, "torch")
    model = apply_peft(model, PeftConfig(r=4, target_modules=LORA_TARGETS))
    batch = collate_packed([{"input_ids": list(range(1, 12)), "labels": list(range(1, 12))},
                            {"input_ids": list(range(5, 9)), "labels": list(range(5, 9))}])
    norms = check_adapter_gradients(model, batch, mean_loss)
    modules = {n.split(".lora_")[0] for n in norms}
    assert len(norms) == 2 * len(modules)  # lora_A and lora_B of each adapted module
    assert all(v > 0 for v in norms.values())
    for t in LORA_TARGETS:
        assert any(m.endswith(t) for m in modules), t
    # peft's default init (B = 0) is restored after the probe
    assert all(float(p.abs().max()) == 0 for n, p in model.named_parameters() if "lora_B" in n)


def test_gradient_check_names_bypassed_module() -> None:
    """A forward that reads out_proj.weight directly (as transformers' fused CUDA kernel does) is caught."""
    model = make_model(torch.float32)
    install_mixer(model, "torch")
    model = apply_peft(model, PeftConfig(r=4, target_modules=LORA_TARGETS))
    out_proj = model.base_model.model.model.layers[0].mamba.out_proj
    out_proj.forward = lambda y: torch.nn.functional.linear(y, out_proj.base_layer.weight)  # skips the adapter
    batch = collate_packed([{"input_ids": list(range(1, 12)), "labels": list(range(1, 12))}])
    with pytest.raises(ModelError, match=r"layers\.0\.mamba\.out_proj"):
        check_adapter_gradients(model, batch, mean_loss)


def test_packing_refused_on_stock_mixer(tmp_path) -> None:  # noqa: ANN001
    from bamba_ft.config.schema import RunConfig
    from bamba_ft.jobs import train

    cfg = RunConfig(output_dir=str(tmp_path))
    cfg.model.mixer, cfg.model.init, cfg.model.shape = "hf", "random", "tiny"
    cfg.data = DataConfig(builtin_train_examples=8, builtin_val_examples=4)
    cfg.trainer.accelerator = "cpu"
    with pytest.raises(ConfigError, match="data.packing=true: the active mixer path"):
        train.run(cfg)


def test_dora_and_rslora_adapters_train_through_the_mixer() -> None:
    """DoRA reads its base weight through the module, so bamba_ft's module calls keep it trainable."""
    model = make_model(torch.float32)
    install_mixer(model, "torch")
    model = apply_peft(model, PeftConfig(r=4, target_modules=LORA_TARGETS, use_dora=True, use_rslora=True))
    batch = collate_packed([{"input_ids": list(range(1, 20)), "labels": list(range(1, 20))},
                            {"input_ids": list(range(7, 12)), "labels": list(range(7, 12))}])
    norms = check_adapter_gradients(model, batch, mean_loss)
    assert any("lora_magnitude_vector" in n for n in norms) and all(v > 0 for v in norms.values())
