"""Each supported hybrid family end to end: a 2-step LoRA SFT of its tiny random preset on the builtin data, then
`recipe=export`, whose merged model reloads in plain transformers in a fresh process with the same logits (export
verification, float32). Both run the config the CLI composes for `model=tiny-random-<family>`, in this process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.integration.conftest import run_in_process

CAUSAL_LM = {"granitemoehybrid": "GraniteMoeHybridForCausalLM", "falcon_h1": "FalconH1ForCausalLM",
             "nemotron_h": "NemotronHForCausalLM"}


@pytest.mark.slow
@pytest.mark.parametrize("model_type", list(CAUSAL_LM))
def test_family_sft_then_export_reloads_in_transformers(model_type: str, tmp_path: Path) -> None:
    run, out = tmp_path / "run", tmp_path / "export"
    # smoke=fast: 2 steps on 64 builtin rows (the default 4,000 are tokenized for 2 steps otherwise), 16 to validate
    run_in_process(["recipe=sft", f"model=tiny-random-{model_type}", "data=builtin", "trainer=cpu", "smoke=fast",
                    "eval.before_training=false", "eval.num_generate=2", "eval.max_new_tokens=4"], run)
    assert (run / "adapter" / "adapter_config.json").exists()
    run_in_process(["recipe=export", f"export.checkpoint={run}", f"export.output_dir={out}", "export.dtype=float32"],
                   tmp_path / "x")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == model_type
    assert config["architectures"] == [CAUSAL_LM[model_type]]
    report = json.loads((out / "export_report.json").read_text())
    assert report["verify"]["reloaded_class"] == CAUSAL_LM[model_type]
    assert report["verify"]["max_rel_logit_diff"] <= 1e-5
