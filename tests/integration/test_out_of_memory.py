"""A device out-of-memory error in training ends the run with exit status 2 and a message that names the batch,
the memory mode and the fixes (the error is injected through BAMBA_FT_FAULT: no machine here runs out)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bamba_ft import faults
from bamba_ft.errors import BambaFTError
from tests.integration.conftest import cli, run_in_process

ARGS = ["trainer=cpu", "trainer.max_steps=2", "trainer.enable_progress_bar=false", "data.builtin_train_examples=32",
        "data.builtin_val_examples=8", "data.max_seq_len=128", "data.max_tokens_per_batch=512",
        "eval.before_training=false", "eval.generate=false", "logger=none", "model.gradient_checkpointing=mamba"]


def assert_names_batch_mode_and_fixes(message: str, where: str) -> None:
    assert where in message and "CUDA out of memory (injected by BAMBA_FT_FAULT)" in message
    assert "tokens, longest sequence" in message and "data.max_tokens_per_batch=512, data.max_seq_len=128" in message
    assert "memory mode: model.gradient_checkpointing=mamba, model.activation_offload=false" in message
    for fix in ("model.gradient_checkpointing=all ", "model.activation_offload=true ", "data.max_tokens_per_batch=256 "):
        assert fix in message


def test_out_of_memory_in_training_exits_2_naming_batch_mode_and_fixes(tmp_path: Path) -> None:
    """Raised inside Lightning's fit: the CLI still ends it with one message and exit status 2, as it does any
    BambaFTError a task raises (the tests that check such errors in this process rely on that)."""
    proc = cli([*ARGS, f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, check=False,
               env={"BAMBA_FT_FAULT": "train.forward_oom@2"})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "BAMBA_FT_FAULT: raising at train.forward_oom" in proc.stderr and "Traceback" not in proc.stderr
    assert re.search(r"^bamba_ft: DeviceMemoryError: ", proc.stderr, re.M), proc.stderr[-3000:]  # one message
    assert_names_batch_mode_and_fixes(proc.stderr, "out of memory in the first training step")


def test_out_of_memory_in_the_gradient_probe_names_batch_mode_and_fixes(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Before the fit: a BambaFTError, which the CLI reports as the test above shows."""
    monkeypatch.setenv(faults.ENV, "train.forward_oom")
    monkeypatch.setattr(faults, "_hits", {})  # counted from this run's start, as in a fresh process
    with pytest.raises(BambaFTError) as error:
        run_in_process(ARGS, tmp_path / "run")
    assert "BAMBA_FT_FAULT: raising at train.forward_oom" in capsys.readouterr().err
    assert_names_batch_mode_and_fixes(str(error.value), "out of memory in the gradient probe")
