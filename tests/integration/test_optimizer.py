"""The optimizer Lightning steps: fused AdamW where it can be, and gradient clipping that works with it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bamba_ft import lit_module
from bamba_ft.jobs import train
from bamba_ft.lit_module import BambaLitModule, fused_adamw
from tests.integration.test_resume import small_run


def test_bf16_mixed_clips_the_gradients_of_a_fused_adamw(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """GPU training's default (bf16-mixed, a fused AdamW, gradient_clip_val=1.0): Lightning's mixed-precision plugin
    refuses to clip for a fused optimizer. torch's fused CPU AdamW stands in for the CUDA one here; clipping must
    bring the gradients' norm down to the limit before each step."""
    monkeypatch.setattr(lit_module, "FUSED_DEVICES", ("cpu",))
    seen: list[tuple[bool, float, float]] = []
    original = BambaLitModule.configure_gradient_clipping

    def record(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):  # noqa: ANN001, ANN202
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        before = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
        original(self, optimizer, gradient_clip_val, gradient_clip_algorithm)
        after = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
        seen.append((bool(optimizer.defaults["fused"]), before, after))

    monkeypatch.setattr(BambaLitModule, "configure_gradient_clipping", record)
    cfg = small_run(tmp_path / "run", steps=3)
    cfg.trainer.precision = "bf16-mixed"
    cfg.trainer.gradient_clip_val = 1e-3
    train.run(cfg)
    assert len(seen) == 3 and all(fused for fused, _, _ in seen)
    for _, before, after in seen:
        assert before > 1e-2  # far above the limit, so the check below is one of clipping
        assert after == pytest.approx(1e-3, rel=1e-3)


def test_adamw_is_not_fused_under_a_gradient_scaler() -> None:
    """16-mixed's scaler: a fused step would unscale after Lightning clipped the still-scaled gradients."""
    cuda_like = [torch.zeros(2, 2)]
    assert fused_adamw(cuda_like, scaled=False) is False  # CPU parameters: not in FUSED_DEVICES
    lit_module.FUSED_DEVICES, saved = ("cpu",), lit_module.FUSED_DEVICES
    try:
        assert fused_adamw(cuda_like, scaled=False) is True
        assert fused_adamw(cuda_like, scaled=True) is False
        assert fused_adamw([], scaled=False) is False
    finally:
        lit_module.FUSED_DEVICES = saved
