"""Each supported hybrid family end to end: a 2-step LoRA SFT of its tiny random preset on the builtin data, then
`recipe=export`, whose merged model reloads in plain transformers in a fresh process with the same logits (export
verification, float32). Both run the config the CLI composes for `model=tiny-random-<family>`, in this process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bamba_ft.errors import ModelError
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
    card = (out / "README.md").read_text()
    assert f"- {model_type}\n" in card and "Bamba" not in card.split("## Training config")[0]  # its own family
    assert "drawn at random" in card and "base_model" not in card.split("---")[1]
    report = json.loads((out / "export_report.json").read_text())
    assert report["verify"]["reloaded_class"] == CAUSAL_LM[model_type]
    assert report["verify"]["max_rel_logit_diff"] <= 1e-5
    # The export is the trained model: its random base was drawn again from the run's seed (it used to be a new
    # draw each time, so every evaluation and export of such a run scored other weights).
    trained = json.loads((run / "metrics.json").read_text())["after"]["val_loss"]
    for i, source in enumerate((out, run, run / "adapter")):
        scored = run_in_process(["recipe=eval", f"eval.checkpoint={source}", "trainer=cpu", "smoke=fast",
                                 "eval.generate=false"], tmp_path / f"eval{i}")["metrics"]["val_loss"]
        assert abs(scored - trained) <= 1e-5 * abs(trained), (source, scored, trained)
    if model_type != "nemotron_h":
        return
    # another draw is refused, as is a run whose draw was not recorded
    record = json.loads((run / "random_base.json").read_text())
    record["fingerprint"][1] *= 1.001
    (run / "random_base.json").write_text(json.dumps(record))
    with pytest.raises(ModelError, match=r"drawn again from seed \d+, is another draw .*: the device, dtype and "
                                         r"torch version are the ones it was drawn with"):
        run_in_process(["recipe=eval", f"eval.checkpoint={run}", "trainer=cpu", "smoke=fast"], tmp_path / "e1")
    (run / "random_base.json").unlink()
    with pytest.raises(ModelError, match=r"whose draw was not recorded"):
        run_in_process(["recipe=export", f"export.checkpoint={run}", f"export.output_dir={tmp_path / 'e2'}"],
                       tmp_path / "e2log")
