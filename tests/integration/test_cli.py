"""`python -m bamba_ft` as users run it: every recipe on the tiny model, errors without tracebacks.

Tests of what a recipe does (not of the process around it) run its composed config in this process
(`run_in_process`); `--cfg` and the exit status and form of a user error go through the CLI itself."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import pytest

from bamba_ft.config.store import recipe_names
from bamba_ft.errors import BambaFTError, ConfigError
from tests.integration.conftest import cli, run_in_process

FAST = ["model=tiny", "trainer=cpu", "smoke=fast", "logger=none"]


def test_sft_run_writes_everything(sft_run: Path) -> None:
    for path in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "adapter/tokenizer.json",
                 "checkpoints/last.ckpt", "metrics.json", "run_config.yaml", "curves.png", "predictions.jsonl"):
        assert (sft_run / path).exists(), path
    assert list((sft_run / "logs" / "csv").glob("version_*/metrics.csv"))
    assert list((sft_run / "logs" / "tensorboard").glob("version_*/events.out.tfevents.*"))
    metrics = json.loads((sft_run / "metrics.json").read_text())
    assert metrics["train"]["steps"] == 8
    assert metrics["after"]["val_loss"] < metrics["before"]["val_loss"]
    assert 0.0 <= metrics["after"]["exact_match"] <= 1.0
    assert json.loads((sft_run / "adapter/adapter_config.json").read_text())["base_model_name_or_path"] == "builtin:tiny"
    assert not list(sft_run.rglob("*.partial"))


@pytest.mark.parametrize("recipe", [r for r in recipe_names() if r not in ("eval", "generate", "preview", "export", "bench", "doctor")])
def test_training_recipes_run_two_steps(recipe: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    metrics = run_in_process([f"recipe={recipe}", *FAST], tmp_path)
    assert metrics["train"]["steps"] == 2
    out = capsys.readouterr().out
    assert "bamba_ft: trained 2 steps" in out and "  logs/" not in out  # logger=none writes no logs/


def test_a_run_starts_from_a_trained_adapter(sft_run: Path, tmp_path: Path) -> None:
    """peft.init_from: the new run's model before training is the given run's after it (same data and seed)."""
    same_data = ["recipe=sft", "trainer=cpu", "data.builtin_train_examples=200", "data.builtin_val_examples=24",
                 "eval.num_generate=8", "eval.max_new_tokens=6", "trainer.max_steps=1", "logger=none"]
    metrics = run_in_process([*same_data, f"peft.init_from={sft_run}"], tmp_path / "second")
    trained = json.loads((sft_run / "metrics.json").read_text())["after"]
    assert metrics["before"]["val_loss"] == pytest.approx(trained["val_loss"], abs=1e-6)
    assert metrics["before"]["exact_match"] == trained["exact_match"]
    fresh = json.loads((sft_run / "metrics.json").read_text())["before"]
    assert abs(fresh["val_loss"] - trained["val_loss"]) > 0.1  # and the comparison can fail
    with pytest.raises(ConfigError, match=r"peft.r: the adapter has 16, this run 8"):
        run_in_process([*same_data, f"peft.init_from={sft_run / 'adapter'}", "peft.r=8"], tmp_path / "r8")
    with pytest.raises(ConfigError, match=r"no adapter there"):
        run_in_process([*same_data, f"peft.init_from={tmp_path}"], tmp_path / "none")


def test_every_number_a_run_writes_is_a_sweep_objective_the_sweep_accepts(sft_run: Path) -> None:
    """A sweep refuses a sweep.objective before its jobs run when no job can write it (objective_problem); every
    number in a real run's metrics.json, by name and by dotted path, must pass that check and be found in the
    file (objective_value), so a metric added to the runs cannot be refused up front."""
    from bamba_ft.jobs.sweep_job import objective_problem, objective_value

    metrics = json.loads((sft_run / "metrics.json").read_text())

    def numbers(node: object, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
        if isinstance(node, dict):
            return [p for k, v in node.items() for p in numbers(v, (*path, k))]
        return [path] if isinstance(node, (int, float)) and not isinstance(node, bool) else []

    found = numbers(metrics)
    assert len(found) > 20, found  # the comparison covers the run's numbers
    for path in found:
        assert objective_problem(".".join(path), "train") is None, path
        leaf: object = metrics
        for part in path:
            leaf = leaf[part]
        assert objective_value(metrics, ".".join(path)) == float(leaf), path
        if path[0] in ("after", "train") and len(path) == 2:  # found by name too
            assert objective_problem(path[1], "train") is None, path


def test_padded_batches_run(tmp_path: Path) -> None:
    metrics = run_in_process(["recipe=sft", *FAST, "data.packing=false"], tmp_path)
    assert metrics["train"]["steps"] == 2 and metrics["packing_efficiency"] is None  # padded: nothing packed


def test_eval_recipe_matches_training_exact_match(sft_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run_in_process(["recipe=eval", "trainer=cpu", f"eval.checkpoint={sft_run}", "eval.num_generate=8",
                    "eval.max_new_tokens=6"], tmp_path)
    ours = json.loads((tmp_path / "metrics.json").read_text())["metrics"]
    trained = json.loads((sft_run / "metrics.json").read_text())["after"]
    assert ours["exact_match"] == trained["exact_match"]
    assert abs(ours["val_loss"] - trained["val_loss"]) < 1e-5
    assert (tmp_path / "predictions.jsonl").exists() and (tmp_path / "curves.png").exists()
    assert "exact match" in capsys.readouterr().out


EVAL = ["recipe=eval", "trainer=cpu", "eval.num_generate=8", "eval.max_new_tokens=6"]


def test_eval_applies_the_command_lines_data_keys_to_the_runs_data(sft_run: Path, tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """The run's own validation set (24 builtin examples), cut to 3 by data.max_val_examples, and the log says so.
    Eval used to drop every data key unless data.source was given."""
    caplog.set_level(logging.INFO)
    ours = run_in_process([*EVAL, f"eval.checkpoint={sft_run}", "data.max_val_examples=3"], tmp_path)["metrics"]
    assert ours["num_generated"] == 3
    assert "eval data: data.source=builtin, data.max_val_examples=3 (the run's data config; from the command line: " \
           "data.max_val_examples)" in caplog.text


def test_eval_of_a_file_run_reads_the_given_validation_file(sft_run: Path, tmp_path: Path) -> None:
    """A run trained on data=file: scored on its held-out rows (5% of 60), or on data.val_source's 5 rows, or on all
    of a new data.source."""
    from omegaconf import OmegaConf

    from bamba_ft.data.builtin import generate_sft

    train, val, run = tmp_path / "train.jsonl", tmp_path / "val.jsonl", tmp_path / "run"
    for path, rows in ((train, generate_sft(60, seed=1)), (val, generate_sft(5, seed=2, validation=True))):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    shutil.copytree(sft_run, run)  # sft_run's adapter, as if trained on train.jsonl
    config = OmegaConf.load(run / "run_config.yaml")
    config.data.source = str(train)
    OmegaConf.save(config, run / "run_config.yaml")
    own = run_in_process([*EVAL, f"eval.checkpoint={run}"], tmp_path / "own")["metrics"]
    given = run_in_process([*EVAL, f"eval.checkpoint={run}", f"data.val_source={val}"], tmp_path / "val")["metrics"]
    assert (own["num_generated"], given["num_generated"]) == (3, 5)
    assert own["val_loss"] != given["val_loss"]
    # a file the run did not train on is scored whole (all 5 rows), the training file by its hold-out
    new = run_in_process([*EVAL, f"eval.checkpoint={run}", f"data.source={val}"], tmp_path / "new")["metrics"]
    again = run_in_process([*EVAL, f"eval.checkpoint={run}", f"data.source={train}"], tmp_path / "again")["metrics"]
    assert (new["num_generated"], new["val_loss"]) == (5, pytest.approx(given["val_loss"], abs=1e-6))
    assert (again["num_generated"], again["val_loss"]) == (3, pytest.approx(own["val_loss"], abs=1e-6))


def test_eval_refuses_a_hold_out_drawn_from_a_changed_training_file(sft_run: Path, tmp_path: Path) -> None:
    """The held-out rows are a seeded permutation's first rows: with rows added to the file, another permutation,
    and rows the run trained on would have been scored as held out."""
    from omegaconf import OmegaConf

    from bamba_ft.data.builtin import generate_sft

    train, run = tmp_path / "train.jsonl", tmp_path / "run"
    rows = generate_sft(65, seed=1)
    train.write_text("".join(json.dumps(r) + "\n" for r in rows[:60]))
    shutil.copytree(sft_run, run)  # sft_run's adapter, as if trained on train.jsonl, as metrics.json records
    config = OmegaConf.load(run / "run_config.yaml")
    config.data.source = str(train)
    OmegaConf.save(config, run / "run_config.yaml")
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["data"]["hold_out_rows"] = {f"data.source={train}": 60}
    (run / "metrics.json").write_text(json.dumps(metrics))
    assert run_in_process([*EVAL, f"eval.checkpoint={run}"], tmp_path / "same")["metrics"]["num_generated"] == 3
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ConfigError, match=rf"(?s){train}: 60 rows when the run trained, 65 now.*"
                                          r"Fix: evaluate on data it did not train on \(data.val_source=FILE\)"):
        run_in_process([*EVAL, f"eval.checkpoint={run}"], tmp_path / "changed")


def test_eval_of_a_runs_export_scores_the_runs_data(sft_run: Path, tmp_path: Path) -> None:
    """A merged export records the run it came from: evaluated, it is scored on that run's held-out rows (here 5% of
    a file's 60), not on the built-in task that the command line's defaults name."""
    from omegaconf import OmegaConf

    from bamba_ft.data.builtin import generate_sft

    train, run = tmp_path / "train.jsonl", tmp_path / "run"
    train.write_text("".join(json.dumps(r) + "\n" for r in generate_sft(60, seed=1)))
    shutil.copytree(sft_run, run)
    config = OmegaConf.load(run / "run_config.yaml")
    config.data.source = str(train)
    OmegaConf.save(config, run / "run_config.yaml")
    run_in_process(["recipe=export", f"export.checkpoint={run}", "export.dtype=float32"], tmp_path / "log")
    own = run_in_process([*EVAL, f"eval.checkpoint={run}"], tmp_path / "own")["metrics"]
    exported = run_in_process([*EVAL, f"eval.checkpoint={run / 'export'}"], tmp_path / "exported")["metrics"]
    assert (exported["num_generated"], exported["val_loss"]) == (3, pytest.approx(own["val_loss"], abs=1e-4))
    # an adapter-only export too: it was scored on the command line's base and the built-in task
    run_in_process(["recipe=export", f"export.checkpoint={run}", "export.adapter_only=true"], tmp_path / "log2")
    adapter = run_in_process([*EVAL, f"eval.checkpoint={run / 'export_adapter'}"], tmp_path / "adapter")
    assert "exported from run" in adapter["source"]
    assert (adapter["metrics"]["num_generated"], adapter["metrics"]["val_loss"]) == (3, pytest.approx(own["val_loss"], abs=1e-6))


def test_eval_refuses_a_data_key_the_runs_data_does_not_read(sft_run: Path, tmp_path: Path) -> None:
    """The builtin task generates its validation set: a validation file is refused with the fix, not dropped."""
    with pytest.raises(BambaFTError, match=r"(?s)data.val_source: the data is the builtin task.*would be ignored.*"
                                           r"Fix: also name the data it belongs to"):
        run_in_process([*EVAL, f"eval.checkpoint={sft_run}", "data.val_source=val.jsonl"], tmp_path)


def test_eval_never_writes_over_a_training_run_and_num_generate_0_generates_nothing(sft_run: Path,
                                                                                   tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(sft_run, run)
    before = (run / "metrics.json").read_text()
    (tmp_path / "afile").write_text("mine")
    for output, message in ((run, "holds a training run"), (tmp_path / "afile", "is a file")):
        with pytest.raises(ConfigError, match=f"eval.output_dir={output} {message}"):
            run_in_process([*EVAL, f"eval.checkpoint={run}", f"eval.output_dir={output}"], tmp_path / "x")
    assert (run / "metrics.json").read_text() == before and (tmp_path / "afile").read_text() == "mine"
    under_a_file = tmp_path / "afile" / "sub"  # failed with mkdir's traceback after the evaluation
    with pytest.raises(ConfigError, match=f"eval.output_dir={under_a_file}: {tmp_path / 'afile'} is a file, so nothing"):
        run_in_process([*EVAL, f"eval.checkpoint={run}", f"eval.output_dir={under_a_file}"], tmp_path / "x")
    # Hydra's own directory is checked as it starts, before it writes its .hydra/ files there
    hydra_files = (run / ".hydra" / "config.yaml").read_bytes() if (run / ".hydra").is_dir() else None
    proc = cli([*EVAL, f"eval.checkpoint={run}", f"hydra.run.dir={run}"], cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "holds a training run" in proc.stderr and "task=eval" in proc.stderr, proc.stderr
    assert (run / "metrics.json").read_text() == before
    assert ((run / ".hydra" / "config.yaml").read_bytes() if (run / ".hydra").is_dir() else None) == hydra_files
    proc = cli([*EVAL, f"eval.checkpoint={run}", f"hydra.run.dir={under_a_file}"], cwd=tmp_path, check=False)
    assert proc.returncode == 2 and f"{tmp_path / 'afile'} is a file, so nothing" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    # eval.num_generate=0: no generation metrics (every validation row was generated before)
    (tmp_path / "out" / "predictions.jsonl").parent.mkdir()
    (tmp_path / "out" / "predictions.jsonl").write_text("an earlier evaluation's\n")
    metrics = run_in_process([*EVAL, f"eval.checkpoint={run}", "eval.num_generate=0"], tmp_path / "out")["metrics"]
    assert "exact_match" not in metrics and "num_generated" not in metrics and "val_loss" in metrics
    assert not (tmp_path / "out" / "predictions.jsonl").exists()


def test_eval_and_export_refuse_keys_their_source_would_ignore(sft_run: Path, tmp_path: Path) -> None:
    """A run brings its model, quantization and adapters; they were silently used over the command line's."""
    with pytest.raises(ConfigError, match=r"model, peft.r: run .* brings its own model, quant, peft, so these would "
                                          r"be ignored"):
        run_in_process([*EVAL, f"eval.checkpoint={sft_run}", "model=tiny-random-falcon_h1", "peft.r=4"], tmp_path / "a")
    with pytest.raises(ConfigError, match=r"quant: run .* brings its own"):
        run_in_process(["recipe=export", f"export.checkpoint={sft_run}", "quant=nf4",
                        f"export.output_dir={tmp_path / 'x'}"], tmp_path / "b")
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_a_diverged_run_exits_3_with_strict_json_and_no_next_steps(tmp_path: Path) -> None:
    proc = cli(["smoke=fast", "trainer=cpu", "logger=none", "optim.lr=1e6", "eval.before_training=false",
                f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, check=False)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "diverged: " in proc.stdout and "Fix: lower optim.lr" in proc.stdout and "next:" not in proc.stdout
    def bare(name: str) -> None:
        raise AssertionError(f"metrics.json holds a bare {name}")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text(), parse_constant=bare)
    assert metrics["diverged"] and metrics["after"]["val_loss"] is None


def test_the_summary_rate_is_the_whole_fits(tmp_path: Path) -> None:
    """Tokens over the fit's wall time (it was the last logging window's rate, 8x the average in a short run)."""
    metrics = run_in_process(["smoke=fast", "trainer=cpu", "logger=none", "eval.before_training=false"], tmp_path)
    tr = metrics["train"]
    assert tr["tokens"] > 0 and tr["tokens_per_sec"] == pytest.approx(tr["tokens"] / tr["fit_seconds"], rel=0.01)


def test_bench_smoke_on_cpu(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run_in_process(["recipe=bench", "trainer=cpu", "bench.warmup_steps=1", "bench.steps=1", "bench.seqs_per_step=2",
                    "bench.median_len=40", "bench.max_len=64", "bench.data_pipeline_examples=3000",
                    "bench.data_pipeline_num_proc=[2]", "bench.data_pipeline_paths=[memory]", "bench.seq_scaling=[64,128]",
                    "bench.mixer_only=true", "bench.memory_modes=[none,all+offload]"], tmp_path)
    results = json.loads((tmp_path / "bench.json").read_text())
    by_name = {r["variant"]: r for r in results["runs"]}
    assert by_name["bamba_ft"]["tokens_per_sec"] > 0 and by_name["hf_padded"]["tokens_per_sec"] > 0
    assert by_name["bamba_ft"]["adapters_with_grad"] == by_name["bamba_ft"]["adapters"]
    assert "error" in by_name["hf_padfree"]  # transformers' torch mixer refuses packed rows without mamba-ssm
    # Measured in a process of its own (its ~10 s start is why the stream path, whose rows and tokens
    # test_bench_data compares with these at data.num_proc=2, is left out here).
    (memory,) = results["data_pipeline"]["rows"]
    assert (memory["path"], memory["num_proc"], memory["examples"]) == ("memory", 2, 3000)
    assert memory["tokens"] > 0 and memory["packing_efficiency"] > 0.9
    assert [(r["seq_len"], r["memory_mode"]) for r in results["seq_scaling"]] == [
        (64, "none"), (128, "none"), (64, "all+offload"), (128, "all+offload")]
    assert results["longest_trained"] == {"bamba_ft none": 128, "bamba_ft all+offload": 128}
    assert results["mixer_only"]["transformers_ms"] > 0 and results["mixer_only"]["bamba_ft_ms"] > 0
    out = capsys.readouterr().out
    assert "| bamba_ft |" in out and "| memory | 2 | 3,000 |" in out


def test_cfg_job_prints_composed_config(tmp_path: Path) -> None:
    proc = cli(["recipe=qlora", "--cfg", "job"], cwd=tmp_path)
    assert "method: nf4" in proc.stdout and "gradient_checkpointing: all" in proc.stdout


def test_a_bad_override_exits_2_with_one_message_and_no_traceback(tmp_path: Path) -> None:
    """Refused by the override check, before Hydra composes anything. (A BambaFTError a task raises reaches the
    user the same way: test_out_of_memory and test_secrets run such errors through the CLI.)"""
    proc = cli(["peft.rr=8", f"hydra.run.dir={tmp_path}"], cwd=tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert re.search(r"^bamba_ft: \w+Error: ", proc.stderr, re.M), proc.stderr[-2000:]
    assert "'rr' is not a key of peft. Did you mean 'r'?" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("args,message", [
    (["peft.target_modules=[in_prj]", *FAST], "'in_prj' matches no module of BambaForCausalLM. Did you mean 'in_proj'?"),
    (["data=file", "data.source=/nonexistent/train.jsonl", *FAST],
     "data.source=/nonexistent/train.jsonl: no such file or directory"),
    (["data=file", "data.sources=[{source: /nonexistent/a.jsonl}]", *FAST], "/nonexistent/a.jsonl: no such file"),
    # the built-in task's lengths and schedule must not silently apply to the user's data
    (["data.source=train.jsonl", *FAST], "data.source=train.jsonl with data=builtin: that data option tunes "
     "lengths and schedule for the built-in task (data.max_seq_len=128, data.max_tokens_per_batch=2048, "
     "optim.lr=0.003, trainer.max_steps=400)"),  # the option's values, not the command line's
    (["data.sources=[{source: a.jsonl}]", *FAST], "Fix: add data=file to the command line"),
    # a validation file next to the built-in task was ignored: it validated on the generated set
    (["data.val_source=val.jsonl", *FAST], "data.val_source=val.jsonl: the data is the built-in task, which "
                                           "generates its training and validation sets, so this would be ignored"),
    (["model.name_or_path=/nonexistent/model", *FAST], "model.name_or_path=/nonexistent/model: no such directory"),
    (["model.name_or_path=some-org/some-model", *FAST], "not a local directory, and the Hugging Face Hub did not provide it"),
    (["recipe=eval", "eval.checkpoint=/nonexistent/run"], "checkpoint /nonexistent/run: no such file or directory"),
])
def test_user_errors_are_one_clear_message(args: list[str], message: str, tmp_path: Path) -> None:
    """A BambaFTError, which the CLI prints as one message with exit status 2 (test_out_of_memory), here in this
    process."""
    with pytest.raises(BambaFTError) as error:
        run_in_process(args, tmp_path / "run")
    assert message in str(error.value)
    assert "Traceback" not in str(error.value)  # not a wrapped report of another error


def test_non_bamba_checkpoint_is_refused(tmp_path: Path) -> None:
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                vocab_size=128).save_pretrained(tmp_path / "llama")
    with pytest.raises(BambaFTError, match="is a 'llama' model"):
        run_in_process([f"model.name_or_path={tmp_path / 'llama'}", *FAST], tmp_path / "run")


def test_doctor_checks_the_model(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run_in_process(["recipe=doctor", "trainer=cpu"], tmp_path)
    out = capsys.readouterr().out
    assert "gradient check: 20 adapter tensors, all receive gradient" in out
    assert "packing check" in out and "doctor: ok" in out


def test_gradient_accumulation_counts_optimizer_steps(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    metrics = run_in_process(["recipe=sft", *FAST, "trainer.accumulate_grad_batches=2"], tmp_path)
    assert metrics["train"]["steps"] == 2 and "bamba_ft: trained 2 steps" in capsys.readouterr().out


def test_the_shipped_lora_search_runs_its_jobs(tmp_path: Path) -> None:
    """conf/sweep/lora_hpo.yaml interpolates ${sweep.direction}: reading the file alone for its `???` keys failed,
    so every trial of the shipped search ended in an InterpolationKeyError."""
    metrics = run_in_process(["sweep=lora_hpo", *FAST], tmp_path)
    assert metrics["train"]["steps"] == 2


@pytest.mark.parametrize("recipe", ["full", "sft"])
def test_training_steps_run_in_train_mode(recipe: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """from_pretrained returns an eval-mode model; a full fine-tune has no peft wrapper to switch it, and
    transformers' layers checkpoint (and dropout applies) only in training."""
    from bamba_ft.lit_module import BambaLitModule

    modes: list[bool] = []
    step = BambaLitModule.training_step

    def recording(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        modes.append(all(m.training for m in self.model.modules()))
        return step(self, *args, **kwargs)

    monkeypatch.setattr(BambaLitModule, "training_step", recording)
    run_in_process([f"recipe={recipe}", *FAST, "model.gradient_checkpointing=all"], tmp_path)
    assert modes == [True, True]


def test_eval_fails_when_the_lm_eval_tasks_it_was_asked_for_cannot_run(sft_run: Path, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A stand-in for lm-eval whose harness fails (as on an unknown task name): the other metrics are written, and
    the command fails instead of exiting 0 with a warning."""
    import importlib.machinery
    import sys
    import types

    def fail(**kwargs) -> None:  # noqa: ANN003
        raise KeyError("task(s) not found: hellaswagg")

    mods = {name: types.ModuleType(name) for name in ("lm_eval", "lm_eval.models", "lm_eval.models.huggingface")}
    for name, mod in mods.items():
        mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
        monkeypatch.setitem(sys.modules, name, mod)
    mods["lm_eval"].simple_evaluate = fail
    mods["lm_eval.models.huggingface"].HFLM = lambda **kwargs: object()
    with pytest.raises(BambaFTError, match=r"(?s)eval.lm_eval_tasks=\['hellaswagg'\]: lm-eval could not run them "
                                           r"\(KeyError: .*task\(s\) not found.*metrics.json.*Fix: check the task names"):
        run_in_process([*EVAL, f"eval.checkpoint={sft_run}", "eval.lm_eval_tasks=[hellaswagg]"], tmp_path)
    written = json.loads((tmp_path / "metrics.json").read_text())["metrics"]
    assert "failed" in written["lm_eval"] and written["val_loss"] > 0


def test_a_run_without_validation_data_suggests_an_evaluation_with_data(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture) -> None:
    """A run trained with data.val_fraction=0 ended suggesting `recipe=eval eval.checkpoint=RUN`, which printed only
    'no validation data'. The summary names data.val_source=FILE, the evaluation without it the fix, and with it
    scores the file."""
    from bamba_ft.data.builtin import generate_sft

    train, val, run = tmp_path / "train.jsonl", tmp_path / "val.jsonl", tmp_path / "run"
    for path, rows in ((train, generate_sft(40, seed=1)), (val, generate_sft(4, seed=2, validation=True))):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_in_process(["recipe=sft", "trainer=cpu", "logger=none", "data=file", f"data.source={train}",
                    "data.val_fraction=0", "trainer.max_steps=1", "trainer.enable_progress_bar=false",
                    "eval.max_new_tokens=4"], run)
    assert f"python -m bamba_ft recipe=eval eval.checkpoint={run} data.val_source=FILE\n" in capsys.readouterr().out
    run_in_process([*EVAL, f"eval.checkpoint={run}"], tmp_path / "none")
    assert "  no validation data\n  Fix: add data.val_source=FILE to the command, or data=file data.source=FILE to " \
           "score all of a file\n" in capsys.readouterr().out
    scored = run_in_process([*EVAL, f"eval.checkpoint={run}", f"data.val_source={val}"], tmp_path / "val")["metrics"]
    assert scored["num_generated"] == 4 and scored["val_loss"] > 0
    assert "Fix:" not in capsys.readouterr().out
