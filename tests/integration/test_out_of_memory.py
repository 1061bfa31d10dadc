"""A device out-of-memory error in training ends the run with exit status 2 and a message that names the batch,
the memory mode and the fixes (the error is injected through BAMBA_FT_FAULT: no machine here runs out)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.conftest import cli

ARGS = ["trainer=cpu", "trainer.max_steps=2", "trainer.enable_progress_bar=false", "data.builtin_train_examples=32",
        "data.builtin_val_examples=8", "data.max_seq_len=128", "data.max_tokens_per_batch=512",
        "eval.before_training=false", "eval.generate=false", "logger=none", "model.gradient_checkpointing=mamba"]


@pytest.mark.parametrize("point,where", [
    ("train.forward_oom@2", "out of memory in the first training step"),
    pytest.param("train.forward_oom", "out of memory in the gradient probe", marks=pytest.mark.slow),
])
def test_out_of_memory_exits_2_naming_batch_mode_and_fixes(point: str, where: str, tmp_path: Path) -> None:
    proc = cli([*ARGS, f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, check=False, env={"BAMBA_FT_FAULT": point})
    assert proc.returncode == 2, proc.stderr[-3000:]
    err = proc.stderr
    assert "BAMBA_FT_FAULT: raising at train.forward_oom" in err and where in err
    assert "CUDA out of memory (injected by BAMBA_FT_FAULT)" in err and "Traceback" not in err
    assert "tokens, longest sequence" in err and "data.max_tokens_per_batch=512, data.max_seq_len=128" in err
    assert "memory mode: model.gradient_checkpointing=mamba, model.activation_offload=false" in err
    for fix in ("model.gradient_checkpointing=all ", "model.activation_offload=true ", "data.max_tokens_per_batch=256 "):
        assert fix in err
