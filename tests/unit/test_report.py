"""The run's results as files: the training curves read from its CSV logs."""

from __future__ import annotations

from pathlib import Path

from bamba_ft.jobs.report import plot_curves, read_metrics_csv

HEADER = "epoch,lr-AdamW,step,train/loss,val/loss\n"


def write_log(run: Path, version: int, rows: list[str]) -> None:
    path = run / "logs" / "csv" / f"version_{version}" / "metrics.csv"
    path.parent.mkdir(parents=True)
    path.write_text(HEADER + "".join(r + "\n" for r in rows))


def test_a_run_resumed_in_its_own_directory_has_curves_over_all_its_steps(tmp_path: Path) -> None:
    """Stopped at step 33 (version_9), resumed from a checkpoint at step 25 (version_10): the curves are the first
    process's up to the resumed steps and the second's from there, not the second's alone. The logs go by their
    number (version_10 after version_9), not by name or by the time they were written."""
    write_log(tmp_path, 10, [",0.001,29,,", "0,,29,2.4,", "0,,39,2.0,", "0,,39,,2.2"])
    write_log(tmp_path, 9, ["0,,9,4.0,", ",0.003,9,,", "0,,19,3.0,", "0,,19,,3.5", "0,,29,2.5,", "0,,32,,2.9"])
    (tmp_path / "logs" / "csv" / "version_11").mkdir()  # a process that stopped before it logged
    series = read_metrics_csv(tmp_path)
    assert series["train/loss"] == [(9, 4.0), (19, 3.0), (29, 2.4), (39, 2.0)]
    assert series["val/loss"] == [(19, 3.5), (39, 2.2)]
    assert series["lr-AdamW"] == [(9, 0.003), (29, 0.001)]
    assert plot_curves(tmp_path, tmp_path / "curves.png") and (tmp_path / "curves.png").stat().st_size > 0


def test_a_run_without_a_csv_log_has_no_curves(tmp_path: Path) -> None:
    assert read_metrics_csv(tmp_path) == {}
    assert not plot_curves(tmp_path, tmp_path / "curves.png") and not (tmp_path / "curves.png").exists()


def test_an_output_path_that_cannot_be_written_is_named_before_the_work(tmp_path: Path) -> None:
    from bamba_ft.jobs.report import output_path_problem

    (tmp_path / "afile").write_text("mine")
    (tmp_path / "adir").mkdir()
    assert output_path_problem(tmp_path / "new" / "deeper", "k=v", directory=True) is None
    assert output_path_problem(tmp_path / "new" / "out.jsonl", "k=v", directory=False) is None
    assert output_path_problem(tmp_path / "adir", "k=v", directory=True) is None
    assert output_path_problem(tmp_path / "afile", "k=v", directory=False) is None
    assert output_path_problem(tmp_path / "afile", "k=v", directory=True) == "k=v is a file.\nFix: name a directory."
    assert output_path_problem(tmp_path / "adir", "k=v", directory=False).startswith("k=v is a directory.\nFix: name a "
                                                                                     "file (in that directory: ")
    for directory in (True, False):
        problem = output_path_problem(tmp_path / "afile" / "sub" / "x", "k=v", directory=directory)
        assert problem.startswith(f"k=v: {tmp_path / 'afile'} is a file, so nothing can be written under it.")


def test_a_run_resumed_into_another_directory_has_curves_from_step_zero(tmp_path: Path) -> None:
    """A resume writes into a directory of its own, by default: its curves (curves.png of the run and of
    recipe=eval) began at the resumed step. They go on from the runs it continues, as its run_config.yaml's
    trainer.resume names them: `first` logged steps 0-39 and was resumed from its step-30 checkpoint by `second`,
    itself stopped and resumed by `third`; the steps a resume trains again are its own."""
    first, second, third = tmp_path / "first", tmp_path / "second", tmp_path / "third"
    write_log(first, 0, ["0,,9,4.0,", "0,,19,3.0,", "0,,19,,3.5", "0,,29,2.5,", "0,,39,2.3,"])
    write_log(second, 0, ["0,,29,2.4,", "0,,49,2.0,"])
    write_log(third, 0, ["0,,59,1.8,", "0,,59,,1.9"])
    (second / "run_config.yaml").write_text(f"trainer:\n  resume: {first / 'checkpoints' / 'last.ckpt'}\n")
    (third / "run_config.yaml").write_text(f"trainer:\n  resume: {second}\n")
    (first / "run_config.yaml").write_text("trainer:\n  resume: null\n")
    series = read_metrics_csv(third)
    assert series["train/loss"] == [(9, 4.0), (19, 3.0), (29, 2.4), (49, 2.0), (59, 1.8)]
    assert series["val/loss"] == [(19, 3.5), (59, 1.9)]
    assert read_metrics_csv(first)["train/loss"] == [(9, 4.0), (19, 3.0), (29, 2.5), (39, 2.3)]
