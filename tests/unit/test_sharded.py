"""FSDP support without a process group: the empty build, sharded checkpoint directories, moving a resume to another
number of ranks, and the refusals. Training on two gloo ranks is in tests/integration/test_distributed.py."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from bamba_ft.config.schema import ModelConfig, PeftConfig, QuantConfig, RunConfig, validate
from bamba_ft.errors import ConfigError, ModelError
from bamba_ft.jobs.checkpoints import (
    CONFIG_KEY,
    WORLD_KEY,
    config_changes,
    remove_stale_temporaries,
    replace_path,
    resolve_resume,
    resume_on_ranks,
)
from bamba_ft.model.build import build_model
from bamba_ft.model.lora import apply_peft
from bamba_ft.model.restore import SHARDED_META, checkpoint_problem, checkpoint_state, read_sharded
from bamba_ft.model.shard import checkpoint_key, initial_values

CPU = torch.device("cpu")


@pytest.mark.parametrize("shape", [None, "tiny-random-falcon_h1"])
def test_empty_build_holds_adapters_and_buffers_only_with_the_one_process_values(shape: str | None) -> None:
    cfg = ModelConfig() if shape is None else ModelConfig(init="random", shape=shape)
    torch.manual_seed(3)
    full = apply_peft(build_model(cfg, QuantConfig(), CPU), PeftConfig(method="lora"))
    torch.manual_seed(3)
    empty = apply_peft(build_model(cfg, QuantConfig(), CPU, empty=True), PeftConfig(method="lora"))
    real = initial_values(empty)
    assert real and all("lora_" in n for n in real)  # the base holds no storage: its weights arrive sharded
    assert all(p.is_meta for n, p in empty.named_parameters() if "lora_" not in n)
    if cfg.init == "pretrained":  # a random base is drawn before the adapters in one process, after them here
        reference = full.state_dict()
        assert max(float((reference[n] - t).abs().max()) for n, t in real.items()) == 0.0  # as one process
    # non-persistent buffers (rotary frequencies; Falcon-H1's muP vector) are in no checkpoint: computed alike
    buffers = dict(full.named_buffers())
    assert max(float((buffers[n] - b).abs().max()) for n, b in empty.named_buffers()) == 0.0


def test_checkpoint_key_strips_peft_wrappers() -> None:
    assert checkpoint_key("base_model.model.model.layers.0.mamba.in_proj.base_layer.weight") == \
        "model.layers.0.mamba.in_proj.weight"
    assert checkpoint_key("base_model.model.lm_head.modules_to_save.default.weight") == "lm_head.weight"
    assert checkpoint_key("base_model.model.lm_head.original_module.weight") == "lm_head.weight"
    assert checkpoint_key("model.norm.weight") == "model.norm.weight"  # full fine-tuning: no wrapper


def _sharded(path: Path, step: int = 5) -> Path:
    """A sharded checkpoint directory as trainer.strategy=fsdp writes it (one writer here)."""
    dcp.save({"state_dict": {"model.a": torch.arange(6.0), "model.b": torch.ones(2, 3)}}, checkpoint_id=str(path))
    torch.save({"global_step": step, CONFIG_KEY: asdict(RunConfig())}, path / SHARDED_META)
    return path


def test_sharded_checkpoint_is_checked_read_and_resumed(tmp_path: Path) -> None:
    run = tmp_path / "run"
    ckpt = _sharded(run / "checkpoints" / "last.ckpt")
    assert checkpoint_problem(ckpt) is None
    assert checkpoint_state(ckpt)["global_step"] == 5
    assert resolve_resume(str(run), run) == ckpt
    assert resolve_resume(str(ckpt), run) == ckpt  # named directly
    into = {"model.a": torch.zeros(6), "model.b": torch.zeros(2, 3)}
    read_sharded(ckpt, into)
    assert torch.equal(into["model.a"], torch.arange(6.0)) and torch.equal(into["model.b"], torch.ones(2, 3))
    with pytest.raises(ModelError, match=r"lacks 1 trained tensors of this model \(first: model.c\)"):
        read_sharded(ckpt, {"model.c": torch.zeros(1)})
    shard = next(ckpt.glob("*.distcp"))
    shard.unlink()
    assert checkpoint_problem(ckpt) == f"a sharded checkpoint missing 1 shard file(s) (first: {shard.name})"
    (ckpt / SHARDED_META).write_bytes(b"cut")
    assert "without" not in checkpoint_problem(ckpt)  # meta.pt is checked as a file: truncated
    (ckpt / SHARDED_META).unlink()
    assert checkpoint_problem(ckpt) == "a directory without meta.pt (not a finished sharded checkpoint)"


def test_replacing_a_checkpoint_directory_survives_a_kill_between_the_renames(tmp_path: Path) -> None:
    ckpts = tmp_path / "checkpoints"
    last = _sharded(ckpts / "last.ckpt", step=2)
    replace_path(_sharded(ckpts / ".last.ckpt.partial", step=4), last)
    assert checkpoint_state(last)["global_step"] == 4 and not list(ckpts.glob(".*"))
    # killed after moving the old one aside, before moving the new one in: the next start puts the old one back
    last.rename(ckpts / ".last.ckpt.old")
    _sharded(ckpts / ".last.ckpt.partial", step=6)
    remove_stale_temporaries(tmp_path)
    assert checkpoint_state(last)["global_step"] == 4 and not list(ckpts.glob(".*"))


def _checkpoint(world: int, accumulate: int, processed: int, completed: int) -> dict:
    config = asdict(RunConfig())
    config["trainer"]["accumulate_grad_batches"] = accumulate
    counts = {"ready": processed, "started": processed, "processed": processed, "completed": completed}
    progress = {"total": dict(counts), "current": dict(counts), "is_last_batch": False}
    return {WORLD_KEY: world, CONFIG_KEY: config, "loops": {"fit_loop": {"epoch_loop.batch_progress": progress}}}


def test_resume_on_fewer_ranks_rescales_batches_done_and_keeps_the_batch_end_lag() -> None:
    ckpt = _checkpoint(world=2, accumulate=1, processed=3, completed=2)  # saved at the end of batch 3 of each rank
    resume_on_ranks(ckpt, world_size=1, accumulate=2)
    progress = ckpt["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]
    assert progress == {"ready": 6, "started": 6, "processed": 6, "completed": 5}
    ckpt = _checkpoint(world=1, accumulate=4, processed=8, completed=7)
    resume_on_ranks(ckpt, world_size=4, accumulate=1)
    assert ckpt["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]["processed"] == 2


def test_resume_on_other_ranks_refuses_another_step_size_and_a_split_step() -> None:
    with pytest.raises(ConfigError, match=r"(?s)2 ranks accumulating 1.*1 ranks accumulating 1.*"
                                          r"Fix: trainer.accumulate_grad_batches=2"):
        resume_on_ranks(_checkpoint(world=2, accumulate=1, processed=2, completed=1), world_size=1, accumulate=1)
    with pytest.raises(ConfigError, match=r"middle of an optimizer step.*\n.*Fix: resume from last.ckpt"):
        resume_on_ranks(_checkpoint(world=1, accumulate=2, processed=3, completed=2), world_size=2, accumulate=1)
    same = _checkpoint(world=2, accumulate=1, processed=3, completed=2)
    resume_on_ranks(same, world_size=2, accumulate=7)  # same ranks: nothing to move (config check covers the rest)
    assert same["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["processed"] == 3


def test_rank_keys_may_change_on_resume_except_for_a_stream() -> None:
    old = asdict(RunConfig())
    new = RunConfig()
    new.trainer.devices, new.trainer.accumulate_grad_batches = 4, 2
    assert config_changes(old, new) == (["trainer.accumulate_grad_batches: 1 -> 2", "trainer.devices: 1 -> 4"], [])
    new.data.streaming = True
    old["data"]["streaming"] = True
    refused = config_changes(old, new)[1]
    assert [r.split(" (")[0] for r in refused] == ["trainer.accumulate_grad_batches: 1 -> 2", "trainer.devices: 1 -> 4"]
    assert all("data.streaming=true" in r for r in refused)


def test_data_position_moves_to_another_number_of_ranks(builtin_tokenizer) -> None:  # noqa: ANN001
    from types import SimpleNamespace

    from bamba_ft.config.schema import DataConfig
    from bamba_ft.data.module import BambaDataModule

    dm = BambaDataModule(DataConfig(), builtin_tokenizer)
    dm.trainer = SimpleNamespace(world_size=1)
    dm.load_state_dict({"epoch": 1, "batches_done": 3, "world_size": 2})
    assert dm._resume == {"epoch": 1, "batches_done": 6}
    dm.trainer = SimpleNamespace(world_size=4)
    with pytest.raises(ConfigError, match=r"2 ranks had done 3 batches each, which 4 ranks cannot share"):
        dm.load_state_dict({"epoch": 1, "batches_done": 3, "world_size": 2})


@pytest.mark.parametrize(("key", "value", "message"), [
    ("quant.method", "nf4", r"quant.method=nf4 with trainer.strategy=fsdp.*\n.*Fix: trainer=ddp"),
    ("quant.method", "fp8", r"quant.method=fp8 with trainer.strategy=fsdp.*\n.*Fix: trainer=ddp"),
    ("peft.use_dora", True, r"peft.use_dora=true with trainer.strategy=fsdp.*\n.*Fix: peft.use_dora=false"),
    ("trainer.precision", "16-mixed", r"trainer.precision=16-mixed with trainer.strategy=fsdp.*\n.*bf16-mixed"),
])
def test_fsdp_refuses_what_it_cannot_shard(key: str, value: object, message: str) -> None:
    cfg = RunConfig()
    cfg.trainer.strategy = "fsdp"
    validate(cfg)  # the defaults shard
    group, name = key.split(".")
    setattr(getattr(cfg, group), name, value)
    with pytest.raises(ConfigError, match=message):
        validate(cfg)
