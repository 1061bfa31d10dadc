"""The training command on one GPU (`pytest -m gpu`): `trainer=gpu`'s defaults (bf16-mixed, fused AdamW, gradient
clipping at 1.0) through Lightning, on the built-in model, with the float8 base and its CUDA graphs as well."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from bamba_ft.jobs import train
from tests.integration.test_resume import adapter, small_run

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("quant", ["none", "fp8"])
def test_gpu_training_defaults_train_and_clip(tmp_path: Path, quant: str) -> None:
    if quant == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("float8 needs compute capability 8.9+")
    cfg = small_run(tmp_path / "run", steps=6)
    cfg.trainer.accelerator = "gpu"
    cfg.trainer.precision = "bf16-mixed"
    cfg.trainer.gradient_clip_val = 1.0
    cfg.quant.method = quant
    cfg.eval.before_training = True
    metrics = train.run(cfg)
    assert metrics["train"]["steps"] == 6
    assert math.isfinite(metrics["after"]["val_loss"]) and metrics["after"]["val_loss"] < metrics["before"]["val_loss"], metrics
    assert any(bool(t.abs().sum() > 0) for name, t in adapter(tmp_path / "run").items() if "lora_B" in name)
