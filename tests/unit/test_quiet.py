"""Console output: each line once."""

from __future__ import annotations

import io
import logging

import lightning.pytorch  # noqa: F401  (adds Lightning's console handlers, as the training job's import does)
import pytest

from bamba_ft import quiet


def test_lightning_lines_print_once_through_the_roots_handlers(monkeypatch: pytest.MonkeyPatch) -> None:
    root, ours = logging.getLogger(), io.StringIO()
    handler = logging.StreamHandler(ours)
    loggers = [logging.getLogger(n) for n in ("lightning", "lightning.pytorch", "lightning.fabric")]
    for logger in loggers:  # restored after the test
        monkeypatch.setattr(logger, "handlers", list(logger.handlers))
        monkeypatch.setattr(logger, "propagate", logger.propagate)
    monkeypatch.setattr(root, "handlers", [handler])
    theirs = io.StringIO()
    logging.getLogger("lightning").handlers.append(logging.StreamHandler(theirs))  # as its import adds one
    quiet.lightning_through_root()
    logging.getLogger("lightning.pytorch").info("GPU available: False, used: False")
    assert ours.getvalue() == "GPU available: False, used: False\n" and theirs.getvalue() == ""


def test_lightnings_dirpath_warning_gives_way_to_the_resume_line() -> None:
    """A resume into another directory: train.run logs that best-* checkpoints start anew there (test_resume)."""
    import warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet.silence_import_noise()
        warnings.warn("The dirpath has changed from 'a' to 'b', therefore `best_model_score`, `kth_best_model_path`, "
                      "`kth_value`, `last_model_path` and `best_k_models` won't be reloaded. Only `best_model_path` "
                      "will be reloaded.", stacklevel=1)
    assert seen == []


_MISSING = ("Be aware that when using `ckpt_path`, callbacks used to create the checkpoint need to be provided during "
            "`Trainer` instantiation. Please add the following callbacks: {}.")
_LAST = "ModelCheckpoint{'monitor': None, 'mode': 'min', 'every_n_train_steps': 100, 'every_n_epochs': 0, " \
        "'train_time_interval': None}"
_BEST = "ModelCheckpoint{'monitor': 'val/loss', 'mode': 'min', 'every_n_train_steps': 0, 'every_n_epochs': 1, " \
        "'train_time_interval': None}"


@pytest.mark.parametrize(("missing", "shown"), [([_LAST], False), ([_BEST], True), ([_LAST, _BEST], True),
                                                (["PatientEarlyStopping{'monitor': 'val/loss', 'mode': 'min'}"], True)])
def test_only_last_ckpts_save_interval_on_resume_goes_unwarned(missing: list[str], shown: bool) -> None:
    """A resume with another trainer.max_steps changes last.ckpt's save interval, part of its callback's state key,
    and Lightning asked for the old callback, whose state (last.ckpt's path) nothing needs; the best-* and early
    stopping state is restored (test_resume). A missing callback of any other kind is still said."""
    import warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet.silence_import_noise()
        warnings.warn(_MISSING.format(list(missing)), stacklevel=1)
    assert len(seen) == shown


@pytest.mark.parametrize(("environ", "label"), [({"RANK": "3"}, "rank 3"),
                                                ({"LOCAL_RANK": "1", "NODE_RANK": "0"}, "local rank 1"),
                                                ({"LOCAL_RANK": "1", "NODE_RANK": "2"}, "local rank 1 of node 2")])
def test_ranks_above_zero_print_errors_and_their_own_lines_only(monkeypatch: pytest.MonkeyPatch,
                                                                environ: dict, label: str) -> None:
    """Every rank printed rank 0's model, data and gradient-check lines again."""
    console, logfile = io.StringIO(), io.StringIO()
    monkeypatch.setattr(logging.getLogger(), "handlers", [logging.StreamHandler(console), logging.StreamHandler(logfile)])
    log = logging.getLogger("bamba_ft.test_ranks")
    monkeypatch.setattr(log, "level", logging.INFO)
    quiet.ranks_above_zero(environ)
    quiet.ranks_above_zero(environ)  # idempotent: one filter per handler
    log.info("gradient check: all 20 trainable tensors receive gradient")
    log.warning("data warning: the same on every rank")
    log.info("this rank holds 10 of 20 parameters", extra=quiet.EVERY_RANK)
    log.error("out of memory")
    expected = f"[{label}] this rank holds 10 of 20 parameters\n[{label}] out of memory\n"
    assert console.getvalue() == expected and logfile.getvalue() == expected


def test_lightnings_logging_interval_warning_is_dropped() -> None:
    """Logs are written every trainer.log_every_n_steps global steps, whatever an epoch's length."""
    import warnings

    from lightning.pytorch.utilities.rank_zero import rank_zero_warn
    from lightning.pytorch.utilities.warnings import PossibleUserWarning

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet.silence_import_noise()
        rank_zero_warn("The number of training batches (1) is smaller than the logging interval "
                       "Trainer(log_every_n_steps=10). Set a lower value for log_every_n_steps if you want to see "
                       "logs for the training epoch.", category=PossibleUserWarning)
    assert seen == []


def test_lightnings_unresumable_dataloader_warning_is_dropped() -> None:
    """A mid-epoch resume continues the epoch's batch plan exactly (test_resume); Lightning's warning that it cannot
    resume the dataloader, printed on every such resume, said the results could be unreliable."""
    import warnings

    from lightning.pytorch.utilities.rank_zero import rank_zero_warn
    from lightning.pytorch.utilities.warnings import PossibleUserWarning

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet.silence_import_noise()
        rank_zero_warn("You're resuming from a checkpoint that ended before the epoch ended and your dataloader is"
                       " not resumable. This can cause unreliable results if further training is done.",
                       category=PossibleUserWarning)
    assert seen == []


def test_ctrl_c_before_training_exits_130_with_one_line(monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """Ctrl-C while the model loads or the data is prepared (before the graceful stop is installed) printed a
    KeyboardInterrupt traceback of Hydra's and importlib's frames."""
    import sys

    import hydra

    from bamba_ft import __main__ as cli

    def interrupted(*args: object, **kwargs: object):  # noqa: ANN202
        def task() -> None:
            raise KeyboardInterrupt
        return lambda fn: task

    monkeypatch.setattr(hydra, "main", interrupted)
    monkeypatch.setattr(sys, "argv", ["bamba_ft", "trainer.max_steps=10"])
    with pytest.raises(SystemExit) as stop:
        cli.main()
    assert stop.value.code == 130
    err = capsys.readouterr().err
    assert "interrupted (Ctrl-C)" in err and "Traceback" not in err
    monkeypatch.setattr(sys, "argv", ["bamba_ft", "trainer.max_steps=10", "debug=true"])
    with pytest.raises(KeyboardInterrupt):
        cli.main()


def test_an_error_on_a_rank_above_zero_names_the_rank(monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture) -> None:
    """Every rank meets the same data error and prints it: the copies from ranks above 0 say whose they are."""
    from omegaconf import OmegaConf

    import bamba_ft.__main__ as main
    from bamba_ft.errors import DataError

    def fail(cfg: object) -> None:
        raise DataError("data.source=x.jsonl, line 3: bad row.")

    monkeypatch.setattr(main, "run_config", fail)
    for env, who in (({}, "bamba_ft"), ({"LOCAL_RANK": "1"}, "bamba_ft [local rank 1]")):
        for var in ("RANK", "LOCAL_RANK", "NODE_RANK"):
            monkeypatch.delenv(var, raising=False)
        for var, value in env.items():
            monkeypatch.setenv(var, value)
        with pytest.raises(SystemExit) as stop:
            main.run_task(OmegaConf.create({}))
        assert stop.value.code == 2
        assert f"\n{who}: DataError: data.source=x.jsonl, line 3: bad row." in capsys.readouterr().err
