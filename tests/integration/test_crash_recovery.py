"""Training under faults: kill -9 at any moment, signals, a full disk, a second run, a changed config on resume.

Each case ends either in a complete run or in a run directory that holds only complete artifacts (and
temporaries the next run removes), from which a resume reaches the same final adapter as an uninterrupted run.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bamba_ft.errors import BambaFTError, ConfigError
from bamba_ft.jobs import train
from bamba_ft.jobs.callbacks import AtomicCheckpointIO
from tests.integration.conftest import ROOT, cli, run_in_process
from tests.integration.test_resume import small_run, stop_at

# 4 batches per epoch, a checkpoint every 2 steps, 8 steps: kills land in epochs 0 and 1
ARGS = ["trainer=cpu", "trainer.max_steps=8", "trainer.val_check_interval=4", "trainer.checkpoint_every_n_steps=2",
        "trainer.enable_progress_bar=false", "data.builtin_train_examples=60", "data.builtin_val_examples=16",
        "data.max_seq_len=128", "data.max_tokens_per_batch=512", "eval.before_training=false", "eval.generate=false",
        "logger=none"]


def adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "adapter" / "adapter_model.safetensors")


def assert_same_adapter(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    run = tmp_path_factory.mktemp("reference") / "run"
    run_in_process(ARGS, run)
    return adapter(run)


@pytest.mark.slow
@pytest.mark.parametrize("point", ["checkpoint.before_rename@3", "adapter.before_rename"])
def test_kill_9_then_resume_reaches_the_uninterrupted_adapter(point: str, reference: dict, tmp_path: Path) -> None:
    killed = tmp_path / "killed"
    proc = cli([*ARGS, f"hydra.run.dir={killed}"], cwd=tmp_path, check=False, env={"BAMBA_FT_FAULT": point})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    # Only complete artifacts under final names: a torn write is visible only as a temporary.
    assert not (killed / "adapter").exists()
    partial = list(killed.glob("checkpoints/.*.partial")) + list(killed.glob(".adapter.partial"))
    assert partial, "the kill should have left the writer's temporary behind"
    run_in_process([*ARGS, f"trainer.resume={killed}"], tmp_path / "resumed")  # only the killed run needs a process
    assert not [p for p in partial if p.exists()], "the resume removes what the killed writer left"
    assert_same_adapter(reference, adapter(tmp_path / "resumed"))


@pytest.mark.slow
def test_sigint_and_sigterm_exit_130_and_143_after_saving_a_resumable_checkpoint(tmp_path: Path) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    for sig, code in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        run, out = tmp_path / sig.name, tmp_path / f"{sig.name}.txt"
        with out.open("w") as log:
            proc = subprocess.Popen([sys.executable, "-m", "bamba_ft", *ARGS, "trainer.max_steps=500",
                                     f"hydra.run.dir={run}"], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
            deadline = time.time() + 120
            # last.ckpt (step 2, renamed into place whole) shows optimizer steps have run: a signal sent earlier may
            # land in the sanity check, where SIGTERM rightly stops with nothing new to save
            while not (run / "checkpoints" / "last.ckpt").exists() and proc.poll() is None and time.time() < deadline:
                time.sleep(0.1)
            proc.send_signal(sig)
            assert proc.wait(timeout=120) == code, out.read_text()[-2000:]
        ckpt = run / "checkpoints" / "interrupted.ckpt"
        assert ckpt.exists() and not list(run.rglob("*.partial"))
        assert "stopped at step" in out.read_text() and f"trainer.resume={run}" in out.read_text()
    # The command the stop printed continues from the checkpoint to a trained adapter.
    step = torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"]
    metrics = run_in_process([*ARGS, f"trainer.max_steps={step + 2}", f"trainer.resume={run}"], tmp_path / "resumed")
    assert metrics["train"]["steps"] == step + 2
    assert (tmp_path / "resumed/adapter/adapter_model.safetensors").exists()


def test_a_second_run_into_a_live_run_directory_is_refused(tmp_path: Path) -> None:
    run = tmp_path / "run"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    first = subprocess.Popen([sys.executable, "-m", "bamba_ft", *ARGS, "trainer.max_steps=500",
                              f"hydra.run.dir={run}"], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while not (run / ".hydra" / "overrides.yaml").exists() and time.time() < deadline:
            time.sleep(0.2)
        overrides = (run / ".hydra" / "overrides.yaml").read_text()
        second = cli([*ARGS, "optim.lr=1e-3", f"hydra.run.dir={run}"], cwd=tmp_path, check=False)
        assert second.returncode == 2
        assert f"in use by a live bamba_ft run (pid {first.pid}" in second.stderr
        assert "Traceback" not in second.stderr
        assert (run / ".hydra" / "overrides.yaml").read_text() == overrides  # nothing of the second run written
    finally:
        first.kill()
        first.wait()


def test_resume_applies_a_changed_lr_and_refuses_a_changed_rank(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = small_run(tmp_path / "first", steps=6)
    first.optim.scheduler = "constant"
    first.optim.warmup_steps = 0
    stop_at(monkeypatch, 3)
    assert train.run(first)["stopped_at"] == 3
    monkeypatch.undo()

    changed_rank = small_run(tmp_path / "rank", resume=str(tmp_path / "first"), steps=6)
    changed_rank.optim.scheduler = "constant"
    changed_rank.optim.warmup_steps = 0
    changed_rank.peft.r = 8
    with pytest.raises(ConfigError, match=r"(?s)peft\.r: 16 -> 8.*start a new run"):
        train.run(changed_rank)

    lrs: list[float] = []
    from bamba_ft.lit_module import BambaLitModule

    def record(self, *args):  # noqa: ANN001, ANN202
        lrs.append(self.trainer.optimizers[0].param_groups[0]["lr"])

    monkeypatch.setattr(BambaLitModule, "on_train_batch_start", record, raising=False)
    resumed = small_run(tmp_path / "second", resume=str(tmp_path / "first"), steps=6)
    resumed.optim.scheduler = "constant"
    resumed.optim.warmup_steps = 0
    resumed.optim.lr = 1e-3
    train.run(resumed)
    assert lrs == [1e-3] * 3  # steps 4-6 at the new rate, not the checkpoint's 2e-4
    assert "lr: 0.001" in (tmp_path / "second" / "run_config.yaml").read_text()


def test_last_checkpoint_is_written_once_at_the_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    saved: list[str] = []
    original = AtomicCheckpointIO.save_checkpoint

    def record(self, checkpoint, path, storage_options=None):  # noqa: ANN001, ANN202
        saved.append(f"{Path(path).name}@{checkpoint['global_step']}")
        return original(self, checkpoint, path, storage_options)

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", record)
    cfg = small_run(tmp_path / "run", steps=4)
    cfg.trainer.checkpoint_every_n_steps = 2
    cfg.trainer.save_top_k = 0
    train.run(cfg)
    assert saved == ["last.ckpt@2", "last.ckpt@4"]


def test_a_full_disk_at_the_adapter_save_names_the_recovery(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from peft import PeftModel

    def full(self, directory, *args, **kwargs):  # noqa: ANN001, ANN202
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / "adapter_model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device", str(directory))

    monkeypatch.setattr(PeftModel, "save_pretrained", full)
    cfg = small_run(tmp_path / "run", steps=2)
    with pytest.raises(BambaFTError, match=r"(?s)No space left on device.*last\.ckpt.*export\.adapter_only=true"):
        train.run(cfg)
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()
    assert not (tmp_path / "run" / "adapter").exists() and not (tmp_path / "run" / ".adapter.partial").exists()


def test_sigterm_during_validation_saves_the_step_and_reports_the_stop(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Lightning ends a fit at its next check after SIGTERM, here inside validation, before another training batch
    ends; the run must still save its step and report a stop (it used to exit 0 without a checkpoint)."""
    from bamba_ft.jobs.callbacks import GracefulStop

    def sigterm_in_validation(self, trainer, *args):  # noqa: ANN001, ANN202
        if trainer.global_step == 3:
            trainer._signal_connector.received_sigterm = True

    monkeypatch.setattr(GracefulStop, "on_validation_batch_start", sigterm_in_validation, raising=False)
    cfg = small_run(tmp_path / "run", steps=6)  # validation after step 3
    result = train.run(cfg)
    assert result == {"stopped_at": 3, "signal": "SIGTERM"}
    saved = torch.load(tmp_path / "run" / "checkpoints" / "interrupted.ckpt", map_location="cpu", weights_only=False)
    assert saved["global_step"] == 3
