"""Memory modes: which decoder layers are recomputed, where saved tensors go, and that neither changes a number
(float64, tiny model: losses and every LoRA gradient identical within 1e-10)."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest
import torch
from peft import LoraConfig, get_peft_model

from bamba_ft.config.schema import BenchConfig, ModelConfig, RunConfig, validate
from bamba_ft.data.packing import collate_packed
from bamba_ft.errors import ConfigError
from bamba_ft.model import memory
from bamba_ft.model.memory import (
    OffloadActivations,
    activation_memory,
    apply_checkpointing,
    checkpointed_layers,
)
from bamba_ft.model.mixer import install_mixer
from bamba_ft.model.objective import mean_loss
from tests.conftest import make_model

TARGETS = ["in_proj", "out_proj", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]
# 4 layers, attention at 1: mamba = {0, 2, 3}, attention = {1}, every-2 = {0, 2}, all = {0, 1, 2, 3}
LAYERS = dict(num_hidden_layers=4, attn_layer_indices=[1])
EXPECTED = {"none": [], "all": [0, 1, 2, 3], "mamba": [0, 2, 3], "attention": [1], "every-2": [0, 2], "every-3": [0, 3]}


def lora_model(device: str = "cpu", dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    model = make_model(dtype, **LAYERS)
    install_mixer(model, "torch")
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-zero B: with B = 0 the A gradients vanish and hide a wrong recompute
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)
    return model.to(device).train()


def packed_batch(lengths: list[int], device: str = "cpu") -> dict:
    g = torch.Generator().manual_seed(7)
    seqs = [torch.randint(3, 256, (n,), generator=g).tolist() for n in lengths]
    batch = collate_packed([{"input_ids": s, "labels": [-100] + s[1:]} for s in seqs])
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def loss_and_grads(model: torch.nn.Module, batch: dict, offload: bool) -> tuple[torch.Tensor, dict]:
    for p in model.parameters():
        p.grad = None
    with activation_memory(model, offload):
        loss = mean_loss(model, batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_modes_choose_the_layers_of_bamba_9b() -> None:
    is_mamba = [i not in (9, 18, 27) for i in range(32)]
    assert checkpointed_layers("none", is_mamba) == []
    assert checkpointed_layers("all", is_mamba) == list(range(32))
    assert checkpointed_layers("attention", is_mamba) == [9, 18, 27]
    assert checkpointed_layers("mamba", is_mamba) == [i for i in range(32) if i not in (9, 18, 27)]
    assert checkpointed_layers("every-4", is_mamba) == [0, 4, 8, 12, 16, 20, 24, 28]
    assert checkpointed_layers("every-1", is_mamba) == list(range(32))


@pytest.mark.parametrize("given,canonical", [(True, "all"), (False, "none"), ("True", "all"), ("false", "none"),
                                             ("mamba", "mamba"), ("every-2", "every-2")])
def test_old_boolean_settings_read_as_all_or_none(given: object, canonical: str) -> None:
    assert ModelConfig(gradient_checkpointing=given).gradient_checkpointing == canonical


@pytest.mark.parametrize("bad", ["sometimes", "every-0", "every-x", "every2", "Mamba", "2"])
def test_bad_checkpointing_form_names_the_key_and_the_forms(bad: str) -> None:
    cfg = RunConfig(model=ModelConfig(gradient_checkpointing=bad))
    with pytest.raises(ConfigError, match=r"model.gradient_checkpointing=.* Valid: none, all, mamba, attention, every-K"):
        validate(cfg)


@pytest.mark.parametrize("bad", ["all+offlaod", "sometimes+offload", "every-0"])
def test_bad_bench_memory_mode_names_the_key(bad: str) -> None:
    cfg = RunConfig(bench=BenchConfig(memory_modes=["all", bad]))
    with pytest.raises(ConfigError, match=r"bench.memory_modes"):
        validate(cfg)
    validate(replace(cfg, bench=BenchConfig(memory_modes=["none", "mamba+offload", "every-3", "all+offload"])))


@pytest.mark.parametrize("mode", list(EXPECTED))
def test_exactly_the_chosen_layers_are_recomputed(mode: str) -> None:
    model = lora_model()
    assert apply_checkpointing(model, mode) == EXPECTED[mode]
    calls = [0] * 4
    for i, layer in enumerate(model.base_model.model.model.layers):  # the MLP runs again when its layer is recomputed
        layer.feed_forward.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    mean_loss(model, packed_batch([5, 17, 9])).backward()
    assert calls == [2 if i in EXPECTED[mode] else 1 for i in range(4)]


def test_losses_and_lora_gradients_are_identical_in_every_mode() -> None:
    model = lora_model()
    batch = packed_batch([5, 17, 9, 1, 12])
    apply_checkpointing(model, "none")
    ref_loss, ref_grads = loss_and_grads(model, batch, offload=False)
    assert len(ref_grads) == 2 * (3 * 2 + 1 * 4 + 4 * 2) and all(bool(g.abs().max() > 0) for g in ref_grads.values())
    for mode, offload in [("all", False), ("mamba", False), ("attention", False), ("every-2", False),
                          ("none", True), ("all", True), ("mamba", True), ("every-2", True)]:
        apply_checkpointing(model, mode)
        loss, grads = loss_and_grads(model, batch, offload)
        torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-10, msg=f"{mode} offload={offload}")
        for name, g in grads.items():
            torch.testing.assert_close(g, ref_grads[name], rtol=0, atol=1e-10, msg=f"{mode} offload={offload}: {name}")


class Spy:
    """Records what the offload hooks send to the host (through torch's save_on_cpu pack) and bring back."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.packed: list[torch.Tensor] = []
        self.results: list[tuple] = []  # what save_on_cpu's pack returned: (device, host copy)
        self.unpacked = 0
        init = OffloadActivations.__init__

        def spying_init(hooks: OffloadActivations, model: torch.nn.Module) -> None:
            init(hooks, model)
            pack, unpack = hooks.inner.pack_hook, hooks.inner.unpack_hook

            def spying_pack(t: torch.Tensor) -> tuple:
                self.packed.append(t)
                self.results.append(pack(t))
                return self.results[-1]

            def spying_unpack(packed: tuple) -> torch.Tensor:
                self.unpacked += 1
                return unpack(packed)

            hooks.inner.pack_hook, hooks.inner.unpack_hook = spying_pack, spying_unpack

        monkeypatch.setattr(OffloadActivations, "__init__", spying_init)


def layer_inputs(model: torch.nn.Module) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    for layer in model.base_model.model.model.layers:
        layer.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    return seen


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape


def test_offload_receives_each_checkpointed_layers_input(monkeypatch: pytest.MonkeyPatch) -> None:
    spy = Spy(monkeypatch)
    model = lora_model()
    apply_checkpointing(model, "mamba")
    inputs = layer_inputs(model)
    with activation_memory(model, offload=True) as hooks:
        loss = mean_loss(model, packed_batch([5, 17, 9]))
    assert len(inputs) == 4
    for i in EXPECTED["mamba"]:  # the input a checkpointed layer keeps went through save_on_cpu's pack
        assert any(_same(t, inputs[i]) for t in spy.packed), f"layer {i}'s input was not offloaded"
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert not any(t.untyped_storage().data_ptr() in params for t in spy.packed)  # weights stay put
    assert hooks.offloaded == len(spy.packed) and hooks.held > 0
    loss.backward()
    assert spy.unpacked == len(spy.packed)  # backward read every offloaded tensor back


def test_offload_under_all_sends_only_layer_inputs_and_outer_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inside a checkpointed layer nothing is saved (checkpoint's own hooks take over): what reaches the host is
    the 4 layer inputs plus the few tensors saved outside the layers, far fewer than without checkpointing."""
    spy = Spy(monkeypatch)
    model = lora_model()
    batch = packed_batch([5, 17, 9])
    apply_checkpointing(model, "none")
    with activation_memory(model, offload=True):
        mean_loss(model, batch)
    without = len(spy.packed)
    spy.packed.clear()
    apply_checkpointing(model, "all")
    inputs = layer_inputs(model)
    with activation_memory(model, offload=True):
        mean_loss(model, batch)
    assert all(any(_same(t, x) for t in spy.packed) for x in inputs)
    assert len(spy.packed) <= len(inputs) + 8 < without


def test_memory_settings_apply_on_resume_and_old_boolean_is_no_change() -> None:
    from dataclasses import asdict

    from bamba_ft.jobs.checkpoints import config_changes

    old = asdict(RunConfig())
    old["model"]["gradient_checkpointing"] = True  # what runs saved before the setting named layers
    applied, refused = config_changes(old, RunConfig(model=ModelConfig(gradient_checkpointing="all")))
    assert not refused and not any("gradient_checkpointing" in c for c in applied)
    new = RunConfig(model=ModelConfig(gradient_checkpointing="mamba", activation_offload=True))
    applied, refused = config_changes(old, new)
    assert not refused and len(applied) == 2


def test_offload_with_fsdp_is_refused() -> None:
    cfg = RunConfig(model=ModelConfig(activation_offload=True))
    cfg.trainer.strategy = "fsdp"
    with pytest.raises(ConfigError, match=r"model.activation_offload=true with trainer.strategy=fsdp"):
        validate(cfg)


@pytest.mark.gpu
def test_offload_moves_checkpointed_inputs_to_pinned_host_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    spy = Spy(monkeypatch)
    model = lora_model("cuda", torch.float32)
    apply_checkpointing(model, "all")
    batch = packed_batch([3000, 1096], "cuda")
    allocated = {}
    for offload in (False, True):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        with activation_memory(model, offload):
            loss = mean_loss(model, batch)
        torch.cuda.synchronize()
        allocated[offload] = torch.cuda.memory_allocated() - before
        loss.backward()
        del loss
    per_input = 4096 * 64 * 4  # tokens x hidden x float32
    assert allocated[False] - allocated[True] >= 4 * per_input  # the 4 layer inputs left the device
    assert any(t.is_cuda for t in spy.packed)
    assert all(copy.device.type == "cpu" and copy.is_pinned() for _, copy in spy.results)  # all went to pinned memory


def test_out_of_memory_message_names_batch_mode_and_fixes() -> None:
    cfg = RunConfig(model=ModelConfig(gradient_checkpointing="mamba"))
    e = memory.out_of_memory_error(cfg, "the first training step", (8192, 8000), torch.OutOfMemoryError("CUDA out of memory."))
    text = str(e)
    assert "out of memory in the first training step (CUDA out of memory.)" in text
    assert "8,192 tokens, longest sequence 8,000" in text and "data.max_tokens_per_batch=4096" in text
    assert "model.gradient_checkpointing=mamba, model.activation_offload=false" in text
    assert "model.gradient_checkpointing=all " in text and "model.activation_offload=true " in text
    assert "data.max_tokens_per_batch=2048" in text
    done = RunConfig(model=ModelConfig(gradient_checkpointing="all", activation_offload=True))
    text = str(memory.out_of_memory_error(done, "x", None, RuntimeError("oom")))
    assert "model.gradient_checkpointing=all " not in text and "model.activation_offload=true " not in text
    assert "model.cuda_graphs=false" not in text
    with_graphs = str(memory.out_of_memory_error(done, "x", None, RuntimeError("oom"), graphs=True))
    assert re.search(r"model.cuda_graphs=false +no CUDA graphs of the conv\+scan", with_graphs)


@pytest.mark.parametrize(("shape", "expected"), [
    # granitemoehybrid: mamba, attention, mamba (every layer holds a `mamba` attribute, None on attention layers)
    ("tiny-random-granitemoehybrid", {"mamba": [0, 2], "attention": [1], "every-2": [0, 2]}),
    # falcon_h1: every layer runs a Mamba-2 mixer and attention side by side
    ("tiny-random-falcon_h1", {"mamba": [0, 1], "attention": [0, 1], "every-2": [0]}),
    # nemotron_h: mamba, mlp, mamba, attention, mlp blocks (the mixer of every block is `mixer`)
    ("tiny-random-nemotron_h", {"mamba": [0, 2], "attention": [3], "every-2": [0, 2, 4]}),
])
def test_modes_find_mamba_and_attention_layers_in_every_family(shape: str, expected: dict[str, list[int]]) -> None:
    from bamba_ft.model.build import shape_config
    from bamba_ft.model.families import family_for

    config = shape_config(shape)
    model = family_for(config.model_type).causal_lm_class(config)
    for mode, layers in expected.items():
        assert apply_checkpointing(model, mode) == layers
        assert [i for i, layer in enumerate(model.model.layers) if layer.gradient_checkpointing] == layers


@pytest.mark.parametrize("mode", ["none", "mamba", "all"])
def test_auto_keeps_scan_states_only_in_checkpointed_layers_and_changes_no_number(
        monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    """model.scan_states=auto through a whole LoRA model, its conv+scan fused (torch stand-ins for the kernels): the
    Mamba layers that are checkpointed keep the scan's states, made again by the recompute in backward, and the
    others recompute them; the loss and every LoRA gradient equal the recomputing path's (float64, 1e-10)."""
    from bamba_ft.config.schema import Mixer
    from bamba_ft.model.mixer import on_mixers
    from bamba_ft.ops import mamba2
    from tests.unit.test_conv_scan import KeepingTorchOps, TorchOps

    monkeypatch.setitem(mamba2._CONV_SCANS, Mixer.TORCH, mamba2.conv_scan)
    model = lora_model()
    batch = packed_batch([5, 17, 9])
    apply_checkpointing(model, mode)
    results, calls = {}, {}
    for ops in (TorchOps, KeepingTorchOps):
        TorchOps.calls.clear()
        KeepingTorchOps.kept.clear()
        with on_mixers(model, conv_scan_ops=ops):
            results[ops] = loss_and_grads(model, batch, offload=False)
        calls[ops] = dict(TorchOps.calls)
    checkpointed_mamba = len(set(EXPECTED[mode]) & {0, 2, 3})
    assert calls[KeepingTorchOps].get("scan_bwd_kept", 0) == checkpointed_mamba
    assert calls[KeepingTorchOps].get("scan_fwd_keep", 0) == 2 * checkpointed_mamba  # forward, then the recompute
    torch.testing.assert_close(results[KeepingTorchOps][0], results[TorchOps][0], rtol=0, atol=1e-10)
    for name, g in results[TorchOps][1].items():
        torch.testing.assert_close(results[KeepingTorchOps][1][name], g, rtol=0, atol=1e-10, msg=name)
