"""Sweeps without training: override checks, objectives, the end-of-sweep table and files, GPU slots."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import pytest

from bamba_ft.config.overrides import check_overrides
from bamba_ft.errors import ConfigError
from bamba_ft.jobs.gpu_slots import claim_slot
from bamba_ft.jobs.sweep_job import RESULT_NAME, job_identity, objective_value, penalty
from bamba_ft.sweep import collect_rows, write_outputs


@pytest.mark.parametrize("token", [
    "hydra/launcher=basic", "hydra/launcher=submitit_slurm", "+hydra/sweeper=optuna", "hydra.sweeper.n_trials=3",
    "hydra.launcher.partition=gpu", "hydra.launcher.gpus_per_node=8", "hydra.launcher.timeout_min=600",
    "optim.lr=1e-4,3e-4", "optim.lr=tag(log, interval(1e-4, 1e-2))", "peft.r=choice(8, 16, 32)",
    "optim.warmup_steps=range(0, 50, 10)", "peft.r=int(tag(log, interval(8, 64)))", "sweep=lora_hpo",
    "sweep.objective=exact_match", "sweep.direction=maximize", "sweep.resume=true",
])
def test_sweep_overrides_pass_the_typed_checks(token: str) -> None:
    check_overrides([token])


@pytest.mark.parametrize("token,message", [
    ("optim.lr=1e-4,abc", "abc is not a number"),
    ("peft.r=choice(8, sixteen)", "sixteen is not an integer"),
    ("optim.warmup_steps=interval(0.5, 10)", "0.5 is not an integer"),
    ("peft.r=tag(log, interval(8, 64))", r"(?s)8.0 is not an integer .*write int\(interval\(a, b\)\)"),
    ("sweep.objectve=val/loss", "Did you mean 'objective'?"),
])
def test_bad_sweep_overrides_fail_naming_the_key(token: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        check_overrides([token])


METRICS = {"after": {"val_loss": 2.5, "exact_match": 0.25}, "train": {"tokens_per_sec": 900.0, "steps": 3},
           "data": {"train": {"examples": 32}}}


@pytest.mark.parametrize("key,value", [
    ("val/loss", 2.5), ("exact_match", 0.25), ("tokens_per_sec", 900.0), ("train.steps", 3.0),
    ("data.train.examples", 32.0),
])
def test_objective_is_read_from_metrics(key: str, value: float) -> None:
    assert objective_value(METRICS, key) == value


def test_unknown_objective_lists_the_valid_keys() -> None:
    with pytest.raises(ConfigError, match="sweep.objective=val/acc: .*Valid: val_loss, exact_match, tokens_per_sec"):
        objective_value(METRICS, "val/acc")


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
    assert f"best: job {best_job}" in text and "2 failed" in text
    star = [line for line in text.splitlines() if line.startswith("*")]
    assert len(star) == 1 and f"optim.lr={'3e-4' if best_job == 1 else '1e-4'}" in star[0]


def test_a_job_run_again_is_one_row(tmp_path: Path) -> None:
    _job(tmp_path, 0, "failed", math.inf, "1e-4")
    _job(tmp_path, 1, "ok", 2.0, "1e-4")
    assert [(r["job"], r["status"]) for r in collect_rows(tmp_path)] == [(1, "ok")]


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
