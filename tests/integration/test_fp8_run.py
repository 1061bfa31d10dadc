"""quant.method=fp8 end to end on the CPU: the builtin model trains LoRA adapters like a float32 base, evaluates
and generates, resumes from a stop to the same adapter, and exports to an ordinary model directory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from bamba_ft.config.schema import RunConfig
from bamba_ft.jobs import export, train
from tests.integration.test_resume import adapter, small_run, stop_at

STEPS = 30


def fp8_or_plain_run(out: Path, method: str, resume: str | None = None) -> dict:
    cfg = small_run(out, resume=resume, steps=STEPS)
    cfg.trainer.val_check_interval = STEPS
    cfg.quant.method = method
    cfg.eval.before_training = True
    if method == "fp8":  # greedy generation runs the layers one token at a time (rows of 1)
        cfg.eval.generate, cfg.eval.num_generate, cfg.eval.max_new_tokens = True, 4, 4
    return train.run(cfg)


@pytest.fixture(scope="module")
def fp8_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    run = tmp_path_factory.mktemp("fp8") / "run"
    return run, fp8_or_plain_run(run, "fp8")


def test_fp8_base_trains_adapters_like_float32_base(fp8_run: tuple[Path, dict], tmp_path: Path) -> None:
    """Validation loss falls (by 0.75 measured, on either base), and ends within 5% of the same run on the float32
    base (same seed and batches; measured 0.3% apart)."""
    run, fp8 = fp8_run
    plain = fp8_or_plain_run(tmp_path / "plain", "none")
    before, after = fp8["before"]["val_loss"], fp8["after"]["val_loss"]
    assert after < before - 0.5, (before, after)
    ref = plain["after"]["val_loss"]
    assert abs(after - ref) < 0.05 * ref, (after, ref)
    assert fp8["after"]["num_generated"] == 4 and (run / "predictions.jsonl").read_text().count("\n") == 4
    # Every adapter trained: peft starts lora_B at zero, and only a gradient moves it.
    lora_b = {k: v for k, v in adapter(run).items() if "lora_B" in k}
    assert lora_b and all(float(v.abs().max()) > 0 for v in lora_b.values()), sorted(lora_b)


def test_fp8_run_exports_an_ordinary_model(fp8_run: tuple[Path, dict], tmp_path: Path) -> None:
    run, _ = fp8_run
    cfg = RunConfig()
    cfg.export.checkpoint = str(run)
    cfg.export.output_dir = str(tmp_path / "export")
    cfg.export.dtype = "float32"
    report = export.run(cfg)
    # builtin:tiny: out_proj of 3 mixers, q/k/v/o of one attention layer, 3 MLP projections in 4 layers;
    # in_proj (128 -> 584 features) is no multiple of 16 and stayed float32
    assert report["dequantized_layers"] == 19
    # The merged model multiplies the same weights (codes x scales) but unrounded activations: it differs from the
    # fp8 model by float8's rounding of the activations (0.72 measured, 3.8% of the largest logit, 18.7).
    assert 0 < report["quantized_vs_merged_max_abs_logit_diff"] < 2.0
    assert report["verify"]["max_rel_logit_diff"] <= 1e-5  # reloaded by plain transformers in a fresh process
    with safe_open(str(tmp_path / "export" / "model.safetensors"), "pt") as f:
        names = list(f.keys())
        dtypes = {f.get_slice(n).get_dtype() for n in names}
    assert dtypes == {"F32"} and not any(n.endswith(("weight_t", "weight_scale")) for n in names), dtypes
    assert "model.layers.0.mamba.out_proj.weight" in names


def test_fp8_run_resumes_to_the_uninterrupted_adapter(fp8_run: tuple[Path, dict], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    run, _ = fp8_run
    stop_at(monkeypatch, 12)
    assert fp8_or_plain_run(tmp_path / "first", "fp8") == {"stopped_at": 12, "signal": "SIGINT"}
    monkeypatch.undo()
    fp8_or_plain_run(tmp_path / "second", "fp8", resume=str(tmp_path / "first"))
    full, resumed = adapter(run), adapter(tmp_path / "second")
    assert full.keys() == resumed.keys()
    for name in full:
        torch.testing.assert_close(resumed[name], full[name], rtol=0, atol=1e-6)


def _graphs_as_on_a_gpu(monkeypatch: pytest.MonkeyPatch) -> tuple[list, list]:
    """Make training's auto turn the graphs on here: why_no_graphs and the fused-kernel check say yes, and the graphs
    run torch stand-ins for the kernels without capture (a CPU has neither). (why_no_graphs' arguments, the graphs.)"""
    from bamba_ft.model import mixer
    from bamba_ft.ops.graphs import ConvScanGraphs
    from tests.unit.test_conv_scan import TorchOps

    seen: list[tuple] = []
    made: list[ConvScanGraphs] = []

    def pays(*args: object) -> None:
        seen.append(args)

    def graphs() -> ConvScanGraphs:
        made.append(ConvScanGraphs(TorchOps, bucket=128, capture=False))
        return made[-1]

    monkeypatch.setattr(train, "why_no_graphs", pays)
    monkeypatch.setattr(mixer, "fused_conv_scan_runs", lambda m, backend: True)
    monkeypatch.setattr(mixer, "ConvScanGraphs", graphs)
    return seen, made


def test_auto_graphs_are_captured_for_every_bucket_before_training(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """Training's side of model.cuda_graphs=auto: where why_no_graphs finds no reason against them, the model is
    built with the graphs and every bucket up to data.max_tokens_per_batch is captured before the first step. This
    checks the plumbing; the replay runs on a GPU only."""
    seen, made = _graphs_as_on_a_gpu(monkeypatch)
    cfg = small_run(tmp_path / "run", steps=2)
    cfg.quant.method = "fp8"
    with caplog.at_level("INFO", logger="bamba_ft"):
        train.run(cfg)
    assert seen == [(torch.device("cpu"), True, 512, "none", False, 1, "fp8")]
    assert len(made) == 1 and made[0].captures == 2 * 4  # buckets 512, 384, 256, 128: forward and backward
    assert "CUDA graphs: 8 captured for rows up to 512 tokens" in caplog.text
    assert "conv+scan runs as CUDA graphs (model.cuda_graphs=auto)" in caplog.text


def test_running_out_of_memory_while_capturing_the_graphs_names_the_fix(monkeypatch: pytest.MonkeyPatch,
                                                                        tmp_path: Path) -> None:
    from bamba_ft.errors import DeviceMemoryError

    _graphs_as_on_a_gpu(monkeypatch)

    def full(*args: object) -> int:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.07 GiB")

    monkeypatch.setattr(train, "prepare_graphs", full)
    cfg = small_run(tmp_path / "run", steps=2)
    cfg.quant.method = "fp8"
    with pytest.raises(DeviceMemoryError, match=r"(?s)out of memory in capturing the conv\+scan's CUDA graphs before "
                                                r"the first step .*model.cuda_graphs=false +no CUDA graphs"):
        train.run(cfg)
