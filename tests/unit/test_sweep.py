"""Sweeps without training: override checks, objectives, the end-of-sweep table and files, GPU slots, and resumed
sweeps through Hydra with a stand-in for training."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bamba_ft.config.overrides import check_overrides
from bamba_ft.errors import ConfigError
from bamba_ft.jobs.gpu_slots import claim_slot
from bamba_ft.jobs.sweep_job import (
    RESULT_NAME,
    earlier_sweep,
    job_identity,
    objective_problem,
    objective_value,
    penalty,
)
from bamba_ft.sweep import collect_rows, direction_warning, write_outputs


@pytest.mark.parametrize("token", [
    "hydra/launcher=basic", "hydra/launcher=submitit_slurm", "+hydra/sweeper=optuna", "hydra.sweeper.n_trials=3",
    "hydra.launcher.partition=gpu", "hydra.launcher.gpus_per_node=8", "hydra.launcher.timeout_min=600",
    "optim.lr=1e-4,3e-4", "optim.lr=tag(log, interval(1e-4, 1e-2))", "peft.r=choice(8, 16, 32)",
    "optim.warmup_steps=range(0, 50, 10)", "peft.r=int(tag(log, interval(8, 64)))", "sweep=lora_hpo",
    "sweep.objective=exact_match", "sweep.direction=maximize", "sweep.resume=true",
])
def test_sweep_overrides_pass_the_typed_checks(token: str) -> None:
    check_overrides(["-m", token])


@pytest.mark.parametrize("token", ["sweep=lora_hpo", "hydra/sweeper=optuna", "hydra/launcher=submitit_local",
                                   "sweep.resume=true"])
def test_a_sweep_setting_without_m_is_refused_naming_the_fix(token: str) -> None:
    """Without -m Hydra ignores them: `python -m bamba_ft sweep=lora_hpo` trained one job with the defaults."""
    with pytest.raises(ConfigError, match=f"(?s){re.escape(token)}: applies to a sweep.*Fix: add -m"):
        check_overrides([token])
    check_overrides(["-m", token])
    check_overrides(["sweep.resume=false", "~sweep"])


@pytest.mark.parametrize("token,message", [
    ("optim.lr=1e-4,abc", "abc is not a number"),
    ("peft.r=choice(8, sixteen)", "sixteen is not an integer"),
    ("optim.warmup_steps=interval(0.5, 10)", "0.5 is not an integer"),
    ("peft.r=tag(log, interval(8, 64))", r"(?s)8.0 is not an integer .*write int\(interval\(a, b\)\)"),
    ("sweep.objectve=val/loss", "Did you mean 'objective'?"),
])
def test_bad_sweep_overrides_fail_naming_the_key(token: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        check_overrides(["-m", token])


METRICS = {"after": {"val_loss": 2.5, "exact_match": 0.25}, "train": {"tokens_per_sec": 900.0, "steps": 3},
           "data": {"train": {"examples": 32}}}


@pytest.mark.parametrize("key,value", [
    ("val/loss", 2.5), ("exact_match", 0.25), ("tokens_per_sec", 900.0), ("train.steps", 3.0),
    ("data.train.examples", 32.0),
])
def test_objective_is_read_from_metrics(key: str, value: float) -> None:
    assert objective_value(METRICS, key) == value


def test_an_eval_jobs_objective_is_read_from_its_metrics() -> None:
    """`-m recipe=eval eval.checkpoint=A,B` compares runs: every job failed, after its evaluation, for want of an
    `after` block."""
    evaluated = {"source": "run A", "metrics": {"val_loss": 1.5, "val_ppl": 4.48, "exact_match": 0.5, "lm_eval": {}}}
    assert (objective_value(evaluated, "val/loss"), objective_value(evaluated, "exact_match")) == (1.5, 0.5)
    with pytest.raises(ConfigError, match="Valid: val_loss, val_ppl, exact_match"):
        objective_value(evaluated, "val/acc")


def test_unknown_objective_lists_the_valid_keys() -> None:
    with pytest.raises(ConfigError, match="sweep.objective=val/acc: .*Valid: val_loss, exact_match, tokens_per_sec"):
        objective_value(METRICS, "val/acc")


@pytest.mark.parametrize("objective,direction,wanted", [
    ("val/loss", "maximize", "minimize"), ("train.final_train_loss", "maximize", "minimize"),
    ("exact_match", "minimize", "maximize"), ("tokens_per_sec", "minimize", "maximize"),
    ("val/loss", "minimize", None), ("exact_match", "maximize", None), ("train.steps", "maximize", None),
])
def test_a_direction_against_the_objective_is_warned_of(objective: str, direction: str, wanted: str | None) -> None:
    """`sweep.objective=exact_match` without sweep.direction=maximize named the worst job best, silently."""
    warning = direction_warning(objective, direction)
    assert (warning is None) == (wanted is None)
    assert wanted is None or f"Fix: sweep.direction={wanted}" in warning


def test_penalty_is_the_worst_value_optuna_accepts() -> None:
    assert penalty("minimize") == math.inf and penalty("maximize") == -math.inf


def test_job_identity_ignores_order_and_resume() -> None:
    assert job_identity(["b=2", "sweep.resume=true", "a=1"]) == job_identity(["a=1", "b=2"]) == ("a=1", "b=2")


def _job(sweep: Path, num: int, status: str | None, objective: float | None, lr: str, **extra: object) -> None:
    d = sweep / str(num)
    (d / ".hydra").mkdir(parents=True)
    overrides = [f"optim.lr={lr}", "trainer.max_steps=5"]
    (d / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if status is not None:
        record = {"overrides": overrides, "status": status, "objective": objective, "run_dir": str(d),
                  "error": None if status == "ok" else "ConfigError: peft.r=-1 must be positive.",
                  "metrics": {"val_loss": objective, "steps": 5} if status == "ok" else None, **extra}
        (d / RESULT_NAME).write_text(json.dumps(record))


def test_an_earlier_sweep_is_known_by_its_table_records_runs_and_hydra_files(tmp_path: Path) -> None:
    """What a sweep without sweep.resume refuses to run into (tests/integration/test_sweeps.py runs it); a
    directory with nothing of a sweep's is no earlier sweep."""
    assert earlier_sweep(tmp_path / "missing") == [] and earlier_sweep(tmp_path) == []
    (tmp_path / "multirun.yaml").write_text("hydra: {}\n")  # Hydra's, written as a sweep starts: no result
    (tmp_path / ".submitit").mkdir()
    (tmp_path / "notes").mkdir()
    assert earlier_sweep(tmp_path) == []
    _job(tmp_path, 1, "ok", 2.0, "1e-4")
    _job(tmp_path, 0, None, None, "3e-4")  # killed as it started: only Hydra's files
    (tmp_path / "2" / "checkpoints").mkdir(parents=True)  # killed, with hydra.output_subdir=null
    (tmp_path / "2" / "checkpoints" / "last.ckpt").write_bytes(b"")
    (tmp_path / "sweep.csv").write_text("best,job\n")
    assert earlier_sweep(tmp_path) == ["sweep.csv", "0/.hydra/", f"1/{RESULT_NAME}", "2/checkpoints/last.ckpt"]


@pytest.mark.parametrize("direction,best_job", [("minimize", 1), ("maximize", 0)])
def test_summary_lists_every_job_and_marks_the_best(tmp_path: Path, direction: str, best_job: int) -> None:
    _job(tmp_path, 0, "ok", 3.0, "1e-4")
    _job(tmp_path, 1, "ok", 2.0, "3e-4", reused=True)
    _job(tmp_path, 2, "failed", math.inf, "-1")
    _job(tmp_path, 3, None, None, "5e-4")  # killed before it wrote its result
    (tmp_path / ".submitit").mkdir()  # launcher files are not jobs
    rows = collect_rows(tmp_path)
    text = write_outputs(tmp_path, rows, "val/loss", direction, search=False)

    table = list(csv.DictReader((tmp_path / "sweep.csv").open()))
    assert [(r["job"], r["status"], r["best"]) for r in table] == [
        ("0", "ok", str(best_job == 0)), ("1", "ok (reused)", str(best_job == 1)), ("2", "failed", "False"),
        ("3", "failed", "False")]
    assert "must be positive" in table[2]["error"] and "ended before finishing" in table[3]["error"]
    summary = json.loads((tmp_path / "sweep.json").read_text())
    assert summary["best"]["job"] == best_job and len(summary["jobs"]) == 4
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"best: job {best_job}" in text and "4 jobs (2 ok, 2 failed)" in text
    star = [line for line in text.splitlines() if line.startswith("*")]
    assert len(star) == 1 and f"optim.lr={'3e-4' if best_job == 1 else '1e-4'}" in star[0]


def test_a_resumed_sweep_whose_rerun_job_failed_still_writes_its_table(tmp_path: Path) -> None:
    """A job run by a resume carries sweep.resume=True, the reused one does not: sweep.resume was drawn as a swept
    parameter with no finite point (the rerun job failed), and plotting it raised, so the sweep ended with no
    table and exit status 0."""
    _job(tmp_path, 0, "ok", 2.0, "1e-4", reused=True)
    _job(tmp_path, 1, "failed", math.inf, "3e-4")
    record = json.loads((tmp_path / "1" / RESULT_NAME).read_text())
    record["overrides"].append("sweep.resume=True")
    (tmp_path / "1" / RESULT_NAME).write_text(json.dumps(record))
    rows = collect_rows(tmp_path)
    assert all("sweep.resume" not in r["params"] for r in rows)
    text = write_outputs(tmp_path, rows, "val/loss", "minimize", search=False)
    assert "2 jobs (1 ok, 1 failed)" in text and "sweep.png" in text
    # nor a setting in the table: the two rows differ in their learning rate only
    assert [r["overrides"] for r in csv.DictReader((tmp_path / "sweep.csv").open())] == [
        "optim.lr=1e-4 trainer.max_steps=5", "optim.lr=3e-4 trainer.max_steps=5"]
    assert "every job: trainer.max_steps=5" in text


def test_a_job_run_again_is_one_row(tmp_path: Path) -> None:
    _job(tmp_path, 0, "failed", math.inf, "1e-4")
    _job(tmp_path, 1, "ok", 2.0, "1e-4")
    assert [(r["job"], r["status"]) for r in collect_rows(tmp_path)] == [(1, "ok")]


def test_two_jobs_with_the_same_overrides_are_two_rows_and_the_better_is_best(tmp_path: Path) -> None:
    """An Optuna search over choices asks for the same values again: its 4 trials were a table of 2 jobs, each the
    newer of a pair, and job 2's 0.81 was called the best where job 0 had reached 0.79 (Optuna's best)."""
    _job(tmp_path, 0, "ok", 0.79, "2e-3", finished=1.0)
    _job(tmp_path, 1, "ok", 0.9, "1e-3", finished=2.0)
    _job(tmp_path, 2, "ok", 0.81, "2e-3", finished=3.0)
    _job(tmp_path, 3, "failed", math.inf, "1e-3", finished=0.5)  # then run again by a resume (job 1): one row
    _job(tmp_path, 4, "failed", math.inf, "2e-3", finished=5.0)  # a third try that crashed is a row of its own
    rows = collect_rows(tmp_path)
    assert [(r["job"], r["objective"]) for r in rows] == [(0, 0.79), (1, 0.9), (2, 0.81), (4, math.inf)]
    write_outputs(tmp_path, rows, "val/loss", "minimize", search=True)
    assert json.loads((tmp_path / "sweep.json").read_text())["best"]["job"] == 0


def test_gpu_slots_are_claimed_once_each(tmp_path: Path) -> None:
    first = claim_slot(tmp_path, ["0", "1", "2", "3"], per_job=2)
    second = claim_slot(tmp_path, ["0", "1", "2", "3"], per_job=2)
    assert (first[0], first[2], second[0], second[2]) == (0, "0,1", 1, "2,3")
    with pytest.raises(ConfigError, match="hydra.launcher.n_jobs=2"):
        claim_slot(tmp_path, ["0", "1", "2", "3"], per_job=2)
    os.close(first[1])  # a worker that ends frees its slot
    third = claim_slot(tmp_path, ["0", "1", "2", "3"], per_job=2)
    assert third[2] == "0,1"
    os.close(second[1])
    os.close(third[1])


# A sweep through Hydra with the project's config and callbacks, training replaced by a stand-in: a job's "model"
# is its learning rate, written into its output directory, and its val/loss falls as the rate rises.
_STAND_IN = """
from pathlib import Path
import bamba_ft.__main__ as cli

def train(cfg):
    lr = float(cfg.optim.lr)
    if lr >= 10:
        from bamba_ft.errors import ConfigError
        raise ConfigError(f"optim.lr={lr} is too large", "the composed config")
    if lr >= 1:
        raise RuntimeError("stand-in crash")
    (Path(cfg.output_dir) / "model.txt").write_text(str(lr))
    if lr == 0.25:  # diverged in training (a non-finite weight) with a finite val loss and exact match
        return {"after": {"val_loss": 0.5, "exact_match": 1.0}, "train": {"steps": 2}, "diverged": "weights"}
    return {"after": {"val_loss": float("nan") if lr == 0.5 else 1.0 - 100 * lr, "exact_match": lr},
            "train": {"steps": 2}}

cli.run_config = train
cli.main()
"""


def _sweep(sweep: Path, *args: str, status: int = 0) -> str:
    """`python -m bamba_ft -m ARGS hydra.sweep.dir=SWEEP` with the stand-in for training (lr >= 10 is a
    configuration error, lr >= 1 crashes, lr 0.5
    diverges with a non-finite val loss, lr 0.25 with finite metrics); its output, after checking its exit status."""
    proc = subprocess.run([sys.executable, "-c", _STAND_IN, "-m", *args, f"hydra.sweep.dir={sweep}"],
                          cwd=sweep.parent, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert proc.returncode == status, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


@pytest.mark.parametrize("lrs,status,message", [
    ("1e-4,2,3e-3", 1, "1 of 3 jobs failed (job 1): their errors are in sweep.csv"),
    ("0.5", 1, "no job of 1 finished with a finite objective (every one diverged).\nFix: lower optim.lr"),
    ("1e-4,0.5", 0, "1 ok, 1 diverged"),
])
def test_a_sweep_with_a_failed_job_or_no_result_exits_1_after_its_table(tmp_path: Path, lrs: str, status: int,
                                                                        message: str) -> None:
    """A crashed job is a failure of the sweep; a diverged one is a result of its settings, unless every job
    diverged. The table and its files come first either way."""
    sweep = tmp_path / "sweep"
    out = _sweep(sweep, f"optim.lr={lrs}", status=status)
    assert len(list(csv.DictReader((sweep / "sweep.csv").open()))) == len(lrs.split(","))
    assert message in out and "written:" in out
    resume_hint = f"the same command plus sweep.resume=true hydra.sweep.dir={sweep}" in out
    assert resume_hint == ("failed" in message)  # a resume runs failed jobs again, not diverged ones


@pytest.mark.parametrize("objective,direction", [("val/loss", "minimize"), ("exact_match", "maximize")])
def test_a_job_whose_run_diverged_is_no_result_whatever_its_objective_reads(tmp_path: Path, objective: str,
                                                                            direction: str) -> None:
    """A run that reports divergence (exit 3 alone) had a finite val loss and exact match that beat every other
    job's, and the sweep called it ok and its best."""
    sweep = tmp_path / "sweep"
    out = _sweep(sweep, "optim.lr=0.25,1e-3", f"sweep.objective={objective}", f"sweep.direction={direction}")
    rows = {r["job"]: r for r in csv.DictReader((sweep / "sweep.csv").open())}
    assert (rows["0"]["status"], rows["0"]["best"], rows["1"]["status"], rows["1"]["best"]) == (
        "diverged", "False", "ok", "True")
    assert float(rows["0"]["objective"]) == penalty(direction) and "diverged: weights" in rows["0"]["error"]
    assert json.loads((sweep / "sweep.json").read_text())["best"]["run_dir"] == str(sweep / "1")
    assert "1 ok, 1 diverged" in out


def test_a_resume_reuses_a_diverged_job_as_the_failed_jobs_hint_says(tmp_path: Path) -> None:
    """A diverged job is a result of its settings: the resume that the failed job's hint offers ('finished jobs are
    reused') trained it again, to the same divergence."""
    sweep = tmp_path / "sweep"
    first = _sweep(sweep, "optim.lr=1e-3,0.5,2", status=1)
    assert "(finished jobs are reused)" in first
    out = _sweep(sweep, "optim.lr=1e-3,0.5,2", "sweep.resume=true", status=1)
    assert out.count("reusing its result") == 2 and "job 1 (optim.lr=0.5 sweep.resume=True) finished before" in out
    assert [(r["job"], r["status"], r["best"]) for r in csv.DictReader((sweep / "sweep.csv").open())] == [
        ("0", "ok (reused)", "True"), ("1", "diverged (reused)", "False"), ("2", "failed", "False")]


def test_a_job_without_its_objective_names_the_key_in_the_table(tmp_path: Path) -> None:
    """The table's error column showed '1 problem in the composed config:' (the ConfigError's first line), neither
    the key nor the valid ones, and the run's metrics were left out. (val/ppl is a name a run may log; this one
    does not, as a run without validation data logs no val/loss.)"""
    sweep = tmp_path / "sweep"
    out = _sweep(sweep, "optim.lr=1e-3", "sweep.objective=val/ppl", status=1)
    row = next(csv.DictReader((sweep / "sweep.csv").open()))
    assert row["status"] == "failed" and row["error"].startswith("sweep.objective=val/ppl: not a number")
    assert "Valid: val_loss, exact_match, steps" in row["error"] and float(row["val_loss"]) == pytest.approx(0.9)
    assert "composed config" not in out and "sweep.objective=val/ppl: not a number in this run's metrics.json." in out


def test_a_sweep_subdir_shared_by_every_job_is_refused_before_any_job(tmp_path: Path) -> None:
    """hydra.sweep.subdir=run put both jobs in one directory: the second failed on the first's run and its record
    replaced the first's, so the table showed one failed job and lost the finished one."""
    sweep = tmp_path / "sweep"
    out = _sweep(sweep, "optim.lr=1e-3,2e-3", "hydra.sweep.subdir=run", status=2)
    assert "hydra.sweep.subdir=run names one directory for every job" in out and "Traceback" not in out
    assert not (sweep / "run").exists()


def test_a_search_that_asks_for_the_same_values_twice_keeps_both_jobs_through_a_resume(tmp_path: Path) -> None:
    """Each of an Optuna search's trials is a row, and a resume reuses each job's own result: it wrote the newer
    run's record over the older one's, whose result then left the table."""
    sweep = tmp_path / "sweep"
    search = ["hydra/sweeper=optuna", "hydra.sweeper.n_trials=4", "hydra.sweeper.sampler.seed=0",
              "optim.lr=choice(0.001, 0.002)"]
    out = _sweep(sweep, *search)
    records = {d: json.loads((sweep / d / RESULT_NAME).read_text()) for d in "0123"}
    assert "4 jobs (4 ok)" in out and len({json.dumps(r["overrides"]) for r in records.values()}) == 2
    again = _sweep(sweep, *search, "sweep.resume=true")
    assert again.count("reusing its result") == 4 and "4 jobs (4 ok)" in again
    assert all(json.loads((sweep / d / RESULT_NAME).read_text())["run_dir"] == str(sweep / d) for d in "0123")


def _job_files(sweep: Path) -> dict[str, tuple[str, ...]]:
    """Per job directory: its model, its Hydra files, and its record without the `reused` mark."""
    return {d.name: ((d / "model.txt").read_text(), *((d / ".hydra" / f).read_text() for f in ("overrides.yaml",
                     "config.yaml", "hydra.yaml")),
                     json.dumps({k: v for k, v in json.loads((d / RESULT_NAME).read_text()).items() if k != "reused"}))
            for d in sweep.iterdir() if (d / "model.txt").exists()}


def _logs(sweep: Path) -> dict[str, str]:
    return {d.name: (d / "__main__.log").read_text() for d in sweep.iterdir() if (d / "model.txt").exists()}


def _rows(sweep: Path) -> list[tuple[str, str, str, str, str]]:
    return [(r["job"], r["status"], r["overrides"].split()[0], r["run_dir"], r["best"])
            for r in csv.DictReader((sweep / "sweep.csv").open())]


def test_a_resume_listing_the_values_in_another_order_reuses_both_and_keeps_them(tmp_path: Path) -> None:
    """The reported bug: resumed with its values swapped, a sweep wrote job 0's reused record over dir 0's, then
    ran lr=1e-4 again into dir 1, over lr=3e-3's model, which the summary still called the best."""
    sweep = tmp_path / "sweep"
    _sweep(sweep, "optim.lr=1e-4,3e-3")
    before, logs = _job_files(sweep), _logs(sweep)
    out = _sweep(sweep, "optim.lr=3e-3,1e-4", "sweep.resume=true")

    assert _job_files(sweep) == before and sorted(before) == ["0", "1"]  # nothing ran, nothing was overwritten
    # a reused job's log (and only its own) says so
    assert all(log.startswith(logs[d]) and f"finished before in {sweep / d}" in log for d, log in _logs(sweep).items())
    assert out.count("reusing its result") == 2
    assert _rows(sweep) == [("0", "ok (reused)", "optim.lr=0.0001", str(sweep / "0"), "False"),
                            ("1", "ok (reused)", "optim.lr=0.003", str(sweep / "1"), "True")]
    best = json.loads((sweep / "sweep.json").read_text())["best"]
    assert best["run_dir"] == str(sweep / "1") and (sweep / "1" / "model.txt").read_text() == "0.003"
    assert "best: job 1, val/loss=0.7: optim.lr=0.003" in out


def test_a_job_whose_numbered_directory_holds_another_job_runs_beside_it(tmp_path: Path) -> None:
    """A value added at the front of a grid: job 0 (the new value) finds dir 0 holding lr=1e-4's results and runs
    in dir 0.1; job 2 (lr=3e-3, reused from dir 1) gets a new dir 2 that only points at dir 1. Resumed once more,
    every job is found where it ran."""
    sweep = tmp_path / "sweep"
    _sweep(sweep, "optim.lr=1e-4,3e-3")
    before, logs = _job_files(sweep), _logs(sweep)
    out = _sweep(sweep, "optim.lr=1e-3,1e-4,3e-3", "sweep.resume=true")

    after = _job_files(sweep)
    assert {k: after[k] for k in before} == before and sorted(after) == ["0", "0.1", "1"]
    log0 = _logs(sweep)["0"]  # job 1 (lr=1e-4) reused dir 0; job 0 (lr=1e-3) logged beside it
    assert log0.startswith(logs["0"]) and "optim.lr=0.001" not in log0 and "optim.lr=0.001" in _logs(sweep)["0.1"]
    assert (f"job 0 (optim.lr=0.001 sweep.resume=True) runs in {sweep / '0.1'}, not in {sweep / '0'}: that "
            "directory holds the job optim.lr=0.0001, which stays as it is") in out
    moved = sweep / "0.1"
    assert (moved / "model.txt").read_text() == "0.001" and "optim.lr=0.001" in (moved / ".hydra/overrides.yaml").read_text()
    assert json.loads((moved / RESULT_NAME).read_text())["run_dir"] == str(moved)
    assert json.loads((sweep / "2" / RESULT_NAME).read_text())["run_dir"] == str(sweep / "1")  # nothing ran in 2
    expected = [("0", "ok (reused)", "optim.lr=0.0001", str(sweep / "0"), "False"),
                ("1", "ok (reused)", "optim.lr=0.003", str(sweep / "1"), "True"),
                ("0.1", "ok", "optim.lr=0.001", str(moved), "False")]
    assert _rows(sweep) == expected

    again = _sweep(sweep, "optim.lr=1e-3,1e-4,3e-3", "sweep.resume=true")
    assert again.count("reusing its result") == 3 and not (sweep / "0.2").exists()
    assert _rows(sweep) == [(*row[:1], "ok (reused)", *row[2:]) for row in expected]


def test_a_killed_job_keeps_its_directory_when_a_resume_reorders_the_sweep(tmp_path: Path) -> None:
    """A job killed before writing its record is known by its .hydra/overrides.yaml, which Hydra rewrites for the
    job given its number next time: the resume saves them first, keeps the next job out and puts them back."""
    sweep = tmp_path / "sweep"
    _sweep(sweep, "optim.lr=1e-4,3e-3")
    (sweep / "1" / RESULT_NAME).unlink()  # lr=3e-3 was killed
    hydra_files = (sweep / "1" / ".hydra" / "overrides.yaml").read_text()
    _sweep(sweep, "optim.lr=3e-3,1e-4", "sweep.resume=true")

    assert (sweep / "1" / ".hydra" / "overrides.yaml").read_text() == hydra_files == "- optim.lr=0.003\n"
    assert not (sweep / "1" / RESULT_NAME).exists() and not (sweep / ".before_resume").exists()
    assert (sweep / "0.1" / "model.txt").read_text() == "0.003"  # ran beside dir 0, which holds lr=1e-4
    assert _rows(sweep) == [("0", "ok (reused)", "optim.lr=0.0001", str(sweep / "0"), "False"),
                            ("0.1", "ok", "optim.lr=0.003", str(sweep / "0.1"), "True")]


def test_a_resumed_job_continues_a_killed_run_and_starts_a_failed_one_over(tmp_path: Path) -> None:
    """A job's own directory holding what its earlier run left (which a new training run there refuses): killed
    before recording, the job continues from that run's checkpoint; after a failure it starts over, and the
    failed run's outputs go."""
    import torch
    from omegaconf import OmegaConf

    from bamba_ft.jobs.sweep_job import _continue_or_start_over

    job = tmp_path / "2"
    (job / "checkpoints").mkdir(parents=True)
    torch.save({"global_step": 12}, job / "checkpoints" / "last.ckpt")
    cfg = OmegaConf.create({"trainer": {"resume": None}})
    _continue_or_start_over(cfg, job, 2, killed=True)
    assert cfg.trainer.resume == str(job / "checkpoints" / "last.ckpt") and (job / "checkpoints" / "last.ckpt").exists()

    (job / "metrics.json").write_text("{}")
    cfg = OmegaConf.create({"trainer": {"resume": None}})
    _continue_or_start_over(cfg, job, 2, killed=False)
    assert cfg.trainer.resume is None and not (job / "metrics.json").exists()
    assert not list((job / "checkpoints").iterdir())

    (job / "checkpoints" / "last.ckpt").write_bytes(b"")  # killed, but its checkpoint is broken: start over
    _continue_or_start_over(cfg, job, 2, killed=True)
    assert cfg.trainer.resume is None and not list((job / "checkpoints").iterdir())


@pytest.mark.parametrize("key,task,hint", [
    ("val/los", "train", "Did you mean val_loss?"), ("exact_mach", "eval", "Did you mean exact_match?"),
    ("train/loss", "train", "Did you mean final_train_loss?"), ("val/acc", "train", ""),
    ("train.tokens_per_sec0", "train", "Did you mean train.tokens_per_sec?"), ("aftr.val_loss", "train", ""),
])
def test_an_objective_no_job_can_log_is_known_before_any_job(key: str, task: str, hint: str) -> None:
    """A misspelt sweep.objective was found only after every job of the sweep had trained, each failing for want
    of it."""
    problem = objective_problem(key, task)
    assert problem is not None and problem.startswith(f"sweep.objective={key}: ") and hint in problem
    assert "val_loss (val/loss), val_ppl, val_tokens, exact_match" in problem and "tokens_per_sec" in problem


@pytest.mark.parametrize("key,task", [
    ("val/loss", "train"), ("exact_match", "eval"), ("train.tokens_per_sec", "train"), ("tokens_per_sec", "train"),
    ("data.train.examples", "train"), ("after.val_loss", "train"), ("metrics.lm_eval.arc_easy.acc", "eval"),
    ("packing_efficiency", "train"), ("anything_at_all", "bench"),  # another task's metrics are not known here
])
def test_an_objective_a_job_may_log_is_not_refused(key: str, task: str) -> None:
    assert objective_problem(key, task) is None


def test_a_misspelt_objective_is_refused_before_any_job_trains(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    out = _sweep(sweep, "optim.lr=1e-3,2e-3", "sweep.objective=val/los", status=2)
    assert "sweep.objective=val/los: " in out and "Did you mean val_loss?" in out and "Traceback" not in out
    assert not any((sweep / d / "model.txt").exists() for d in "01")


@pytest.mark.parametrize("lrs,who", [("10,20", "Every job"), ("10,1e-3", "The failed job")])
def test_jobs_failed_on_a_configuration_error_get_a_fix_not_a_resume(tmp_path: Path, lrs: str, who: str) -> None:
    """Every job failed on its config, and the hint offered sweep.resume, which runs them again with the same
    settings, to the same error."""
    sweep = tmp_path / "sweep"
    out = _sweep(sweep, f"optim.lr={lrs}", status=1)
    assert "sweep.resume=true hydra.sweep.dir" not in out and "failed on a configuration error" in out
    assert "ConfigError: optim.lr=10.0 is too large" in out.split("failed on a configuration error")[1]
    assert f"{who} failed on a configuration error" in out and "Fix: correct the settings the errors name" in out


@pytest.mark.parametrize("launcher,swept,refused", [
    ("hydra._internal.core_plugins.basic_launcher.BasicLauncher", [], True),
    ("hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher", ["optim.lr=1e-4,3e-4"], True),
    ("hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher", [], True),
    ("hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher", [], False),  # jobs on Slurm's nodes
    ("hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher", ["trainer=gpu,cpu"], False),
    ("hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher", ["trainer.accelerator=gpu,cpu"], False),
])
def test_a_sweep_of_gpu_jobs_on_a_machine_without_one_is_known_before_any_job(
        monkeypatch: pytest.MonkeyPatch, launcher: str, swept: list[str], refused: bool) -> None:
    from omegaconf import OmegaConf

    from bamba_ft.jobs.gpu_slots import no_gpu_problem

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no GPU, on any machine
    config = OmegaConf.create({"trainer": {"accelerator": "gpu", "strategy": "auto"},
                               "hydra": {"launcher": {"_target_": launcher}, "overrides": {"task": swept}}})
    problem = no_gpu_problem(config)
    assert (problem is not None) == refused
    if refused:
        assert "trainer.accelerator=gpu but no CUDA device is visible" in problem and "Fix: trainer=cpu" in problem
    config.task = "export"  # reads and writes files on the CPU whatever trainer.accelerator says
    assert no_gpu_problem(config) is None
    config.task, config.trainer.accelerator = "train", "cpu"
    assert no_gpu_problem(config) is None


def test_a_gpu_sweep_without_a_gpu_is_refused_before_any_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """hydra/launcher=joblib trainer=gpu on a machine without CUDA: every job failed on it in turn, and the sweep
    said so only after the last, where a single run with trainer=gpu is refused at once."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    sweep = tmp_path / "sweep"
    out = _sweep(sweep, "hydra/launcher=joblib", "trainer=gpu", "optim.lr=1e-3,2e-3", status=2)
    assert "ConfigError: 1 problem in trainer.accelerator:" in out and "Fix: trainer=cpu" in out
    assert "Traceback" not in out and not sweep.exists()


@pytest.mark.parametrize("study_best,noted", [(0.7, True), (0.8, False)])
def test_a_kept_study_with_a_better_trial_elsewhere_is_noted_under_the_table(
        tmp_path: Path, capsys: pytest.CaptureFixture, study_best: float, noted: bool) -> None:
    """hydra.sweeper.storage keeps an Optuna study across sweeps: a second sweep into another directory marked its
    own best job and said nothing of the better trial an earlier sweep had given the study, which Optuna's
    optimization_results.yaml beside the table named."""
    from omegaconf import OmegaConf

    from bamba_ft.sweep import SweepSummary

    _job(tmp_path, 0, "ok", 0.8, "2e-3")
    _job(tmp_path, 1, "ok", 0.95, "5e-4")
    (tmp_path / "optimization_results.yaml").write_text(
        f"name: optuna\nbest_params:\n  optim.lr: 0.004\nbest_value: {study_best}\n")
    config = OmegaConf.create({
        "sweep": {"objective": "val/loss", "direction": "minimize"},
        "hydra": {"sweep": {"dir": str(tmp_path)}, "sweeper": {
            "_target_": "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper",
            "storage": "sqlite:///study.db"}}})
    SweepSummary().on_multirun_end(config)
    out, err = capsys.readouterr()
    assert "best: job 0, val/loss=0.8" in out
    note = ("the Optuna study kept in hydra.sweeper.storage=sqlite:///study.db has a better trial from an earlier "
            "sweep than this sweep's best, job 0 (0.8): val/loss=0.7 with optim.lr=0.004.")
    assert (note in err) == noted and ("better trial" in err) == noted
    assert json.loads((tmp_path / "sweep.json").read_text())["best"]["job"] == 0  # this directory's, as README says
