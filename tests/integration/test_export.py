"""recipe=export: merged model reloads in plain transformers with the adapter model's logits; Hub upload."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from bamba_ft.config.schema import RunConfig
from bamba_ft.errors import BambaFTError, ConfigError, ModelError
from bamba_ft.model.mixer import stock_forward
from bamba_ft.model.restore import load_source, locate
from tests.integration.conftest import run_in_process
from tests.integration.fake_hub import FakeHub, use_hub

PROMPT = [{"role": "user", "content": "What is 21 plus 21?"}]


def adapter_model(run: Path):  # noqa: ANN201
    return load_source(locate(str(run), RunConfig()), torch.device("cpu"))


def test_export_float32_reloads_with_same_logits_and_generations(sft_run: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "merged"
    run_in_process(["recipe=export", f"export.checkpoint={sft_run}", f"export.output_dir={out}",
                    "export.dtype=float32"], tmp_path / "log")
    assert "verified: reloaded with BambaForCausalLM" in capsys.readouterr().out
    report = json.loads((out / "export_report.json").read_text())
    assert report["verify"]["max_rel_logit_diff"] <= 1e-5 and report["verify"]["greedy_generation_identical"]
    assert "## Export check" in (out / "README.md").read_text()  # the check's result, in the model card

    # Independently of the export's own check: plain transformers in this process.
    model, tokenizer = adapter_model(sft_run)
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    reloaded_tok = AutoTokenizer.from_pretrained(out)
    text = tokenizer.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
    assert reloaded_tok.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True) == text
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        ours = model(input_ids=ids, use_cache=False).logits  # bamba_ft's mixer, as in training
        with stock_forward(model):  # transformers' mixer, as the reloaded export runs
            ref = model(input_ids=ids, use_cache=False).logits
            gen_ref = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
            exact = model.double()(input_ids=ids, use_cache=False).logits  # the adapter model in float64
        got = merged(input_ids=ids, use_cache=False).logits
        gen_got = merged.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    scale = float(ref.abs().max())
    # Within 1e-5 of the largest logit (|logit| reaches ~19 here, where float32 itself is off by ~1e-5 absolute):
    assert float((ref - got).abs().max()) / scale < 1e-5
    # and as close to the float64 adapter model. (Merging rounds W + scale * B @ A once where the adapter model
    # rounds each term, so the two float32 errors are a few units in the last place of the largest logits in no
    # fixed ratio; a merge that drops or mis-scales an adapter is off by orders of magnitude more.)
    assert float((got.double() - exact).abs().max()) / scale < 1e-5
    assert float((ref.double() - exact).abs().max()) / scale < 1e-5
    assert float((ours - got).abs().max()) / scale < 1e-5  # bamba_ft's mixer agrees to float32 rounding
    assert torch.equal(gen_ref, gen_got)


def test_export_files_model_card_and_overwrite_rule(sft_run: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    shutil.copytree(sft_run, tmp_path / "run")
    out = tmp_path / "run" / "export"  # the default target, given relative paths as users type them
    monkeypatch.chdir(tmp_path)  # where the CLI would start: Hydra leaves the working directory as it is
    # verify=false: the reload check is the float32 test's; what is asserted here is written either way
    run_in_process(["recipe=export", "export.checkpoint=run", "export.verify=false"], tmp_path / "a")
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", "README.md"):
        assert (out / name).exists(), name
    card = (out / "README.md").read_text()
    # builtin:tiny is no Hub id: the card names it in its text, not as the base_model the Hub would link
    assert "base_model" not in card.split("---")[1] and "`builtin:tiny`, the small base shipped with bamba_ft" in card
    assert "# Bamba model fine-tuned" in card and "## Metrics" in card and "## Training config" in card
    assert "transformers" in card.split("## Library versions")[1]
    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype" if "torch_dtype" in config else "dtype"] == "bfloat16" and config["use_cache"] is True

    with pytest.raises(ConfigError, match="exists. Fix: choose another directory or export.overwrite=true"):
        run_in_process(["recipe=export", "export.checkpoint=run"], tmp_path / "b")
    (out / "model.safetensors").write_bytes(b"stale")
    run_in_process(["recipe=export", f"export.checkpoint={tmp_path / 'run'}", "export.overwrite=true",
                    "export.verify=false"], tmp_path / "c")
    assert (out / "model.safetensors").read_bytes() != b"stale" and (out / "export_report.json").exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".export")]  # no temp or backup dirs left

    # overwrite replaces an earlier export only: never the run being exported, another directory or a file
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    (tmp_path / "afile").write_text("mine")
    for output, message in ((tmp_path / "run", "holds the export's source"), (other, "is not an earlier export"),
                            (tmp_path / "afile", "is a file"),
                            (tmp_path / "afile" / "sub", f"{tmp_path / 'afile'} is a file, so nothing can be written")):
        with pytest.raises(ConfigError, match=message):
            run_in_process(["recipe=export", "export.checkpoint=run", f"export.output_dir={output}",
                            "export.overwrite=true"], tmp_path / "d")
    assert (tmp_path / "run" / "metrics.json").exists() and (other / "keep.txt").read_text() == "mine"
    assert (tmp_path / "afile").read_text() == "mine"
    # a .ckpt exports beside its run's checkpoints by default, into <run>/export (here: the earlier export)
    with pytest.raises(ConfigError, match=f"export.output_dir={out} exists"):
        run_in_process(["recipe=export", "export.checkpoint=run/checkpoints/last.ckpt"], tmp_path / "e")


def test_adapter_only_export_loads_with_peft(sft_run: Path, tmp_path: Path) -> None:
    from peft import PeftModel

    out = tmp_path / "adapter"
    run_in_process(["recipe=export", f"export.checkpoint={sft_run}", f"export.output_dir={out}",
                    "export.adapter_only=true"], tmp_path / "log")
    assert (out / "adapter_model.safetensors").exists() and (out / "README.md").exists()
    saved = {str(t.dtype).removeprefix("torch.") for t in load_file(out / "adapter_model.safetensors").values()}
    assert json.loads((out / "export_report.json").read_text())["dtype"] == ", ".join(sorted(saved))
    base, _ = load_source(locate(None, RunConfig()), torch.device("cpu"))
    model = PeftModel.from_pretrained(base, str(out)).eval()
    ref, _ = adapter_model(sft_run)
    ids = torch.tensor([[4, 40, 41, 42, 2, 5]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, ref(input_ids=ids).logits)


def test_adapter_only_export_of_a_full_fine_tune_is_refused_before_the_model_loads(tmp_path: Path,
                                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A full run's .ckpt was loaded and then failed in peft's save with an AttributeError traceback."""
    run = tmp_path / "full"
    run_in_process(["recipe=full", "trainer=cpu", "trainer.max_steps=1", "data.builtin_train_examples=40",
                    "data.builtin_val_examples=8", "eval.before_training=false", "eval.generate=false", "logger=none"],
                   run)
    monkeypatch.setattr("bamba_ft.jobs.export.load_source", lambda *a: pytest.fail("the model loaded"))
    for checkpoint in (run, run / "checkpoints" / "last.ckpt"):
        with pytest.raises(ConfigError, match=r"(?s)export.adapter_only=true needs a LoRA run, adapter or checkpoint.*"
                                              r"has no adapter.*Fix: drop export.adapter_only"):
            run_in_process(["recipe=export", f"export.checkpoint={checkpoint}", "export.adapter_only=true"],
                           tmp_path / "log")
    assert not (run / "export_adapter").exists()


def test_push_to_hub_uploads_the_export(sft_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "pushed"
    with FakeHub(token="hf_test") as hub:
        use_hub(monkeypatch, hub, "hf_test")
        run_in_process(["recipe=export", f"export.checkpoint={sft_run}", f"export.output_dir={out}",
                        "export.push_to_hub=true", "export.repo_id=me/tiny-sft", "export.commit_message=first upload",
                        "export.verify=false"], tmp_path / "log")
        repo = hub.repos["me/tiny-sft"]
    assert "pushed: " in capsys.readouterr().out
    assert repo["private"] is True and repo["commits"] == ["first upload"]
    local = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert set(repo["files"]) == set(local)
    # the local report gains the commit URL after the upload; every other file is byte-identical
    assert all(repo["files"][k] == v for k, v in local.items() if k != "export_report.json")
    assert "hub_commit" in json.loads(local["export_report.json"])


@pytest.mark.parametrize("token,offline,message", [
    ("wrong", False, "push to me/tiny-sft failed (401"),
    ("hf_test", True, "offline"),
])
def test_push_failure_keeps_local_export(sft_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, token: str,
                                         offline: bool, message: str) -> None:
    """A BambaFTError, which the CLI prints as one message with exit status 2 (test_out_of_memory; test_secrets for this one)."""
    out = tmp_path / "kept"
    with FakeHub(token="hf_test") as hub, pytest.raises(BambaFTError) as error:
        use_hub(monkeypatch, hub, token, offline)
        run_in_process(["recipe=export", f"export.checkpoint={sft_run}", f"export.output_dir={out}",
                        "export.push_to_hub=true", "export.repo_id=me/tiny-sft", "export.verify=false"], tmp_path / "log")
    assert message in str(error.value) and "Traceback" not in str(error.value)
    assert "local export at" in str(error.value) and (out / "model.safetensors").exists()
    if offline:  # the printed command uploads the export once the Hub is reachable, without exporting again
        import shlex
        import subprocess
        import sys

        retry = shlex.split(str(error.value).split("to upload it alone: ")[1])
        assert retry[0] == "hf"
        with FakeHub(token="hf_test") as hub:
            env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": "hf_test", "HF_HUB_OFFLINE": "0"}
            proc = subprocess.run([str(Path(sys.executable).with_name("hf")), *retry[1:]], env=env,
                                  capture_output=True, text=True, timeout=120)
            assert proc.returncode == 0, proc.stderr[-2000:]
            repo = hub.repos["me/tiny-sft"]
        assert repo["private"] is True and repo["files"] == {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}


def test_run_written_by_another_version_still_loads(sft_run: Path, tmp_path: Path) -> None:
    """Keys a later or earlier bamba_ft wrote are ignored with a warning, not a traceback."""
    import shutil

    from bamba_ft.model.restore import RUN_CONFIG, load_run_config

    run = tmp_path / "old_run"
    shutil.copytree(sft_run, run)
    text = (run / RUN_CONFIG).read_text().replace("model:\n", "model:\n  compile: false\n", 1)
    (run / RUN_CONFIG).write_text(text + "retired_section:\n  x: 1\n")
    cfg = load_run_config(run)
    assert cfg.model.name_or_path == "builtin:tiny" and cfg.peft.method == "lora"


def test_qlora_run_exports_merged_with_quantization_error_reported(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run_in_process(["recipe=qlora", "trainer=cpu", "trainer.max_steps=4", "trainer.val_check_interval=4", "logger=none",
                    "eval.before_training=false", "eval.num_generate=4", "eval.max_new_tokens=4",
                    "data.builtin_train_examples=200", "data.builtin_val_examples=16"], tmp_path / "run")
    run_in_process(["recipe=export", f"export.checkpoint={tmp_path / 'run'}", "export.dtype=float32"], tmp_path / "log")
    report = json.loads((tmp_path / "run/export/export_report.json").read_text())
    assert report["dequantized_layers"] == 22  # 3 mixers x (in, out) + attention q, k, v, o + 4 MLPs x 3
    # Merging adds the adapter to the same dequantized values the NF4 forward used: float32 rounding only.
    assert report["quantized_vs_merged_max_abs_logit_diff"] < 1e-4
    assert "quantized base + adapter vs merged" in capsys.readouterr().out
    assert report["verify"]["max_rel_logit_diff"] <= 1e-5


def test_a_stopped_run_is_evaluated_and_exported_from_its_furthest_checkpoint(sft_run: Path, tmp_path: Path) -> None:
    """No adapter/ yet: the checkpoint a resume would take (the highest step), not last.ckpt by name."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(sft_run, run)
    shutil.rmtree(run / "adapter")
    for p in (run / "checkpoints").glob("*.ckpt"):
        p.unlink() if p.name != "last.ckpt" else None
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    state["global_step"] += 5
    torch.save(state, run / "checkpoints" / "interrupted.ckpt")
    assert locate(str(run), RunConfig()).ckpt == run / "checkpoints" / "interrupted.ckpt"
    # the validation Lightning runs as it stops writes a best-* at the same step, after it: the same weights,
    # named by the stop's file
    torch.save(state, run / "checkpoints" / f"best-step{state['global_step']:06d}.ckpt")
    assert locate(str(run), RunConfig()).ckpt == run / "checkpoints" / "interrupted.ckpt"
    (run / "checkpoints" / f"best-step{state['global_step']:06d}.ckpt").unlink()
    (run / "checkpoints" / "last.ckpt").unlink()
    assert locate(str(run), RunConfig()).ckpt == run / "checkpoints" / "interrupted.ckpt"
    (run / "checkpoints" / "interrupted.ckpt").unlink()
    with pytest.raises(ModelError, match=r"has no adapter/, model/ or checkpoint \(last.ckpt, interrupted.ckpt"):
        locate(str(run), RunConfig())


def test_a_runs_adapter_directory_is_located_on_the_runs_base(sft_run: Path, tmp_path: Path) -> None:
    """eval/export of <run>/adapter: the base the run trained (here its quantization), not the command line's; the
    same adapter copied out of the run is a plain peft adapter on the configured base."""
    import shutil

    from omegaconf import OmegaConf

    run = tmp_path / "run"
    shutil.copytree(sft_run, run)
    config = OmegaConf.load(run / "run_config.yaml")
    config.quant.method = "nf4"  # as a QLoRA run records it
    OmegaConf.save(config, run / "run_config.yaml")
    src = locate(str(run / "adapter"), RunConfig())
    assert (src.quant.method, src.adapter_dir, src.run is not None) == ("nf4", run / "adapter", True)
    shutil.copytree(run / "adapter", tmp_path / "copied")
    assert locate(str(tmp_path / "copied"), RunConfig()).quant.method == "none"


def test_a_bf16_qlora_run_exports_the_base_it_trained_on(tmp_path: Path) -> None:
    """A run in bfloat16 (as model=bamba-9b sets) on a random base: the base was drawn in bf16 and quantized from
    those weights; NF4 codes drawn from float32 weights are others, and a float32 draw is another base (its
    fingerprint check refused the export). The float32 export merges onto the base the adapter trained with: each
    exported weight is that base, dequantized, plus the adapter's delta (float32 rounding only)."""
    run = tmp_path / "run"
    run_in_process(["recipe=qlora", "smoke=fast", "model=tiny-random-nemotron_h", "model.dtype=bfloat16",
                    "trainer.max_steps=2", "logger=none"], run)
    run_in_process(["recipe=export", f"export.checkpoint={run}", "export.dtype=float32"], tmp_path / "log")
    exported = load_file(run / "export" / "model.safetensors")
    trained, _ = load_source(locate(str(run), RunConfig()), torch.device("cpu"))
    checked = 0
    for name, module in trained.named_modules():
        if not name.endswith(("mixer.in_proj", "mixer.out_proj")):
            continue
        weight = module.base_layer.weight
        base = weight.get_original_weight() if hasattr(weight, "get_original_weight") else weight.dequantize()
        expected = base.float() + module.get_delta_weight("default").float()
        layer = name.removeprefix("base_model.model.model.")  # saved under the family's prefix (backbone.)
        (got,) = [w for k, w in exported.items() if k.endswith(f".{layer}.weight")]
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
        checked += 1
    assert checked == 4  # 2 Mamba-2 mixers x (in_proj, out_proj)
