"""`python -m bamba_ft -m ...` with Hydra's sweep plugins: Optuna search, submitit and joblib launchers,
a failing job among good ones, and an interrupted sweep resumed."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.integration.conftest import ROOT, cli

# Tiny jobs: a few steps on 32 builtin examples, no generation, no loggers.
FAST = ["trainer=cpu", "logger=none", "eval.before_training=false", "eval.generate=false",
        "data.builtin_train_examples=32", "data.builtin_val_examples=8", "data.max_tokens_per_batch=512",
        "trainer.enable_progress_bar=false"]


def _results(sweep: Path) -> dict[int, dict]:
    return {int(d.name): json.loads((d / "sweep_job.json").read_text())
            for d in sweep.iterdir() if (d / "sweep_job.json").exists()}


@pytest.mark.slow
def test_optuna_search_ends_with_its_results_and_the_table(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    proc = cli(["-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=3", "hydra.sweeper.sampler.seed=0",
                "optim.lr=tag(log, interval(1e-4, 1e-2))", "trainer.max_steps=3", *FAST, f"hydra.sweep.dir={sweep}"],
               cwd=tmp_path, timeout=600)
    optuna = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    rows = list(csv.DictReader((sweep / "sweep.csv").open()))
    assert [r["status"] for r in rows] == ["ok", "ok", "ok"]
    best = [r for r in rows if r["best"] == "True"]
    assert len(best) == 1
    # the table's best job is Optuna's best trial: same value, same learning rate
    assert float(best[0]["objective"]) == pytest.approx(optuna["best_value"], rel=1e-12)
    assert f"optim.lr={optuna['best_params']['optim.lr']}" in best[0]["overrides"]
    assert all(1e-4 <= float(r["overrides"].split("optim.lr=")[1].split()[0]) <= 1e-2 for r in rows)
    assert (sweep / "sweep.png").stat().st_size > 0 and json.loads((sweep / "sweep.json").read_text())["best"]
    assert "objective val/loss (minimize)" in proc.stdout


@pytest.mark.slow
def test_submitit_local_runs_every_job_and_ends_with_the_table(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    proc = cli(["-m", "hydra/launcher=submitit_local", "trainer.max_steps=2", "optim.lr=1e-4,3e-4", *FAST,
                f"hydra.sweep.dir={sweep}"], cwd=tmp_path, timeout=600)
    results = _results(sweep)
    assert sorted((r["status"], r["overrides"][1]) for r in results.values()) == [
        ("ok", "optim.lr=0.0001"), ("ok", "optim.lr=0.0003")]
    assert all((sweep / str(j) / "metrics.json").exists() for j in results)
    assert (sweep / ".submitit").is_dir()  # the jobs did go through submitit
    # The table closes the output, one row per job, naming what differs between them.
    head = f"sweep {sweep}: 2 jobs (2 ok)"
    assert head in proc.stdout, proc.stdout[-2000:]
    table = proc.stdout.split(head)[-1]
    assert "optim.lr=0.0001" in table and "optim.lr=0.0003" in table and "exact match" in table


def test_joblib_pins_each_worker_to_its_own_gpu(tmp_path: Path) -> None:
    """Two parallel jobs on two (declared) GPUs; the jobs fail at validation, so no training is needed."""
    sweep = tmp_path / "sweep"
    proc = cli(["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "peft.r=-1,-2", "trainer=cpu",
                f"hydra.sweep.dir={sweep}"], cwd=tmp_path, check=False, env={"CUDA_VISIBLE_DEVICES": "4,7"})
    assert proc.returncode == 1 and "2 of 2 jobs failed (job 0, 1)" in proc.stderr, proc.stderr[-2000:]
    results = list(_results(sweep).values())
    assert len(results) == 2 and all(r["status"] == "failed" for r in results)
    assert {r["cuda_visible_devices"] for r in results} <= {"4", "7"}
    # one GPU per worker process: two workers never share one
    assert len({r["cuda_visible_devices"] for r in results}) == len({r["pid"] for r in results})


@pytest.mark.parametrize("args,env,message", [
    (["hydra/sweeper=optuna", "sweep.direction=maximize"], {},
     "hydra.sweeper.direction=Direction.minimize but sweep.direction=maximize"),
    (["hydra/launcher=joblib", "hydra.launcher.n_jobs=3"], {"CUDA_VISIBLE_DEVICES": "0,1"},
     "hydra.launcher.n_jobs=3 starts more parallel jobs than there are GPU slots (2"),
])
def test_sweep_settings_that_cannot_work_stop_before_any_job(args: list[str], env: dict[str, str], message: str,
                                                             tmp_path: Path) -> None:
    proc = cli(["-m", *args, "trainer=cpu", f"hydra.sweep.dir={tmp_path}/sweep"], cwd=tmp_path, check=False, env=env)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert not list((tmp_path / "sweep").glob("*/.hydra"))  # no job started


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_a_new_sweep_into_a_finished_sweeps_directory_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    """The reported bug: the same sweep run again without sweep.resume=true ran every job into a directory holding
    its training run (each failed), then rewrote sweep.csv, sweep.json and each sweep_job.json as failed, so a later
    resume trained every job again. It is refused as the sweep starts, whichever sweeper and launcher would run it,
    before Hydra writes anything there; a resume then reuses every job."""
    sweep = tmp_path / "sweep"
    args = ["-m", "optim.lr=1e-4,3e-4", "trainer.max_steps=2", *FAST, f"hydra.sweep.dir={sweep}"]
    cli(args, cwd=tmp_path)
    before, results = _tree(sweep), _results(sweep)
    for plugin in ([], ["hydra/launcher=submitit_local"], ["hydra/launcher=joblib", "hydra.launcher.n_jobs=1"],
                   ["hydra/sweeper=optuna"]):
        proc = cli([*args, *plugin], cwd=tmp_path, check=False)
        assert proc.returncode == 2, (plugin, proc.stdout[-2000:] + proc.stderr[-2000:])
        assert (f"hydra.sweep.dir={sweep} holds an earlier sweep's results (sweep.json, sweep.csv, 0/sweep_job.json, "
                "1/sweep_job.json)") in proc.stderr, proc.stderr[-2000:]
        assert "Fix: the same command plus sweep.resume=true" in proc.stderr and f"delete {sweep} first" in proc.stderr
        assert "already holds a training run" not in proc.stdout + proc.stderr  # no job started
        assert _tree(sweep) == before  # byte for byte: not even Hydra's multirun.yaml or a job's .hydra/ files

    done = cli([*args, "sweep.resume=true"], cwd=tmp_path)
    assert f"sweep {sweep}: 2 jobs (2 ok)" in done.stdout, done.stdout[-2000:]
    assert all(r["reused"] and r["pid"] == results[j]["pid"] for j, r in _results(sweep).items())  # nothing trained


def test_a_sweep_directory_under_a_file_is_refused_without_a_traceback(tmp_path: Path) -> None:
    """The sweeper's mkdir of hydra.sweep.dir failed with NotADirectoryError's traceback."""
    (tmp_path / "afile").write_text("mine")
    proc = cli(["-m", "optim.lr=1e-4,3e-4", *FAST, f"hydra.sweep.dir={tmp_path / 'afile' / 'sweep'}"], cwd=tmp_path,
               check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"hydra.sweep.dir={tmp_path / 'afile' / 'sweep'}: {tmp_path / 'afile'} is a file" in proc.stderr


@pytest.mark.slow
def test_a_sweep_stopped_by_ctrl_c_then_killed_resumes_reporting_its_failed_job(tmp_path: Path) -> None:
    """One sweep, interrupted both ways, each time continued by the same command plus sweep.resume=true: Ctrl-C
    stops it in job 0, which the first resume continues from its checkpoint before job 1 fails and the process is
    SIGKILLed while job 2 saves its adapter; the second resume reuses job 0, reports job 1 and runs job 2."""
    sweep = tmp_path / "sweep"
    args = ["-m", "trainer.max_steps=12", "peft.r=8,-1,16", *FAST, f"hydra.sweep.dir={sweep}"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=str(ROOT))
    out = tmp_path / "first.txt"
    with out.open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "bamba_ft", *args], cwd=tmp_path, env=env, stdout=log,
                                stderr=subprocess.STDOUT)
        deadline = time.time() + 180
        # "packing efficiency" is logged as the fit starts, with the Ctrl-C handler installed
        while "packing efficiency" not in out.read_text() and time.time() < deadline:
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=180) == 130, out.read_text()[-2000:]
    stopped = _results(sweep)
    assert list(stopped) == [0] and stopped[0]["status"] == "stopped"  # job 1 never started
    assert "the same command plus sweep.resume=true" in out.read_text()
    assert "trainer.resume=" not in out.read_text()  # a job's own resume hint would be wrong in a sweep

    # Job 0's adapter is the first this process saves, job 2's the second (job 1 fails at validation).
    killed = cli([*args, "sweep.resume=true"], cwd=tmp_path, check=False, env={"BAMBA_FT_FAULT": "adapter.before_rename@2"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert "job 0 continues from its checkpoint" in killed.stdout + killed.stderr
    assert "resuming from" in killed.stdout + killed.stderr
    first = _results(sweep)
    assert [first[0]["status"], first[1]["status"], 2 in first] == ["ok", "failed", False]
    assert first[0]["metrics"]["steps"] == 12
    assert "peft.r=-1 must be positive" in first[1]["error"] and first[1]["objective"] == float("inf")
    assert not (sweep / "sweep.csv").exists()

    done = cli([*args, "sweep.resume=true"], cwd=tmp_path, check=False, timeout=600)
    assert done.returncode == 1 and "1 of 3 jobs failed (job 1)" in done.stderr, done.stderr[-2000:]
    second = _results(sweep)
    assert second[0]["reused"] is True and second[0]["pid"] == first[0]["pid"]  # job 0 did not run again
    assert second[2]["status"] == "ok" and second[2]["pid"] != first[0]["pid"]  # job 2 ran in the new process
    assert second[2]["metrics"]["steps"] == 12
    assert "reusing its result" in done.stderr + done.stdout
    rows = list(csv.DictReader((sweep / "sweep.csv").open()))
    assert [(r["job"], r["status"]) for r in rows] == [("0", "ok (reused)"), ("1", "failed"), ("2", "ok")]
    assert "peft.r=-1 must be positive" in rows[1]["error"]
