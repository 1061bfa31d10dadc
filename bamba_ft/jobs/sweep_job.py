"""One job of a sweep: run it, turn its metrics into the sweeper's objective, record the outcome in its directory.

Every job writes `sweep_job.json` beside its outputs (status ok | failed | diverged | stopped, the objective, the
error), so the end-of-sweep table and a resumed sweep read results from disk, whichever launcher ran the job.
A job that raises returns a penalised objective instead, so the sweeper (basic, Optuna) goes on with the others.

A resumed sweep (sweep.resume=true) finds earlier results by their overrides, whatever the job numbers. Hydra
numbers a resumed sweep's jobs afresh, so when its values come in another order (or new ones come first) a job's
numbered directory can hold another job's results: those are kept as they are, the job's own Hydra files go with
it, and a job that has to run runs in a new directory beside it (`<num>.1`).
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import os
import shutil
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from bamba_ft.errors import BambaFTError, ConfigError
from bamba_ft.jobs import lock
from bamba_ft.jobs.report import atomic_write_json
from bamba_ft.rundir import RunDir

log = logging.getLogger("bamba_ft")

RESULT_NAME = "sweep_job.json"
# <sweep dir>/.before_resume/<job dir>/: each job directory's .hydra/ files as a resumed sweep found them
BEFORE_RESUME = ".before_resume"
# Overrides that change how a sweep runs, not what a job computes: a resumed sweep matches jobs without them.
_NOT_IDENTITY = ("sweep.resume",)
# Outcomes a resumed sweep reuses: a diverged job is a result of its settings, and would diverge again.
FINISHED = ("ok", "diverged")


def job_identity(overrides: list[str]) -> tuple[str, ...]:
    """A job's overrides in a canonical order, without those that do not change its result."""
    return tuple(sorted(o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in _NOT_IDENTITY))


def penalty(direction: str) -> float:
    """The objective of a failed or diverged job: the worst value (Optuna accepts inf; it refuses nan)."""
    return -math.inf if direction == "maximize" else math.inf


# Where a job's metrics.json keeps its numbers by name: a training run's `after` and `train`, recipe=eval's `metrics`
# (a sweep over eval.checkpoint compares runs by the same sweep.objective)
_BLOCKS = ("after", "train", "metrics")


def objective_value(metrics: dict, key: str) -> float:
    """`key` looked up in metrics.json's `after`, then `train`, then `metrics` ('/' read as '_'), then as a dotted
    path."""
    name = key.replace("/", "_")
    for block in _BLOCKS:
        section = metrics.get(block) or {}
        for k in (key, name):
            if k in section and isinstance(section[k], (int, float)):
                return float(section[k])
    node: Any = metrics
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, (int, float)) and not isinstance(node, bool):
        return float(node)
    known = [k for b in _BLOCKS for k, v in (metrics.get(b) or {}).items() if isinstance(v, (int, float))]
    raise ConfigError(
        f"sweep.objective={key}: not a number in this run's metrics.json.{' Valid: ' + ', '.join(known) if known else ''}"
        "\n(exact_match needs eval.generate=true.)"
    )


# The numbers objective_value can find by name (no dot), as the tasks whose metrics.json is known here write them:
# evaluate_model's (a training run's `before` and `after`, recipe=eval's `metrics`), a training run's `train` block
# (jobs/train.py), and the one number at the top of a training run's metrics.json.
_EVALUATED = ("val_loss", "val_ppl", "val_tokens", "exact_match", "num_generated", "eval_seconds")
_TRAINED = ("steps", "resumed_at_step", "fit_seconds", "final_train_loss", "last_val_loss", "tokens",
            "tokens_per_sec", "window_tokens_per_sec")
KNOWN_OBJECTIVES = (*_EVALUATED, *_TRAINED, "packing_efficiency")
# Where a dotted key starts (the top-level keys of a training run's and of recipe=eval's metrics.json), and, for the
# blocks whose keys are fixed, the keys it may go on with (lm_eval's tasks and early_stopped's keys go deeper)
_BLOCK_KEYS: dict[str, tuple[str, ...] | None] = {
    "before": (*_EVALUATED, "lm_eval"), "after": (*_EVALUATED, "lm_eval"), "metrics": (*_EVALUATED, "lm_eval"),
    "train": (*_TRAINED, "early_stopped"), "data": None, "packing_efficiency": None, "outputs": None,
    "diverged": None, "source": None}
# The tasks that write one of those metrics.json: a sweep of another (bench, export, ...) is not checked ahead
_KNOWN_LAYOUT = ("train", "eval")


def objective_problem(key: str, task: str) -> str | None:
    """Why no job of a sweep of `task` can have `key` (sweep.objective) in its metrics.json, with the names it may
    have, or None. Checked as the sweep starts: otherwise each job would train and then fail for want of it.

    Only what is certainly wrong is refused: a name (no dot) none of those above, a dotted key whose first part is
    no top-level key, or whose second part is no key of a block whose keys are fixed. Deeper parts (lm_eval's task
    names, data's splits) and the metrics of other tasks are not known before a job runs, and are not checked."""
    if task not in _KNOWN_LAYOUT:
        return None
    parts = key.split(".")
    if len(parts) == 1:
        if key.replace("/", "_") in KNOWN_OBJECTIVES:
            return None
        close = difflib.get_close_matches(key.replace("/", "_"), KNOWN_OBJECTIVES, n=1, cutoff=0.6)
    elif parts[0] not in _BLOCK_KEYS:
        close = [f"{c}.{'.'.join(parts[1:])}" for c in difflib.get_close_matches(parts[0], _BLOCK_KEYS, n=1)]
    else:
        valid = _BLOCK_KEYS[parts[0]]
        if valid is None or parts[1] in valid:
            return None
        close = [f"{parts[0]}.{c}" for c in difflib.get_close_matches(parts[1], valid, n=1, cutoff=0.6)]
    named = ", ".join(f"{n} (val/loss)" if n == "val_loss" else n for n in KNOWN_OBJECTIVES)
    return (f"sweep.objective={key}: no job of this sweep can log it (task={task}), so each would train and then "
            f"fail for want of it.{f' Did you mean {close[0]}?' if close else ''}\nKnown metric names: {named}; or a "
            "dotted path into metrics.json (e.g. train.tokens_per_sec, data.train.examples).")


def read_result(job_dir: Path) -> dict | None:
    try:
        return json.loads((job_dir / RESULT_NAME).read_text())
    except (OSError, ValueError):
        return None


def _previous(sweep_dir: Path, identity: tuple[str, ...]) -> dict | None:
    """The newest recorded outcome of a job with these overrides in `sweep_dir` (ok, then diverged, before anything
    else)."""
    found = [r for d in sweep_dir.iterdir() if d.is_dir() and (r := read_result(d))
             and job_identity(r.get("overrides", [])) == identity]
    found.sort(key=lambda r: (r.get("status") == "ok", r.get("status") in FINISHED, r.get("finished", 0)))
    return found[-1] if found else None


def run_sweep_job(cfg: DictConfig, run: Callable[[DictConfig], dict]) -> float:
    """Run one job of a multirun with `run`; return its objective, penalised when it fails; never raise for it."""
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    job_dir = Path(hc.runtime.output_dir)
    if not OmegaConf.select(cfg, "sweep.resume"):
        return _run_job(cfg, run, job_dir)
    sweep_dir = Path(hc.sweep.dir)
    identity = job_identity(list(hc.overrides.task))
    prev = _previous(sweep_dir, identity)
    occupant = _occupant(sweep_dir, job_dir)
    own = read_result(job_dir)
    if occupant == identity and own is not None and own.get("status") in FINISHED:
        prev = own  # its own result, not another job's run of the same values (a search may ask for them twice)
    if occupant in (None, identity):
        if prev and prev.get("status") in FINISHED:
            _log_reuse(hc, prev)
            atomic_write_json(job_dir / RESULT_NAME, {**prev, "job": hc.job.num, "reused": True})
            if Path(prev["run_dir"]) != job_dir:
                _mark_reused(Path(prev["run_dir"]), identity)
            return float(prev["objective"])
        if prev and prev.get("status") == "stopped" and Path(prev["run_dir"]) == job_dir:
            log.info("sweep.resume: job %s continues from its checkpoint in %s", hc.job.num, job_dir)
            OmegaConf.update(cfg, "trainer.resume", str(job_dir))
        elif RunDir(job_dir).trained_outputs():
            _continue_or_start_over(cfg, job_dir, hc.job.num, killed=prev is None)
        return _run_job(cfg, run, job_dir)
    return _beside_another_job(cfg, run, job_dir, prev, occupant)


def _continue_or_start_over(cfg: DictConfig, job_dir: Path, num: int, killed: bool) -> None:
    """A resumed job whose own directory holds what its earlier run left (a training run refuses such a directory
    unless it resumes from it). Killed before it could record an outcome: it continues from its newest intact
    checkpoint, so the steps it trained are kept (a kill while saving its adapter leaves nothing to train). After
    a failure or divergence: it starts over, and what that run left is removed, as the earlier run was this job."""
    from bamba_ft.jobs.checkpoints import newest_intact

    if killed:
        try:
            ckpt = newest_intact(job_dir, "sweep.resume")
        except ConfigError:
            ckpt = None
        if ckpt is not None:
            log.info("sweep.resume: job %s continues from the checkpoint its killed run left: %s", num, ckpt)
            OmegaConf.update(cfg, "trainer.resume", str(ckpt))  # the one found: training need not search again
            return
    found = RunDir(job_dir).trained_outputs()
    log.info("sweep.resume: job %s starts over in %s; removing what its earlier run left: %s", num, job_dir,
             ", ".join(found))
    for name in found:
        path = job_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def _beside_another_job(cfg: DictConfig, run: Callable[[DictConfig], dict], job_dir: Path, prev: dict | None,
                        occupant: tuple[str, ...]) -> float:
    """A resumed job whose numbered directory holds another job's files (the sweep's values come in another order).

    Hydra has just written this job's .hydra/ files there: they move to where this job's results are, and that job's
    own come back. A finished result is reused from its directory; a stopped job continues in its own; any other job
    runs in a new directory, so the results already in `job_dir` stay as they are."""
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    sweep_dir = Path(hc.sweep.dir)
    reuse = prev is not None and prev.get("status") in FINISHED
    stopped = prev is not None and prev.get("status") == "stopped" and Path(prev["run_dir"]).is_dir()
    run_dir = Path(prev["run_dir"]) if reuse or stopped else _new_job_dir(job_dir)
    if not reuse:
        _put_hydra_files(job_dir / ".hydra", run_dir)  # this job's, as Hydra wrote them
    _put_hydra_files(sweep_dir / BEFORE_RESUME / job_dir.name, job_dir)  # the other job's, as they were
    with _log_into(job_dir, run_dir):
        if reuse:
            _log_reuse(hc, prev)
            _mark_reused(run_dir, job_identity(list(hc.overrides.task)))
            return float(prev["objective"])
        log.warning("sweep.resume: job %s (%s) runs in %s, not in %s: that directory holds the job %s, which stays "
                    "as it is", hc.job.num, " ".join(hc.overrides.task), run_dir, job_dir, " ".join(occupant))
        OmegaConf.update(cfg, "output_dir", str(run_dir))
        if stopped:
            log.info("sweep.resume: job %s continues from its checkpoint in %s", hc.job.num, run_dir)
            OmegaConf.update(cfg, "trainer.resume", str(run_dir))
        try:
            return _run_job(cfg, run, run_dir)
        finally:
            lock.release(run_dir)  # a training run takes its directory's lock; Hydra's RunLock frees only job_dir's


def _log_reuse(hc: Any, prev: dict) -> None:
    log.info("sweep.resume: job %s (%s) finished before in %s; reusing its result",
             hc.job.num, " ".join(hc.overrides.task), prev["run_dir"])


def _run_job(cfg: DictConfig, run: Callable[[DictConfig], dict], run_dir: Path) -> float:
    """Run the job with its outputs in `run_dir`; record its outcome there; return its objective."""
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    key = str(OmegaConf.select(cfg, "sweep.objective"))
    direction = str(OmegaConf.select(cfg, "sweep.direction"))
    record: dict[str, Any] = {"job": hc.job.num, "overrides": list(hc.overrides.task), "objective_key": key,
                              "direction": direction, "run_dir": str(run_dir), "error": None, "pid": os.getpid(),
                              "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
    t0 = time.time()
    try:
        result = run(cfg)
    except Exception as e:  # a job's crash must not end the sweep; KeyboardInterrupt still does
        # a ConfigError's first line only counts its problems: lead with the problems themselves
        detail = "; ".join(e.problems) if isinstance(e, ConfigError) else str(e)
        brief = f"{type(e).__name__}: {detail}".strip()
        log.error("job %s failed: %s", hc.job.num, brief.splitlines()[0])
        if not isinstance(e, BambaFTError):
            (run_dir / "error.txt").write_text(traceback.format_exc())
        # a configuration error fails again on the same settings: the sweep's closing hint then offers no resume
        record.update(status="failed", objective=penalty(direction), error=brief, config_error=isinstance(e, ConfigError))
        _finish(run_dir, record, t0)
        if OmegaConf.select(cfg, "debug"):
            raise
        return record["objective"]
    if isinstance(result, dict) and "stopped_at" in result:
        # Ctrl-C or SIGTERM stops the whole sweep, not only this job: the next ones would start otherwise.
        # `sweep.resume=true` continues this job from its checkpoint and runs the rest.
        from bamba_ft.jobs.callbacks import STOPPED_EXIT

        signal = result.get("signal", "SIGTERM")
        record.update(status="stopped", objective=None, error=f"stopped by {signal} at step {result['stopped_at']}")
        _finish(run_dir, record, t0)
        print(f"sweep stopped; to continue it: the same command plus sweep.resume=true hydra.sweep.dir={hc.sweep.dir}")
        sys.exit(STOPPED_EXIT.get(signal, 143))
    if isinstance(result, dict) and result.get("diverged"):
        # the run says its weights are not usable (a non-finite train loss or weight), whatever the objective
        # reads: an exact match or tokens/s of a diverged run is no result to rank
        record.update(status="diverged", objective=penalty(direction), error=f"diverged: {result['diverged']}",
                      metrics=_key_metrics(result))
        _finish(run_dir, record, t0)
        return record["objective"]
    try:
        value = objective_value(result, key)
    except ConfigError as e:  # the run itself finished: its metrics still go in the table
        log.error("job %s failed: %s", hc.job.num, e.problems[0].splitlines()[0])
        record.update(status="failed", objective=penalty(direction), error="; ".join(e.problems),
                      metrics=_key_metrics(result), config_error=True)
        _finish(run_dir, record, t0)
        return record["objective"]
    ok = math.isfinite(value)
    record.update(status="ok" if ok else "diverged", objective=value if ok else penalty(direction),
                  error=None if ok else f"{key} is {value}", metrics=_key_metrics(result))
    _finish(run_dir, record, t0)
    return record["objective"]


def save_hydra_files(sweep_dir: Path) -> None:
    """Copy each job directory's .hydra/ files aside as a resumed sweep starts, before any of its jobs runs.

    Hydra writes a job's .hydra/ files into its numbered directory before bamba_ft's code runs. When a resume lists
    its values in another order, that directory can hold another job: its files come back from this copy, and a job
    killed before it wrote its record is still known by them (`_occupant`)."""
    saved = sweep_dir / BEFORE_RESUME
    shutil.rmtree(saved, ignore_errors=True)
    for d in sweep_dir.iterdir():
        if d.is_dir() and not d.name.startswith(".") and (d / ".hydra").is_dir():
            shutil.copytree(d / ".hydra", saved / d.name)


def earlier_sweep(sweep_dir: Path) -> list[str]:
    """What an earlier sweep left in `sweep_dir`, relative to it: its table, and per job directory its record, else
    its training outputs, else its .hydra/ files (a job killed early); [] where no sweep ran (a missing or empty
    directory, or only Hydra's multirun.yaml, which holds no result)."""
    if not sweep_dir.is_dir():
        return []
    found = [name for name in ("sweep.json", "sweep.csv") if (sweep_dir / name).is_file()]
    jobs = sorted((d for d in sweep_dir.iterdir() if d.is_dir() and not d.name.startswith(".")),
                  key=lambda d: (len(d.name), d.name))
    for d in jobs:
        marks = ([RESULT_NAME] if (d / RESULT_NAME).is_file() else RunDir(d).trained_outputs()[:1]
                 or ([".hydra/"] if (d / ".hydra").is_dir() else []))
        found += [f"{d.name}/{mark}" for mark in marks]
    return found


def refuse_earlier_sweep(sweep_dir: Path) -> None:
    """A sweep without sweep.resume into a directory that holds an earlier sweep's results would run each job into
    a directory holding a training run (every job fails) and then rewrite sweep.csv, sweep.json and each job's
    record as failed, so a later resume would train every job again. Checked as the sweep starts, before Hydra's
    launcher writes anything there (multirun.yaml, the jobs' .hydra/ files), whichever sweeper and launcher run it."""
    found = earlier_sweep(sweep_dir)
    if found:
        shown = ", ".join(found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
        raise ConfigError(
            f"hydra.sweep.dir={sweep_dir} holds an earlier sweep's results ({shown}); a new sweep there would run "
            "its jobs over them and rewrite sweep.csv, sweep.json and each job's record as failed.\n"
            "Fix: the same command plus sweep.resume=true continues that sweep (finished jobs are reused, the rest "
            "run), or give this sweep another directory (hydra.sweep.dir=..., or leave it at its default), or "
            f"delete {sweep_dir} first.", "hydra.sweep.dir")


def drop_saved_hydra_files(sweep_dir: Path) -> None:
    shutil.rmtree(sweep_dir / BEFORE_RESUME, ignore_errors=True)


def _occupant(sweep_dir: Path, job_dir: Path) -> tuple[str, ...] | None:
    """The identity of the job whose files `job_dir` held as this resume started; None where it held none.

    Its record names it; a job killed before writing one is named by its .hydra/overrides.yaml as saved before the
    sweep started (Hydra has since rewritten the directory's own for the job starting there now)."""
    record = read_result(job_dir)
    if record is not None:
        return job_identity(record.get("overrides", []))
    saved = sweep_dir / BEFORE_RESUME / job_dir.name / "overrides.yaml"
    if saved.is_file():
        return job_identity([str(o) for o in OmegaConf.load(saved)])
    return None


def _put_hydra_files(files: Path, job_dir: Path) -> None:
    """Copy the Hydra files in `files` into `job_dir`/.hydra; none (hydra.output_subdir=null): nothing to do."""
    if files.is_dir():
        shutil.copytree(files, job_dir / ".hydra", dirs_exist_ok=True)


def _new_job_dir(job_dir: Path) -> Path:
    """A new directory beside `job_dir`: `<num>.1` (`.2`, ... where taken). Not a number, so Hydra never gives it
    to a later job of the sweep; made with mkdir, so two jobs running in parallel never get the same one."""
    k = 1
    while True:
        new = job_dir.with_name(f"{job_dir.name}.{k}")
        try:
            new.mkdir()
            return new
        except FileExistsError:
            k += 1


def _mark_reused(run_dir: Path, identity: tuple[str, ...]) -> None:
    """Mark the record in `run_dir` as reused by this sweep: its row in the table says so."""
    record = read_result(run_dir)
    if record is not None and job_identity(record.get("overrides", [])) == identity and not record.get("reused"):
        atomic_write_json(run_dir / RESULT_NAME, {**record, "reused": True})


@contextmanager
def _log_into(job_dir: Path, run_dir: Path) -> Iterator[None]:
    """Write this job's log file in `run_dir`: Hydra opened it in `job_dir`, whose log is another job's. (A `run_dir`
    that is gone, a record's from a sweep directory since moved, gets none: the console still shows the log.)"""
    root = logging.getLogger()
    moved = [h for h in root.handlers if isinstance(h, logging.FileHandler) and Path(h.baseFilename).parent == job_dir]
    added = []
    for old in moved:
        root.removeHandler(old)
        if not run_dir.is_dir():
            continue
        new = logging.FileHandler(run_dir / Path(old.baseFilename).name, encoding=old.encoding)
        new.setFormatter(old.formatter)
        new.setLevel(old.level)
        root.addHandler(new)
        added.append(new)
    try:
        yield
    finally:
        for new in added:
            root.removeHandler(new)
            new.close()
        for old in moved:
            root.addHandler(old)


def _key_metrics(metrics: dict) -> dict[str, float | None]:
    after, train = metrics.get("after") or metrics.get("metrics") or {}, metrics.get("train") or {}
    return {"val_loss": after.get("val_loss"), "exact_match": after.get("exact_match"),
            "train_loss": train.get("final_train_loss"), "steps": train.get("steps"),
            "tokens_per_sec": train.get("tokens_per_sec")}


def _finish(job_dir: Path, record: dict, t0: float) -> None:
    record["seconds"] = round(time.time() - t0, 2)
    record["finished"] = time.time()
    atomic_write_json(job_dir / RESULT_NAME, record)
