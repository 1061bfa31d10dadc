"""recipe=doctor: the adapter-gradient and packing checks on the configured model."""

from __future__ import annotations

import pytest

from bamba_ft.config.schema import ModelConfig, RunConfig, TrainerConfig
from bamba_ft.jobs import doctor


def test_transformers_mixer_is_checked_on_padded_rows_and_its_packing_named(capsys: pytest.CaptureFixture) -> None:
    """model.mixer=hf: transformers' mixer refused the packed probe on the CPU with its own traceback, where
    training (which refuses packing there) trains padded rows."""
    cfg = RunConfig(task="doctor", model=ModelConfig(mixer="hf"), trainer=TrainerConfig(accelerator="cpu"))
    result = doctor.run(cfg)
    out = capsys.readouterr().out
    assert result == {"adapter_tensors": 20, "packing_rel_diff": None}
    assert "gradient check: 20 adapter tensors, all receive gradient" in out
    assert "packing check: not run: model.mixer=hf" in out and "data.packing=false" in out
    assert out.rstrip().endswith("doctor: ok")

