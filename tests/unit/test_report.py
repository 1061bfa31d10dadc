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
