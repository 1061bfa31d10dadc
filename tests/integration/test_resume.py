"""Stop and resume: the resumed run ends with the same adapter as an uninterrupted one."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bamba_ft.config.schema import DataConfig, RunConfig
from bamba_ft.errors import ConfigError
from bamba_ft.jobs import train
from bamba_ft.jobs.callbacks import GracefulStop


def small_run(out: Path, resume: str | None = None, steps: int = 10) -> RunConfig:
    """4 batches per epoch, so 10 steps cross two epoch boundaries."""
    cfg = RunConfig(output_dir=str(out))
    cfg.trainer.accelerator = "cpu"
    cfg.trainer.max_steps = steps
    cfg.trainer.val_check_interval = 3
    cfg.trainer.checkpoint_every_n_steps = 0
    cfg.trainer.enable_progress_bar = False
    cfg.trainer.resume = resume
    cfg.data = DataConfig(builtin_train_examples=60, builtin_val_examples=16, max_seq_len=128, max_tokens_per_batch=512)
    cfg.eval.before_training = False
    cfg.eval.generate = False
    cfg.logger.csv = cfg.logger.tensorboard = False
    return cfg


def stop_at(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """Runs started from here on stop once they reach `step`, as after Ctrl-C (`monkeypatch.undo()` ends it)."""
    original = GracefulStop.on_train_batch_end

    def stop(self, trainer, *args):  # noqa: ANN001, ANN202
        if trainer.global_step == step:
            self.requested = "SIGINT"  # what the Ctrl-C handler sets
        return original(self, trainer, *args)

    monkeypatch.setattr(GracefulStop, "on_train_batch_end", stop)


def adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "adapter" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    run = tmp_path_factory.mktemp("full")
    train.run(small_run(run))
    return adapter(run)


# epoch 0, epoch 1, epoch 2 (4 batches per epoch)
@pytest.mark.parametrize("step", [pytest.param(3, marks=pytest.mark.slow), 6, pytest.param(9, marks=pytest.mark.slow)])
def test_resume_matches_uninterrupted(step: int, uninterrupted: dict[str, torch.Tensor], tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
                                      caplog: pytest.LogCaptureFixture) -> None:
    stop_at(monkeypatch, step)
    assert train.run(small_run(tmp_path / "first")) == {"stopped_at": step, "signal": "SIGINT"}
    assert (tmp_path / "first/checkpoints/interrupted.ckpt").exists()
    assert not (tmp_path / "first/adapter").exists()
    monkeypatch.undo()

    capsys.readouterr()
    with caplog.at_level(logging.INFO, logger="bamba_ft"):
        metrics = train.run(small_run(tmp_path / "second", resume=str(tmp_path / "first")))
    assert metrics["train"]["resumed_at_step"] == step
    assert f"best-* checkpoints kept here start anew (those of {tmp_path / 'first'} stay there)" in caplog.text
    assert f"trained steps {step + 1}-10 ({10 - step} in this run, resumed at step {step})" in capsys.readouterr().out
    full, resumed = uninterrupted, adapter(tmp_path / "second")
    assert full.keys() == resumed.keys()
    for name in full:
        torch.testing.assert_close(resumed[name], full[name], rtol=0, atol=1e-6)
    assert any(float(v.abs().max()) > 0 for k, v in full.items() if "lora_B" in k)  # the adapter did train
    if step == 6:  # a run that reached trainer.max_steps and wrote its results is not resumed again
        from bamba_ft.errors import ConfigError

        with pytest.raises(ConfigError, match="that run finished"):
            train.run(small_run(tmp_path / "second", resume=str(tmp_path / "second")))


@pytest.mark.parametrize("checkpoint", ["interrupted.ckpt", "last.ckpt"])
def test_a_checkpoint_after_the_validation_that_ends_an_epoch_resumes_into_the_next(
        checkpoint: str, uninterrupted: dict[str, torch.Tensor], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Validation and the periodic save every 4 steps, 4 batches per epoch: step 8 ends epoch 1 and validates, so its
    checkpoints are written after that validation; the resume starts epoch 2 with its own shuffle, as the
    uninterrupted run does (whose adapter the validation schedule does not change)."""
    def every_4(out: Path, resume: Path | None = None) -> RunConfig:
        cfg = small_run(out, resume=str(resume) if resume else None)
        cfg.trainer.val_check_interval = cfg.trainer.checkpoint_every_n_steps = 4
        return cfg

    stop_at(monkeypatch, 8)
    assert train.run(every_4(tmp_path / "first"))["stopped_at"] == 8
    monkeypatch.undo()
    ckpt = tmp_path / "first" / "checkpoints" / checkpoint
    assert torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"] == 8
    assert train.run(every_4(tmp_path / "second", resume=ckpt))["train"]["resumed_at_step"] == 8
    resumed = adapter(tmp_path / "second")
    for name in uninterrupted:
        torch.testing.assert_close(resumed[name], uninterrupted[name], rtol=0, atol=1e-6)


def test_a_checkpoint_inside_an_accumulated_step_is_not_resumed_from(tmp_path: Path) -> None:
    """Two batches a step, validation every 3 batches (4 a epoch): the validation of batch 3 falls inside step 2, and
    its best-* lacks the gradient of batch 3. A resume would train step 2 on batch 4 alone; it is refused by name,
    and a run directory resumes from the furthest checkpoint that ends a step."""
    cfg = small_run(tmp_path / "run", steps=4)
    cfg.trainer.accumulate_grad_batches, cfg.trainer.save_top_k = 2, 2
    train.run(cfg)
    ckpts = tmp_path / "run" / "checkpoints"
    inside = {p.name: torch.load(p, map_location="cpu", weights_only=False) for p in ckpts.glob("best*.ckpt")}
    assert {n: (c["global_step"], c.get("bamba_ft_mid_step")) for n, c in inside.items()} == \
        {"best-step000001.ckpt": (1, True), "best-step000003.ckpt": (3, False)}
    with pytest.raises(ConfigError, match=r"(?s)best-step000001.ckpt was written between the accumulated batches.*"
                                          r"Fix: resume from its run directory"):
        train.run(small_run(tmp_path / "again", resume=str(ckpts / "best-step000001.ckpt")))
    (ckpts / "last.ckpt").unlink()
    (ckpts / "best-step000003.ckpt").unlink()
    with pytest.raises(ConfigError, match=r"no intact checkpoint .*best-step000001.ckpt \(inside an optimizer step\)"):
        train.run(small_run(tmp_path / "again", resume=str(tmp_path / "run")))


def test_a_stop_asked_at_an_epochs_shorter_last_step_saves_there(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Three batches a step, 4 a epoch: epoch 0's step 2 is its last batch alone. A Ctrl-C there stops at step 2,
    the state after a whole step, rather than waiting for the next epoch's first full step."""
    cfg = small_run(tmp_path / "run", steps=4)
    cfg.trainer.accumulate_grad_batches = 3
    stop_at(monkeypatch, 2)
    assert train.run(cfg) == {"stopped_at": 2, "signal": "SIGINT"}
    saved = torch.load(tmp_path / "run/checkpoints/interrupted.ckpt", map_location="cpu", weights_only=False)
    assert (saved["global_step"], saved.get("bamba_ft_mid_step")) == (2, False)


def test_a_run_resumed_in_its_own_directory_ends_with_last_and_the_best(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A stop between two validations: Lightning validates as it stops and writes a best-* after interrupted.ckpt,
    so the resumed run's checkpoint callback never heard of it. The finished run keeps last.ckpt and the better of
    the best-* files (save_top_k=1), and drops interrupted.ckpt, which last.ckpt supersedes."""
    from bamba_ft.jobs.train import _own_score

    run = tmp_path / "run"
    stop_at(monkeypatch, 7)
    train.run(small_run(run))
    monkeypatch.undo()
    ckpts = run / "checkpoints"
    stopped = {p.name: _own_score(p) for p in ckpts.glob("best*.ckpt")}
    assert "interrupted.ckpt" in {p.name for p in ckpts.iterdir()} and all(v is not None for v in stopped.values())
    train.run(small_run(run, resume=str(run)))
    left = sorted(p.name for p in ckpts.iterdir())
    bests = [n for n in left if n.startswith("best")]
    assert len(bests) == 1 and left == sorted([*bests, "last.ckpt"]), left
    assert _own_score(ckpts / bests[0]) <= min(stopped.values())  # the better one stays, whichever run wrote it


def test_a_resume_on_changed_training_data_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same file name with other rows: the checkpoint's position in the epoch would count other rows."""
    import json

    from bamba_ft.data.builtin import generate_sft
    from bamba_ft.errors import ConfigError

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in generate_sft(60, seed=1)))

    def on_file(cfg: RunConfig) -> RunConfig:
        cfg.data.source, cfg.data.format, cfg.data.val_fraction = str(data), "messages", 0.2
        return cfg

    stop_at(monkeypatch, 2)
    assert train.run(on_file(small_run(tmp_path / "first")))["stopped_at"] == 2
    monkeypatch.undo()
    original = data.read_text()
    data.write_text(original.translate(str.maketrans("123", "312")))  # other digits: every length the same
    with pytest.raises(ConfigError, match=r"the training data changed since this checkpoint was written \(48 "
                                          r"examples, tokens sha256 \w+ then, 48 examples, tokens sha256 \w+ now\)"):
        train.run(on_file(small_run(tmp_path / "second", resume=str(tmp_path / "first"))))
    data.write_text(original)  # back: it resumes
    assert train.run(on_file(small_run(tmp_path / "third", resume=str(tmp_path / "first"), steps=4)))["train"]["steps"] == 4


def test_a_resumed_run_reports_the_before_metrics_of_the_run_it_continues(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    def measured(cfg: RunConfig) -> RunConfig:
        cfg.eval.before_training = True
        return cfg

    whole = train.run(measured(small_run(tmp_path / "whole", steps=4)))
    stop_at(monkeypatch, 2)
    assert train.run(measured(small_run(tmp_path / "first", steps=4)))["stopped_at"] == 2
    monkeypatch.undo()
    resumed = train.run(measured(small_run(tmp_path / "second", resume=str(tmp_path / "first"), steps=4)))
    def measures(before: dict) -> dict:
        return {k: v for k, v in before.items() if k != "eval_seconds"}

    assert whole["before"]["val_loss"] > 0 and measures(resumed["before"]) == measures(whole["before"])  # it was {}


def test_resuming_a_finished_run_is_refused_with_the_way_on(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A finished run has nothing left to train: a resume would rewrite its train figures with those of an empty fit.
    Raising trainer.max_steps continues it."""
    from bamba_ft.errors import ConfigError

    train.run(small_run(tmp_path / "first", steps=2))
    first = (tmp_path / "first" / "metrics.json").read_text()
    with pytest.raises(ConfigError, match=r"(?s)that run finished.*step 2.*trainer.max_steps=2.*"
                                          r"Fix: raise trainer.max_steps.*recipe=eval eval.checkpoint="):
        train.run(small_run(tmp_path / "first", resume=str(tmp_path / "first"), steps=2))
    assert (tmp_path / "first" / "metrics.json").read_text() == first
    (tmp_path / "first" / "metrics.json").unlink()  # as when a run is killed after its last step, before its results
    capsys.readouterr()
    train.run(small_run(tmp_path / "first", resume=str(tmp_path / "first"), steps=2))
    assert "nothing left to train: the resumed run was already at step 2" in capsys.readouterr().out
    assert (tmp_path / "first" / "metrics.json").exists()
    metrics = train.run(small_run(tmp_path / "first", resume=str(tmp_path / "first"), steps=3))
    assert metrics["train"]["steps"] == 3 and metrics["train"]["resumed_at_step"] == 2


def test_early_stopping_ends_the_fit_and_its_count_survives_a_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture) -> None:
    """min_delta 100: only the first validation (step 3) improves, so patience 2 stops the fit at the validation of
    step 9. A run stopped at step 7 (after one validation without improvement) and resumed stops there too: the
    count is in the checkpoint. A resume of the early-stopped run is refused, as for a finished run."""
    def run(out: Path, resume: str | None = None) -> dict:
        cfg = small_run(out, resume=resume, steps=30)
        cfg.trainer.early_stopping_patience, cfg.trainer.early_stopping_min_delta = 2, 100.0
        return train.run(cfg)

    metrics = run(tmp_path / "a")
    stopped = metrics["train"]["early_stopped"]
    assert metrics["train"]["steps"] == stopped["step"] == 9 and stopped["patience"] == 2
    # the lowest val/loss, which improved after step 3, only by less than min_delta
    assert Path(stopped["best_checkpoint"]).name == "best-step000009.ckpt" and Path(stopped["best_checkpoint"]).exists()
    assert stopped["lowest_val_loss"] == pytest.approx(metrics["train"]["last_val_loss"])
    assert stopped["lowest_val_loss"] < stopped["best_val_loss"]  # the loss at step 3, the last improvement over 100
    assert "stopped early at step 9: 2 validations in a row" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="early stopping ended it at step 9"):
        run(tmp_path / "a2", resume=str(tmp_path / "a"))

    stop_at(monkeypatch, 7)
    assert run(tmp_path / "b")["stopped_at"] == 7
    monkeypatch.undo()
    shutil.copytree(tmp_path / "b", tmp_path / "b_stopped")
    resumed = run(tmp_path / "b", resume=str(tmp_path / "b"))
    assert resumed["train"]["steps"] == resumed["train"]["early_stopped"]["step"] == 9
    # the patience of the resuming command applies (here 3: one validation more, step 12), as other schedule keys do
    cfg = small_run(tmp_path / "c", resume=str(tmp_path / "b_stopped"), steps=30)
    cfg.trainer.early_stopping_patience, cfg.trainer.early_stopping_min_delta = 3, 100.0
    assert train.run(cfg)["train"]["early_stopped"]["step"] == 12
    assert torch.equal(adapter(tmp_path / "b")["base_model.model.model.layers.0.mamba.in_proj.lora_A.weight"],
                       adapter(tmp_path / "a")["base_model.model.model.layers.0.mamba.in_proj.lora_A.weight"])


def test_a_checkpoint_written_at_a_validation_step_holds_that_validation(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """min_delta 100, patience 2: the uninterrupted run stops early at step 9 (validations at 3, 6, 9). A Ctrl-C at
    step 6, a validation's own step, is saved after that validation, and so is the periodic last.ckpt of step 6
    (what a run killed later, without a checkpoint of its own, resumes from): resumed from either, the run counts
    the validation of step 6 and stops at step 9 too, with the uninterrupted run's adapter and lowest val loss."""
    def run(out: Path, resume: Path | None = None) -> dict:
        cfg = small_run(out, resume=str(resume) if resume else None, steps=30)
        cfg.trainer.checkpoint_every_n_steps = 3
        cfg.trainer.early_stopping_patience, cfg.trainer.early_stopping_min_delta = 2, 100.0
        return train.run(cfg)

    whole = run(tmp_path / "whole")["train"]["early_stopped"]
    assert whole["step"] == 9
    stop_at(monkeypatch, 9)  # a Ctrl-C at the step whose validation ends the fit: the run finishes there
    assert run(tmp_path / "ended")["train"]["early_stopped"] == {**whole, "best_checkpoint": whole["best_checkpoint"]
                                                                 .replace(str(tmp_path / "whole"), str(tmp_path / "ended"))}
    assert not (tmp_path / "ended" / "checkpoints" / "interrupted.ckpt").exists()
    monkeypatch.undo()
    stop_at(monkeypatch, 6)
    assert run(tmp_path / "stopped")["stopped_at"] == 6
    monkeypatch.undo()
    ckpts = tmp_path / "stopped" / "checkpoints"
    for name, ckpt in (("from_interrupted", ckpts / "interrupted.ckpt"), ("from_last", ckpts / "last.ckpt")):
        assert torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"] == 6
        resumed = run(tmp_path / name, resume=ckpt)["train"]
        assert resumed["resumed_at_step"] == 6 and resumed["early_stopped"]["step"] == 9, name
        assert resumed["early_stopped"]["lowest_val_loss"] == pytest.approx(whole["lowest_val_loss"], rel=1e-6)
        full, got = adapter(tmp_path / "whole"), adapter(tmp_path / name)
        for key in full:
            torch.testing.assert_close(got[key], full[key], rtol=0, atol=1e-6)


def test_early_stopped_run_is_refused_when_its_stop_step_had_a_periodic_checkpoint(tmp_path: Path) -> None:
    """The defaults validate and save last.ckpt at the same steps (every 100): the periodic save of the stop step
    runs before that step's validation, so last.ckpt must be written again once early stopping has ended the fit,
    or a resume of the early-stopped run takes it and trains on."""
    def run(out: Path, resume: str | None = None) -> dict:
        cfg = small_run(out, resume=resume, steps=30)
        cfg.trainer.checkpoint_every_n_steps = cfg.trainer.val_check_interval
        cfg.trainer.early_stopping_patience, cfg.trainer.early_stopping_min_delta = 2, 100.0
        return train.run(cfg)

    assert run(tmp_path / "a")["train"]["early_stopped"]["step"] == 9
    with pytest.raises(ConfigError, match="early stopping ended it at step 9"):
        run(tmp_path / "a2", resume=str(tmp_path / "a"))


def test_an_epoch_bound_run_saves_last_ckpt_only_at_the_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """trainer.checkpoint_every_n_steps=0 means a checkpoint at the end only, also for trainer.max_steps=-1 with
    trainer.max_epochs (it saved last.ckpt after every step: a full fine-tune's weights and moments each step)."""
    from bamba_ft.jobs.callbacks import AtomicCheckpointIO

    saved: list[tuple[int, str]] = []
    original = AtomicCheckpointIO.save_checkpoint

    def spy(self, checkpoint, path, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        saved.append((checkpoint["global_step"], Path(path).name))
        return original(self, checkpoint, path, *args, **kwargs)

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", spy)
    cfg = small_run(tmp_path / "run", steps=-1)
    cfg.trainer.max_epochs = 2  # 4 batches per epoch: 8 steps
    assert train.run(cfg)["train"]["steps"] == 8
    assert [s for s in saved if s[1] == "last.ckpt"] == [(8, "last.ckpt")], saved
    assert train.run(small_run(tmp_path / "more", resume=str(tmp_path / "run"), steps=9))["train"]["steps"] == 9


def test_early_stopping_reports_the_lowest_val_loss_without_a_best_checkpoint(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """trainer.save_top_k=0 keeps no best-* checkpoint, and lowest_val_loss, read from it, was null. It is the run's
    lowest all the same, across a resume into another directory too."""
    def run(out: Path, resume: str | None = None) -> dict:
        cfg = small_run(out, resume=resume, steps=30)
        cfg.trainer.save_top_k = 0
        cfg.trainer.early_stopping_patience, cfg.trainer.early_stopping_min_delta = 2, 100.0
        return train.run(cfg)

    stopped = run(tmp_path / "a")["train"]
    assert stopped["early_stopped"]["step"] == 9 and stopped["early_stopped"]["best_checkpoint"] is None
    assert stopped["early_stopped"]["lowest_val_loss"] == pytest.approx(stopped["last_val_loss"])  # as with best-*
    stop_at(monkeypatch, 7)
    assert run(tmp_path / "b")["stopped_at"] == 7
    monkeypatch.undo()
    resumed = run(tmp_path / "c", resume=str(tmp_path / "b"))["train"]["early_stopped"]
    assert resumed["lowest_val_loss"] == pytest.approx(stopped["early_stopped"]["lowest_val_loss"], abs=1e-6)


def test_a_resume_with_other_max_steps_keeps_the_best_checkpoints_it_ranked(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Another trainer.max_steps gives last.ckpt another save interval, part of its callback's state key, and
    Lightning warned that the callback which wrote the checkpoint was missing. Only that callback's state (the path
    of last.ckpt, written anew by every save) is left behind: the best-* callback, keyed by its metric, is restored
    with its scores and top k, so the resumed run ranks the stopped run's best-* with its own."""
    import warnings

    from bamba_ft import quiet
    from bamba_ft.model.restore import checkpoint_state

    run = tmp_path / "run"

    def cfg(steps: int, resume: str | None = None) -> RunConfig:
        c = small_run(run, resume=resume, steps=steps)
        c.trainer.save_top_k = 10
        return c

    def states(ckpt: str) -> dict:
        return checkpoint_state(run / "checkpoints" / ckpt)["callbacks"]

    stop_at(monkeypatch, 7)
    train.run(cfg(10))
    monkeypatch.undo()
    stopped = states("interrupted.ckpt")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet.silence_import_noise()
        train.run(cfg(9, resume=str(run)))
    assert [str(w.message) for w in seen if "Please add the following callbacks" in str(w.message)] == []
    resumed = states("best-step000009.ckpt")  # written in step 9's validation, after last.ckpt's save of that step
    lasts = [k for k in (*stopped, *resumed) if k.startswith("ModelCheckpoint{'monitor': None")]
    assert len(lasts) == 2 and "'every_n_train_steps': 10" in lasts[0] and "'every_n_train_steps': 9" in lasts[1]
    key = next(k for k in resumed if k.startswith("ModelCheckpoint{'monitor': 'val/loss'"))
    assert key in stopped
    before, after = stopped[key]["best_k_models"], resumed[key]["best_k_models"]
    assert {Path(p).name for p in before} == {"best-step000003.ckpt", "best-step000006.ckpt"}
    assert {Path(p).name for p in after} == {"best-step000003.ckpt", "best-step000006.ckpt", "best-step000009.ckpt"}
    assert resumed[key]["best_model_path"] == min(after, key=lambda p: float(after[p]))


def test_resume_latest_goes_on_from_the_continuation_of_a_stopped_run(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A run stopped at step 2 and continued by `latest` to step 4 in a new directory was still the newest stopped
    run, so the next `latest` with trainer.max_steps=5 started again from step 2. It goes on from step 4."""
    from omegaconf import OmegaConf

    monkeypatch.chdir(tmp_path)
    day = Path("outputs") / "2026-12-01"
    stop_at(monkeypatch, 2)
    assert train.run(small_run(day / "10-00-00"))["stopped_at"] == 2
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    assert train.run(small_run(day / "11-00-00", resume="latest", steps=4))["train"]["resumed_at_step"] == 2
    recorded = OmegaConf.load(day / "11-00-00" / "run_config.yaml").trainer.resume
    assert recorded == str(tmp_path / day / "10-00-00" / "checkpoints" / "interrupted.ckpt")
    third = train.run(small_run(day / "12-00-00", resume="latest", steps=5))["train"]
    assert (third["resumed_at_step"], third["steps"]) == (4, 5)
