"""Several processes: each rank on its own device, and data parallelism equal to accumulation (gloo on CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bamba_ft.errors import ConfigError
from bamba_ft.jobs import runtime
from tests.integration.conftest import cli, run_in_process


@pytest.fixture
def four_gpus(monkeypatch: pytest.MonkeyPatch) -> list[torch.device]:
    chosen: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    for var in ("LOCAL_RANK", "SLURM_LOCALID"):
        monkeypatch.delenv(var, raising=False)
    return chosen


def test_each_rank_computes_on_the_gpu_of_its_local_rank(four_gpus: list[torch.device],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    assert runtime.choose_device("gpu") == torch.device("cuda", 0)  # the launching process is local rank 0
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert runtime.choose_device("gpu") == torch.device("cuda", 1)
    assert runtime.choose_device("auto", [2, 3]) == torch.device("cuda", 3)  # trainer.devices=[2,3]
    monkeypatch.delenv("LOCAL_RANK")
    monkeypatch.setenv("SLURM_LOCALID", "2")
    assert runtime.choose_device("gpu") == torch.device("cuda", 2)
    assert four_gpus == [torch.device("cuda", i) for i in (0, 1, 3, 2)]  # made current before any tensor
    monkeypatch.setenv("SLURM_LOCALID", "5")
    with pytest.raises(ConfigError, match=r"local rank 5 has no GPU.*nproc-per-node"):
        runtime.choose_device("gpu")
    assert runtime.choose_device("cpu") == torch.device("cpu")


RUN = ["recipe=sft", "model=tiny", "trainer=cpu", "logger=none", "trainer.max_steps=4",
       "trainer.val_check_interval=100", "eval.before_training=false", "eval.generate=false",
       "data.builtin_train_examples=64", "data.builtin_val_examples=24", "data.max_tokens_per_batch=512",
       "trainer.enable_progress_bar=false", "optim.warmup_steps=0"]


def _adapter(tmp_path: Path, name: str, *overrides: str) -> dict[str, torch.Tensor]:
    """Through the CLI for trainer.devices=2 (the launcher starts rank 1 from the command line), else in this process."""
    run = tmp_path / name
    if "trainer.devices=2" in overrides:
        cli([*RUN, *overrides, f"hydra.run.dir={run}"], cwd=tmp_path, timeout=600)
    else:
        run_in_process([*RUN, *overrides], run)
    return load_file(run / "adapter" / "adapter_model.safetensors")


@pytest.mark.slow
def test_ddp_on_two_ranks_equals_one_rank_accumulating_two(tmp_path: Path) -> None:
    """Rank r takes every 2nd batch from r on, so 2 ranks x 1 batch see what 1 rank sees in 2 accumulated batches."""
    ddp = _adapter(tmp_path, "ddp", "trainer.devices=2", "trainer.strategy=ddp")
    accumulated = _adapter(tmp_path, "accumulated", "trainer.accumulate_grad_batches=2")
    one_batch = _adapter(tmp_path, "one_batch")
    assert ddp.keys() == accumulated.keys()
    assert max(float((ddp[k] - accumulated[k]).abs().max()) for k in ddp) <= 1e-5
    # and the comparison can fail: one batch per step trains to a different adapter
    assert max(float((ddp[k] - one_batch[k]).abs().max()) for k in ddp) > 1e-3
    # validation loss summed over the ranks' shares equals the one-process evaluation after training
    metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert metrics["train"]["steps"] == 4
    assert abs(metrics["train"]["last_val_loss"] - metrics["after"]["val_loss"]) < 1e-5


def test_fsdp_without_gpus_is_refused_before_any_work(tmp_path: Path) -> None:
    proc = cli([*RUN, "trainer.devices=2", "trainer.strategy=fsdp", f"hydra.run.dir={tmp_path / 'run'}"],
               cwd=tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "trainer.strategy=fsdp needs CUDA GPUs" in proc.stderr and "Fix: trainer=ddp" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_fewer_batches_than_ranks_is_an_error_not_zero_steps(builtin_tokenizer) -> None:  # noqa: ANN001
    from types import SimpleNamespace

    from bamba_ft.config.schema import DataConfig
    from bamba_ft.data.module import BambaDataModule
    from bamba_ft.errors import DataError

    dm = BambaDataModule(DataConfig(builtin_train_examples=40, builtin_val_examples=8), builtin_tokenizer)
    dm.prepare()
    dm.trainer = SimpleNamespace(global_rank=1, world_size=2)  # 40 short rows fill one 4096-token batch
    with pytest.raises(DataError, match=r"(?s)fewer batches than the 2 ranks.*Fix: lower data.max_tokens_per_batch"):
        dm.train_dataloader()
    dm.cfg.max_tokens_per_batch = 256
    assert len(dm.train_dataloader()) >= 1
