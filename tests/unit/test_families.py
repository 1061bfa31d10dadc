"""Every supported family: a packed row gives each sequence exactly what it gets alone (logits and every LoRA
gradient, float64), and one sequence through bamba_ft's mixer equals transformers' own forward."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model

from bamba_ft.data.packing import collate_packed
from bamba_ft.errors import ConfigError
from bamba_ft.model.build import shape_config
from bamba_ft.model.families import family_for, family_of
from bamba_ft.model.lora import allow_mixer_out_proj
from bamba_ft.model.mixer import install_mixer, packing_safe, stock_forward, unsafe_attention
from bamba_ft.model.objective import loss_sum_and_count
from bamba_ft.ops.attention import register_varlen_attention
from bamba_ft.ops.mamba2 import _gated_rmsnorm
from tests.conftest import LORA_TARGETS, randomize_mixer_params
from tests.unit.test_packing_equivalence import packed_vs_alone

FAMILIES = ["granitemoehybrid", "falcon_h1", "nemotron_h"]
VOCAB = 128


def _wide(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _rmsnorm(self, x):  # noqa: ANN001, ANN202
    h = x.to(_wide(x.dtype))
    return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)).to(x.dtype)


def _falcon_gated_rmsnorm(self, hidden_states, gate=None):  # noqa: ANN001, ANN202
    """transformers' FalconH1RMSNormGated in float32 or wider (it rounds float64 inputs and gates to float32)."""
    dtype, acc = hidden_states.dtype, _wide(hidden_states.dtype)
    h = hidden_states.to(acc)
    if not self.norm_before_gate and gate is not None:
        h = h * F.silu(gate.to(acc))
    groups = h.view(*h.shape[:-1], self.n_groups, -1)
    groups = groups * torch.rsqrt(groups.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
    h = (self.weight.view(self.n_groups, -1) * groups).view_as(h)
    if self.norm_before_gate and gate is not None:
        h = h * F.silu(gate.to(acc))
    return h.to(dtype)


def _nemotron_rmsnorm(self, x):  # noqa: ANN001, ANN202
    h = x.to(_wide(x.dtype))
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
    return (self.weight.to(h.dtype) * h).to(x.dtype)


def _nemotron_causal_lm(self, input_ids=None, use_cache=None, **kwargs):  # noqa: ANN001, ANN202
    """transformers' NemotronHForCausalLM.forward without its `.float()` on the logits (float64 stays float64)."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    hidden = self.model(input_ids=input_ids, use_cache=use_cache, **kwargs).last_hidden_state
    return CausalLMOutputWithPast(logits=self.lm_head(hidden))


@pytest.fixture(autouse=True)
def float64_norms(monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers' norms round float64 inputs to float32, so rows of different lengths would differ at ~1e-8 from
    float32 rounding alone: widen them (same formulas) so the comparisons measure packing and the mixer alone."""
    from transformers.models.falcon_h1 import modeling_falcon_h1 as mf
    from transformers.models.granitemoehybrid import modeling_granitemoehybrid as mg
    from transformers.models.nemotron_h import modeling_nemotron_h as mn

    monkeypatch.setattr(mg.GraniteMoeHybridRMSNorm, "forward", _rmsnorm)
    monkeypatch.setattr(mg.GraniteMoeHybridRMSNormGated, "forward", _gated_rmsnorm)
    monkeypatch.setattr(mf.FalconH1RMSNorm, "forward", _rmsnorm)
    monkeypatch.setattr(mf.FalconH1RMSNormGated, "forward", _falcon_gated_rmsnorm)
    monkeypatch.setattr(mn.NemotronHRMSNorm, "forward", _nemotron_rmsnorm)
    monkeypatch.setattr(mn.NemotronHRMSNormGated, "forward", _gated_rmsnorm)
    monkeypatch.setattr(mn.NemotronHForCausalLM, "forward", _nemotron_causal_lm)


@contextmanager
def float_casts_widened() -> Iterator[None]:
    """`Tensor.float()` keeps float64 tensors float64. transformers' torch scans (and both mixers' `A_log.float()`)
    cast to float32 even in a float64 model; run both forwards under this to compare the math, not the rounding."""
    original = torch.Tensor.float
    torch.Tensor.float = lambda self, *args, **kwargs: self if self.dtype == torch.float64 else original(self)
    try:
        yield
    finally:
        torch.Tensor.float = original


def tiny(model_type: str, chunk: int = 16, groups: int = 1, **overrides) -> torch.nn.Module:
    """The family's tiny-random shape in float64, with `chunk`, `groups` and config overrides; seeded."""
    family = family_for(model_type)
    config = shape_config(f"tiny-random-{model_type}")
    keys = family.config_keys
    for key, value in {keys["chunk_size"]: chunk, keys["n_groups"]: groups, "use_cache": False, **overrides}.items():
        setattr(config, key, value)
    config._attn_implementation = "varlen"
    config._experts_implementation = "eager"  # torch's grouped GEMM has no float64 kernel
    register_varlen_attention()
    torch.manual_seed(0)
    model = family.causal_lm_class(config).double().eval()
    randomize_mixer_params(model)
    return model


def with_lora(model: torch.nn.Module) -> torch.nn.Module:
    install_mixer(model, "torch")
    with allow_mixer_out_proj(model):
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-zero B: with B = 0 the A gradients vanish and hide bugs
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)
    return model.double()


SLOW = pytest.mark.slow
def ours_and_transformers(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits through bamba_ft's mixer and through transformers' own forward (float32 casts widened in both)."""
    with torch.no_grad(), float_casts_widened():
        ours = model(input_ids=ids, use_cache=False).logits
        with stock_forward(model):
            return ours, model(input_ids=ids, use_cache=False).logits


CASES = [
    pytest.param(4, 1, [8, 1, 4, 7, 1, 3], marks=SLOW),  # boundaries on chunk edges, length-1 sequences
    (8, 2, [5, 11, 1, 16, 2]),  # mid-chunk boundaries, two groups, a length-1 sequence
]


@pytest.mark.parametrize("model_type", FAMILIES)
@pytest.mark.parametrize("chunk,groups,lengths", CASES)
def test_family_packed_equals_alone_float64(model_type: str, chunk: int, groups: int, lengths: list[int]) -> None:
    model = with_lora(tiny(model_type, chunk, groups))
    logit_diff, grad_diff = packed_vs_alone(model, lengths, vocab=VOCAB)
    assert logit_diff < 1e-8, logit_diff
    assert grad_diff < 1e-8, grad_diff


@pytest.mark.parametrize("model_type", FAMILIES)
@pytest.mark.parametrize("chunk,groups", [pytest.param(4, 1, marks=SLOW), (8, 2), pytest.param(16, 2, marks=SLOW)])
def test_family_single_sequence_equals_transformers(model_type: str, chunk: int, groups: int) -> None:
    model = tiny(model_type, chunk, groups)
    install_mixer(model, "torch")
    ids = torch.randint(1, VOCAB, (2, 37), generator=torch.Generator().manual_seed(5))
    ours, theirs = ours_and_transformers(model, ids)
    assert float(theirs.abs().max()) > 1e-3
    assert float((ours - theirs).abs().max()) < 1e-8


@pytest.mark.parametrize("model_type", ["granitemoehybrid", "falcon_h1", pytest.param("nemotron_h", marks=SLOW)])
def test_family_loss_matches_transformers_loss(model_type: str) -> None:
    """bamba_ft's chunked loss applies the family's logit scale (Granite divides, Falcon-H1 multiplies): same loss
    and LoRA gradients as cross-entropy over transformers' logits (in float64: its `labels=` loss rounds to float32)."""
    model = with_lora(tiny(model_type))
    ids = torch.randint(1, VOCAB, (1, 29), generator=torch.Generator().manual_seed(2))
    total, count = loss_sum_and_count(model, {"input_ids": ids, "labels": ids})
    (total / count).backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    logits = model(input_ids=ids, use_cache=False).logits[0, :-1]
    theirs = F.cross_entropy(logits, ids[0, 1:])
    theirs.backward()
    assert abs(float(total / count) - float(theirs)) < 1e-10
    assert max(float((ours[n] - p.grad).abs().max()) for n, p in model.named_parameters() if p.requires_grad) < 1e-10


@SLOW
def test_granite_attention_free_and_dense_variants_pack_exactly() -> None:
    """Granite 4.0-H variants: every layer a Mamba-2 layer (no attention), and no MoE experts."""
    for overrides in ({"layer_types": ["linear_attention"] * 3}, {"num_local_experts": 0}):
        model = with_lora(tiny("granitemoehybrid", 4, 2, **overrides))
        logit_diff, grad_diff = packed_vs_alone(model, [6, 1, 9, 4], vocab=VOCAB)
        assert logit_diff < 1e-8 and grad_diff < 1e-8, (overrides, logit_diff, grad_diff)


def test_granite_sdpa_is_not_packing_safe() -> None:
    """Granite's decoder builds its sdpa/eager mask without the packed positions: packed sequences would see each
    other there (shown here), so packing requires varlen or flash attention."""
    model = tiny("granitemoehybrid")
    install_mixer(model, "torch")
    assert packing_safe(model) and unsafe_attention(model) is None
    model.config._attn_implementation = "sdpa"
    assert not packing_safe(model) and unsafe_attention(model) == "sdpa"
    seqs = [torch.randint(1, VOCAB, (n,), generator=torch.Generator().manual_seed(n)) for n in (6, 5)]
    batch = collate_packed([{"input_ids": s.tolist(), "labels": s.tolist()} for s in seqs])
    batch.pop("labels")
    with torch.no_grad():
        packed = model(**batch, use_cache=False).logits[0]
        second = model(input_ids=seqs[1][None], use_cache=False).logits[0]
    assert float((packed[6:] - second).abs().max()) > 1e-4


def test_family_of_names_refused_and_unknown_model_types() -> None:
    with pytest.raises(ConfigError, match="zamba2.*tied"):
        family_for("zamba2")
    with pytest.raises(ConfigError, match="'llama' is not a Mamba-2 hybrid.*bamba"):
        family_for("llama")
    assert family_of(tiny("granitemoehybrid")).model_type == "granitemoehybrid"


@SLOW
@pytest.mark.parametrize("rms_norm,before_gate", [(False, True), (True, True)])
def test_falcon_gate_variants_pack_exactly_and_match_transformers(rms_norm: bool, before_gate: bool) -> None:
    """Falcon-H1's other gate settings: no norm (y * silu(gate)), and normalising before the gate."""
    overrides = dict(mamba_rms_norm=rms_norm, mamba_norm_before_gate=before_gate)
    model = tiny("falcon_h1", 4, 2, **overrides)
    install_mixer(model, "torch")
    ours, theirs = ours_and_transformers(model, torch.randint(1, VOCAB, (1, 21), generator=torch.Generator().manual_seed(4)))
    assert float((ours - theirs).abs().max()) < 1e-8
    logit_diff, grad_diff = packed_vs_alone(with_lora(tiny("falcon_h1", 4, 2, **overrides)), [7, 1, 5], vocab=VOCAB)
    assert logit_diff < 1e-8 and grad_diff < 1e-8, (logit_diff, grad_diff)


def test_falcon_multipliers_matter() -> None:
    """The tiny Falcon-H1 shape's ssm multipliers are live: dropping the mup vector changes the logits (so the
    equality with transformers above could not hold if bamba_ft's mixer skipped them)."""
    model = tiny("falcon_h1")
    install_mixer(model, "torch")
    ids = torch.randint(1, VOCAB, (1, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = model(input_ids=ids, use_cache=False).logits
        for layer in model.model.layers:
            layer.mamba.mup_vector.fill_(1.0)
        after = model(input_ids=ids, use_cache=False).logits
    assert float((before - after).abs().max()) > 1e-4


def test_granite_logit_scale_is_applied() -> None:
    assert family_for("granitemoehybrid").logit_scale(shape_config("tiny-random-granitemoehybrid")) == 0.25


@pytest.mark.parametrize("model_type", ["bamba", "granitemoehybrid", "falcon_h1", "nemotron_h"])
def test_lora_all_puts_adapters_on_each_familys_mlp(model_type: str) -> None:
    """peft=lora_all named Bamba's gate/up/down_proj, which Granite 4.0-H and Nemotron-H do not have: refused there.
    Its `mlp` now stands for the family's own MLP layers."""
    from omegaconf import OmegaConf

    from bamba_ft.config.schema import PeftConfig
    from bamba_ft.config.store import config_dirs
    from bamba_ft.model.lora import apply_peft

    preset = OmegaConf.load(config_dirs()[0] / "peft" / "lora_all.yaml")
    cfg = PeftConfig(method="lora", r=4, target_modules=list(preset.target_modules))
    model = tiny(model_type) if model_type != "bamba" else tiny_bamba()
    install_mixer(model, "torch")  # bamba_ft's mixer, which LoRA on out_proj needs
    model = apply_peft(model, cfg, fused=False)
    adapted = {n.split(".")[-4] for n, _ in model.named_parameters() if n.endswith("lora_A.default.weight")}
    assert set(family_for(model_type).mlp_targets) <= adapted and {"in_proj", "out_proj"} <= adapted


def tiny_bamba() -> torch.nn.Module:
    from transformers import BambaConfig, BambaForCausalLM

    config = BambaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         attn_layer_indices=[1], num_attention_heads=2, num_key_value_heads=1, mamba_n_heads=4,
                         mamba_d_head=16, mamba_d_state=8, mamba_chunk_size=16, use_cache=False)
    return BambaForCausalLM(config).eval()


def test_model_card_names_the_layers_lora_reached_and_every_source() -> None:
    """The card listed `mlp` as a target and the one-source `data.source` of a run trained on data.sources."""
    from bamba_ft.config.schema import DataConfig, SourceConfig
    from bamba_ft.jobs.model_card import _sources_text
    from bamba_ft.model.lora import expand_family_targets

    assert expand_family_targets("granitemoehybrid", ["in_proj", "mlp", "out_proj"]) == [
        "in_proj", "input_linear", "output_linear", "out_proj"]
    assert expand_family_targets("bamba", ["in_proj"]) == ["in_proj"]
    mix = DataConfig(sources=[SourceConfig(source="chat.jsonl", weight=0.7),
                              SourceConfig(source="qa.parquet", weight=0.3, format="prompt_completion")])
    assert _sources_text(mix) == "`chat.jsonl` (weight 0.7), `qa.parquet` (weight 0.3, format prompt_completion)"
    assert _sources_text(DataConfig(source="train.jsonl", format="alpaca")) == "`train.jsonl` (format alpaca)"


@pytest.mark.parametrize("model_type", ["falcon_h1", "granitemoehybrid"])
def test_adapter_only_export_card_loads_what_peft_refuses_through_bamba_ft(model_type: str, tmp_path) -> None:  # noqa: ANN001
    """Plain peft refuses LoRA on falcon_h1's (and nemotron_h's) out_proj, so the adapter-only export card's
    `PeftModel.from_pretrained(base, ...)` raised there: the card now says so and gives bamba_ft's commands (eval, and
    the merged export for transformers). Granite's out_proj adapter loads in peft, and its card keeps the snippet."""
    from types import SimpleNamespace

    from peft import PeftModel

    from bamba_ft.config.schema import ModelConfig, PeftConfig, RunConfig
    from bamba_ft.jobs.export import _write
    from bamba_ft.model.build import load_tokenizer
    from bamba_ft.model.lora import apply_peft

    model = tiny(model_type)
    install_mixer(model, "torch")
    model = apply_peft(model, PeftConfig(method="lora", r=2, target_modules=["in_proj", "out_proj"]), fused=False)
    cfg = RunConfig()
    cfg.export.adapter_only = True
    src = SimpleNamespace(run=None, run_dir=None, random_base=None, description="adapter A",
                          model=ModelConfig(name_or_path="org/base"))
    report = _write(model, load_tokenizer(ModelConfig()), cfg, src, tmp_path, tmp_path)
    card = (tmp_path / "README.md").read_text()
    stock = family_for(model_type).causal_lm_class(shape_config(f"tiny-random-{model_type}"))
    if model_type == "falcon_h1":
        with pytest.raises(ValueError, match="out_proj"):  # the call the card showed
            PeftModel.from_pretrained(stock, tmp_path)
        assert report["peft_refused_targets"] == ["out_proj"]
        assert "PeftModel.from_pretrained(base" not in card
        assert "peft refuses LoRA on `out_proj` of falcon_h1 models" in card
        assert "recipe=export export.checkpoint=<this directory>   # merged, for transformers" in card
    else:
        PeftModel.from_pretrained(stock, tmp_path)
        assert "peft_refused_targets" not in report
        assert 'model = PeftModel.from_pretrained(base, "<this directory>")' in card


@pytest.mark.parametrize("model_type", ["falcon_h1", "nemotron_h"])
def test_lora_on_out_proj_under_the_stock_mixer_is_refused_with_the_fix(model_type: str) -> None:
    """With transformers' own mixer (model.mixer=hf) peft's check on out_proj stays, and its ValueError ended the run
    in a traceback: a ConfigError now names the key and both fixes. bamba_ft's mixer still takes it."""
    from bamba_ft.config.schema import PeftConfig
    from bamba_ft.model.lora import apply_peft

    cfg = PeftConfig(method="lora", r=2, target_modules=["in_proj", "out_proj", "q_proj"])
    with pytest.raises(ConfigError, match=rf"peft.target_modules: peft refuses LoRA on out_proj of {model_type} models "
                                          r"with transformers' own Mamba-2 mixer \(model.mixer=hf.*\n.*Fix: "
                                          r"model.mixer=auto .*peft.target_modules=\[in_proj,q_proj\]"):
        apply_peft(tiny(model_type), cfg, fused=False)
    model = tiny(model_type)
    install_mixer(model, "torch")
    adapted = {n.split(".")[-4] for n, _ in apply_peft(model, cfg, fused=False).named_parameters() if "lora_A" in n}
    assert "out_proj" in adapted


def test_attention_free_granite_is_told_to_drop_the_attention_targets() -> None:
    """An attention-free Granite 4.0-H has no q/k/v/o_proj: the default targets gave four 'matches no module'
    problems, none with the override that works; one problem now says why and gives it (`mlp` kept as typed)."""
    from bamba_ft.config.schema import PeftConfig
    from bamba_ft.model.lora import apply_peft

    model = tiny("granitemoehybrid", layer_types=["linear_attention"] * 3)
    install_mixer(model, "torch")
    cfg = PeftConfig(method="lora", r=2, target_modules=["in_proj", "out_proj", "q_proj", "k_proj", "v_proj", "o_proj",
                                                         "mlp"])
    with pytest.raises(ConfigError, match=r"^1 problem.*\n.*peft.target_modules: q_proj, k_proj, v_proj, o_proj: "
                                          r"GraniteMoeHybridForCausalLM has no attention layers.*\n.*Fix: "
                                          r"peft.target_modules=\[in_proj,out_proj,mlp\]$"):
        apply_peft(model, cfg, fused=False)
    with pytest.raises(ConfigError, match="'q_prj' matches no module"):  # a typo is still a typo
        apply_peft(model, PeftConfig(method="lora", r=2, target_modules=["in_proj", "q_prj"]), fused=False)


def test_an_attention_free_granite_generates_in_batches(builtin_tokenizer) -> None:  # noqa: ANN001
    """transformers' generate sizes the attention mask through the cache's attention layers, and a cache without any
    raises on it. Such a model generates without a cache: a left-padded batch of prompts of different lengths gives
    each prompt's own greedy continuation (argmax of the whole sequence's forward, token by token)."""
    from bamba_ft.config.schema import Sampling
    from bamba_ft.jobs.evaluate import generate

    model = tiny("granitemoehybrid", layer_types=["linear_attention"] * 3, vocab_size=len(builtin_tokenizer))
    prompts = ["add 12 and 30", "sort cab", "reverse the word hello"]
    got = generate(model, builtin_tokenizer, prompts, Sampling(max_new_tokens=5, batch_size=3), torch.device("cpu"))
    assert all(len(answer) == 5 for answer in got)  # five characters each: no stop token came
    for prompt, answer in zip(prompts, got):
        ids = builtin_tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        start = ids.shape[1]
        with torch.no_grad():
            for _ in range(5):
                ids = torch.cat([ids, model(input_ids=ids, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
        assert answer == builtin_tokenizer.decode(ids[0, start:], skip_special_tokens=True)


def test_an_attention_free_granite_export_is_verified(tmp_path) -> None:  # noqa: ANN001
    """The export's check (logits and greedy tokens, here and reloaded with plain transformers in a new process)
    generates without a cache for a model without attention layers, as generation does."""
    from bamba_ft.jobs.export import _reference, verify_export
    from bamba_ft.model.families import has_attention_layers

    model = tiny("granitemoehybrid", layer_types=["linear_attention"] * 3).float()
    assert not has_attention_layers(model) and has_attention_layers(tiny("granitemoehybrid"))
    ids = torch.randint(3, 100, (1, 12), generator=torch.Generator().manual_seed(0))
    logits, generated = _reference(model, ids)
    assert generated.shape == (1, 6 + 8)
    model.save_pretrained(tmp_path / "export")
    report = verify_export(tmp_path / "export", ids, logits, generated, "float32", 1e-5, cache=False)
    assert report["greedy_generation_identical"] and report["max_rel_logit_diff"] <= 1e-5


@pytest.mark.parametrize("padded", [False, True])
def test_granite_training_adds_the_router_load_balancing_loss_as_transformers_does(padded: bool) -> None:
    """With output_router_logits, GraniteMoeHybridForCausalLM's loss is the next-token loss plus
    router_aux_loss_coef times the routers' load-balancing loss; bamba_ft's own loss left that term out. The same
    loss to 1e-6 (transformers rounds its cross-entropy to float32); validation stays the next-token loss."""
    model = with_lora(tiny("granitemoehybrid", output_router_logits=True, router_aux_loss_coef=0.5))
    ids = torch.randint(1, VOCAB, (2, 13), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    if padded:
        mask[1, 9:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    batch = {"input_ids": ids, "labels": labels} | ({"attention_mask": mask} if padded else {})
    total, count = loss_sum_and_count(model, batch, router_aux=True)  # as training computes it
    theirs = model(**batch, use_cache=False)
    assert float(theirs.aux_loss) > 0.5  # the term at stake: 0.5 times it is far above the tolerance
    assert abs(float(total / count) - float(theirs.loss)) < 1e-6
    plain, _ = loss_sum_and_count(model, batch)  # validation: the next-token loss alone
    assert abs(float(plain / count) + 0.5 * float(theirs.aux_loss) - float(theirs.loss)) < 1e-6
