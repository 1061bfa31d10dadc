"""Hydra callback: at the end of a sweep, one table of every job (terminal, sweep.csv, sweep.json) and sweep.png.

Results are read from each job's `sweep_job.json` (bamba_ft/jobs/sweep_job.py), so the table is the same
whichever launcher ran the jobs; a job directory without one belongs to a job killed before it could write it.
As a sweep starts (before Hydra's launcher writes anything) it refuses a directory holding an earlier sweep's
results unless sweep.resume=true: a new sweep there would rewrite them as failed.
"""

from __future__ import annotations

import csv
import io
import math
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from bamba_ft.errors import ConfigError
from bamba_ft.jobs.gpu_slots import no_gpu_problem
from bamba_ft.jobs.lock import refuse
from bamba_ft.jobs.report import atomic_write_json, atomic_write_text, output_path_problem, table
from bamba_ft.jobs.sweep_job import (
    FINISHED,
    RESULT_NAME,
    drop_saved_hydra_files,
    job_identity,
    objective_problem,
    read_result,
    refuse_earlier_sweep,
    save_hydra_files,
)

COLUMNS = ["job", "status", "objective", "overrides", "val_loss", "exact_match", "train_loss", "steps", "run_dir", "error"]


def _job_dirs(sweep_dir: Path) -> list[Path]:
    dirs = [d for d in sweep_dir.iterdir() if d.is_dir() and not d.name.startswith(".")
            and ((d / RESULT_NAME).exists() or (d / ".hydra").is_dir())]
    return sorted(dirs, key=lambda d: (len(d.name), d.name))


def collect_rows(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per job (a job that ran again under sweep.resume appears once, with its latest outcome). Two jobs
    that ran with the same overrides (an Optuna search asking for the same values again) are two rows: each is a
    result, and the best may be either."""
    records: list[tuple[tuple[str, ...], Path, float, tuple, dict[str, Any]]] = []
    for position, d in enumerate(_job_dirs(sweep_dir)):
        r = read_result(d)
        if r is None:
            overrides_file = d / ".hydra" / "overrides.yaml"
            overrides = OmegaConf.to_container(OmegaConf.load(overrides_file)) if overrides_file.exists() else []
            r = {"overrides": overrides, "status": "failed", "objective": None, "run_dir": str(d),
                 "error": f"no {RESULT_NAME}: the job's process ended before finishing (killed, out of memory?); "
                          f"see the log in {d}"}
        m = r.get("metrics") or {}
        row = {"job": int(d.name) if d.name.isdigit() else d.name, "status": r["status"] + (" (reused)" if r.get("reused") else ""),
               "objective": r.get("objective"), "overrides": " ".join(_settings(r.get("overrides", []))),
               "val_loss": m.get("val_loss"), "exact_match": m.get("exact_match"), "train_loss": m.get("train_loss"),
               "steps": m.get("steps"), "run_dir": r.get("run_dir", str(d)), "error": r.get("error") or "",
               "params": _params(r.get("overrides", [])), "config_error": bool(r.get("config_error"))}
        records.append((job_identity(r.get("overrides", [])), Path(row["run_dir"]).absolute(), r.get("finished") or 0,
                        _rank(r, d, position), row))
    finished: dict[tuple[str, ...], float] = {}  # when each job's values last ran to an outcome
    for identity, _, when, _, row in records:
        if row["status"].split()[0] in FINISHED:
            finished[identity] = max(finished.get(identity, 0), when)
    rows: dict[tuple, dict[str, Any]] = {}
    ranks: dict[tuple, tuple] = {}
    for identity, run_dir, when, rank, row in records:
        done = row["status"].split()[0] in FINISHED
        if not done and identity in finished and when <= finished[identity]:
            continue  # failed, stopped or killed, then run again by a resume to an outcome
        # a finished job is one row per directory of results: a resume's reuse of it points there
        key = (identity, run_dir) if done else (identity,)
        if key not in rows or rank > ranks[key]:
            rows[key], ranks[key] = row, rank
    return sorted(rows.values(), key=lambda row: (isinstance(row["job"], str), row["job"]))


def _rank(record: dict[str, Any], job_dir: Path, position: int) -> tuple:
    """Which of one job's records makes its row: an ok one, then the newest, then the one in the directory that
    holds its results (a job reused by a resumed sweep can leave a record pointing there), then the later one."""
    return (record.get("status") == "ok", record.get("finished") or 0,
            Path(record.get("run_dir", job_dir)).absolute() == job_dir.absolute(), position)


def _settings(overrides: list[str]) -> list[str]:
    """The job's overrides in their order, without those a resumed sweep adds to the jobs it runs (sweep.resume):
    a job run by a resume has the same settings as one reused."""
    identity = set(job_identity(overrides))
    return [o for o in overrides if o in identity]


def _params(overrides: list[str]) -> dict[str, str]:
    """The job's settings by key; `sweep.resume`, given to a resumed sweep's new jobs only, is none of them."""
    return {o.split("=", 1)[0].lstrip("+~"): o.split("=", 1)[1] for o in job_identity(overrides) if "=" in o}


def best_row(rows: list[dict[str, Any]], direction: str) -> dict[str, Any] | None:
    ok = [r for r in rows if r["status"].startswith("ok") and r["objective"] is not None and math.isfinite(r["objective"])]
    if not ok:
        return None
    pick = max if direction == "maximize" else min
    return pick(ok, key=lambda r: r["objective"])


def pick_best(values: list[float], direction: str) -> int:
    return (max if direction == "maximize" else min)(range(len(values)), key=values.__getitem__)


def _fmt(value: Any) -> str:
    if value is None or value == "":
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def write_outputs(sweep_dir: Path, rows: list[dict[str, Any]], objective: str, direction: str, search: bool) -> str:
    """Write sweep.csv, sweep.json, sweep.png into `sweep_dir`; return the table for the terminal."""
    best = best_row(rows, direction)
    for r in rows:
        r["best"] = r is best
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["best", *COLUMNS], extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(sweep_dir / "sweep.csv", buf.getvalue())
    atomic_write_json(sweep_dir / "sweep.json", {
        "objective": objective, "direction": direction,
        "best": None if best is None else {k: best[k] for k in ("job", "objective", "overrides", "run_dir")},
        "jobs": [{k: r[k] for k in ["best", *COLUMNS]} for r in rows]})
    plotted = plot_sweep(rows, sweep_dir / "sweep.png", objective, direction, search)
    # The terminal shows what differs between jobs; sweep.csv and sweep.json keep every override.
    common = set.intersection(*(set(r["overrides"].split()) for r in rows))
    shown = [["*" if r["best"] else "", *(
        " ".join(o for o in r["overrides"].split() if o not in common) if c == "overrides"
        else (r[c].splitlines()[0][:100] if r[c] else "") if c == "error" else _fmt(r[c]) for c in COLUMNS)]
        for r in rows]
    header = ["best", "job", "status", objective, "overrides", "val loss", "exact match", "train loss", "steps",
              "run dir", "error"]
    counts = Counter(r["status"].split()[0] for r in rows)  # "ok (reused)" counts as ok
    tally = ", ".join(f"{n} {status}" for status, n in sorted(counts.items(), key=lambda kv: kv[0] != "ok"))
    lines = [f"\nsweep {sweep_dir}: {len(rows)} jobs ({tally}); objective {objective} ({direction})",
             f"every job: {' '.join(sorted(common)) or '-'}", table(shown, header)]
    if best is not None:
        lines.append(f"best: job {best['job']}, {objective}={best['objective']:.6g}: {best['overrides']}")
    lines.append(f"written: {sweep_dir / 'sweep.csv'}, sweep.json" + (", sweep.png" if plotted else ""))
    return "\n".join(lines)


def plot_sweep(rows: list[dict[str, Any]], out: Path, objective: str, direction: str, search: bool) -> bool:
    """Objective against each swept parameter (and against the trial number for a search); False if nothing to draw."""
    finite = [r for r in rows if r["objective"] is not None and math.isfinite(r["objective"])]
    swept = sorted({k for r in rows for k in r["params"]
                    if len({str(x["params"].get(k)) for x in rows}) > 1})
    if not finite or not (swept or search):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    panels = swept + (["trial"] if search else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4), squeeze=False)
    for ax, name in zip(axes[0], panels):
        if name == "trial":
            xs: list[Any] = [r["job"] for r in finite]
            if not all(isinstance(x, int) for x in xs):  # a resumed job that ran beside its numbered directory
                xs = list(range(len(finite)))
            ys = [r["objective"] for r in finite]
            ax.plot(xs, ys, "o", color="tab:blue", label="trial")
            pick = max if direction == "maximize" else min
            ax.step(xs, [pick(ys[:i + 1]) for i in range(len(ys))], where="post", color="tab:red", label="best so far")
            ax.xaxis.get_major_locator().set_params(integer=True)
            ax.legend(fontsize=8)
        else:
            pts = [(r["params"].get(name), r["objective"]) for r in finite if name in r["params"]]
            if not pts:  # set only in jobs that failed: nothing to draw against it
                ax.set_visible(False)
                continue
            try:
                xs = [float(x) for x, _ in pts]
                if min(xs) > 0 and max(xs) / min(xs) >= 4:
                    ax.set_xscale("log")
                    ax.xaxis.set_minor_formatter(NullFormatter())  # labels at decades only
            except ValueError:  # categorical values: one position each, in first-seen order
                labels = list(dict.fromkeys(str(x) for x, _ in pts))
                xs = [labels.index(str(x)) for x, _ in pts]
                ax.set_xticks(range(len(labels)), labels)
            ax.scatter(xs, [y for _, y in pts], color="tab:blue")
            best = pick_best([y for _, y in pts], direction)
            ax.scatter([xs[best]], [pts[best][1]], color="tab:red", zorder=3, label="best")
        ax.set_xlabel(name)
        ax.set_ylabel(objective)
        ax.grid(alpha=0.3)
    dropped = len(rows) - len(finite)
    fig.suptitle(f"{objective}: {len(finite)} jobs" + (f" ({dropped} failed, not drawn)" if dropped else ""))
    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out)
    return True


def direction_warning(objective: str, direction: str) -> str | None:
    """A warning when sweep.direction goes against what the objective measures (a loss maximized, exact match or
    tokens/s minimized): the best job would be the worst, with nothing else to say so."""
    name = objective.lower()
    lower_is_better = any(part in name for part in ("loss", "ppl", "perplexity"))
    higher_is_better = any(part in name for part in ("exact_match", "tokens_per_sec"))
    wanted = "minimize" if lower_is_better else "maximize" if higher_is_better else None
    if wanted is None or wanted == direction:
        return None
    return (f"warning: sweep.objective={objective} with sweep.direction={direction}: the best job will be the one with "
            f"the {'highest' if direction == 'maximize' else 'lowest'} {objective}.\nFix: sweep.direction={wanted}, "
            "unless that is what you mean.")


class SweepSummary(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweeper = OmegaConf.select(config, "hydra.sweeper")
        direction = OmegaConf.select(config, "sweep.direction")
        objective = str(OmegaConf.select(config, "sweep.objective"))
        if problem := objective_problem(objective, str(OmegaConf.select(config, "task"))):
            refuse(ConfigError(problem, "sweep.objective"))  # before any job trains, not after every one has
        if problem := no_gpu_problem(config):
            refuse(ConfigError(problem, "trainer.accelerator"))  # before the first job, as a single run is refused
        if warning := direction_warning(objective, str(direction)):
            print(f"bamba_ft: {warning}", file=sys.stderr)
        if "Optuna" in str(sweeper.get("_target_", "")) and str(sweeper.get("direction")).split(".")[-1] != direction:
            refuse(ConfigError(
                f"hydra.sweeper.direction={sweeper.get('direction')} but sweep.direction={direction}: Optuna would "
                f"optimise the other way.\nFix: set both, e.g. hydra.sweeper.direction={direction}."))
        subdir = str(OmegaConf.to_container(config.hydra.sweep, resolve=False).get("subdir"))
        if "${" not in subdir:  # every job in one directory: each would fail on, or replace, the one before
            refuse(ConfigError(
                f"hydra.sweep.subdir={subdir} names one directory for every job of the sweep: the second job would "
                "find the first's run there and fail, and its record would replace the first's in the table.\n"
                "Fix: leave hydra.sweep.subdir at its default (the job's number), or make it differ per job, e.g. "
                "'hydra.sweep.subdir=${hydra.job.override_dirname}'.", "hydra.sweep.subdir"))
        sweep_dir = Path(str(OmegaConf.select(config, "hydra.sweep.dir")))
        if problem := output_path_problem(sweep_dir, f"hydra.sweep.dir={sweep_dir}", directory=True):
            refuse(ConfigError(problem))  # the sweeper's mkdir would end in a traceback
        if not OmegaConf.select(config, "sweep.resume"):
            # Hydra calls this before it makes the sweeper, whose launcher writes multirun.yaml and the jobs' files
            try:
                refuse_earlier_sweep(sweep_dir)
            except ConfigError as e:
                refuse(e)
        elif sweep_dir.is_dir():
            save_hydra_files(sweep_dir)  # before Hydra rewrites them in the jobs' numbered directories

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        drop_saved_hydra_files(sweep_dir)
        rows = collect_rows(sweep_dir)
        if not rows:
            return
        search = "Optuna" in str(OmegaConf.select(config, "hydra.sweeper._target_"))
        print(write_outputs(sweep_dir, rows, str(config.sweep.objective), str(config.sweep.direction), search))
        if warning := direction_warning(str(config.sweep.objective), str(config.sweep.direction)):
            print(f"bamba_ft: {warning}", file=sys.stderr)  # again under the table it concerns
        if search and (sweep_dir / "optimization_results.yaml").exists():
            print(f"Optuna's best parameters and value: {sweep_dir / 'optimization_results.yaml'}")
            storage = OmegaConf.select(config, "hydra.sweeper.storage", default=None)
            if storage and (note := kept_study_note(sweep_dir, rows, str(config.sweep.objective),
                                                    str(config.sweep.direction), str(storage))):
                print(f"bamba_ft: {note}", file=sys.stderr)
        if (problem := sweep_problem(rows, sweep_dir)) is not None:
            print(f"bamba_ft: {problem}", file=sys.stderr)
            sys.exit(1)


def kept_study_note(sweep_dir: Path, rows: list[dict[str, Any]], objective: str, direction: str,
                    storage: str) -> str | None:
    """A note when the Optuna study kept in `storage` holds a better trial than any job of this directory (one run
    by an earlier sweep into another directory), or None. The table, its best and sweep.json rank this directory's
    jobs; Optuna's optimization_results.yaml names the study's best, of every sweep that used the study."""
    study = OmegaConf.to_container(OmegaConf.load(sweep_dir / "optimization_results.yaml"))
    value = study.get("best_value") if isinstance(study, dict) else None
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    best = best_row(rows, direction)
    if best is not None and pick_best([best["objective"], value], direction) == 0:  # a tie stays this sweep's
        return None
    params = " ".join(f"{k}={v}" for k, v in (study.get("best_params") or {}).items())
    here = "none of this sweep's jobs" if best is None else f"this sweep's best, job {best['job']} ({best['objective']:.6g})"
    return (f"the Optuna study kept in hydra.sweeper.storage={storage} has a better trial from an earlier sweep than "
            f"{here}: {objective}={value:.6g} with {params}. The table, its best and sweep.json cover this "
            "directory's jobs; optimization_results.yaml covers the study's.")


def sweep_problem(rows: list[dict[str, Any]], sweep_dir: Path) -> str | None:
    """Why the sweep exits 1, with the fix, or None: a job failed (an error or a killed process, not a diverged
    loss, which is a result of its settings), or no job finished with a usable objective. The outputs are written
    either way."""
    failed = [r for r in rows if r["status"].startswith("failed")]
    if failed:
        told = (f"{len(failed)} of {len(rows)} jobs failed (job {', '.join(str(r['job']) for r in failed)}): their "
                "errors are in sweep.csv.")
        if all(r["config_error"] for r in failed):
            # a resume runs a failed job again with the same settings: the same error, however often
            who, them = (("Every job", "them") if len(failed) == len(rows) else
                         ("The failed job", "it") if len(failed) == 1 else ("Each failed job", "them"))
            return (f"{told}\n{who} failed on a configuration error (job {failed[0]['job']}: "
                    f"{failed[0]['error'].splitlines()[0]}); sweep.resume=true would run {them} again with the same "
                    "settings, to the same error.\nFix: correct the settings the errors name (on the command line, in "
                    "the recipe or among the swept values), then run the sweep again in a new directory (leave "
                    f"hydra.sweep.dir at its default, or delete {sweep_dir} first).")
        return (f"{told}\nTo run them again: the same command plus sweep.resume=true hydra.sweep.dir={sweep_dir} "
                "(finished jobs are reused).")
    if not any(r["status"].startswith("ok") for r in rows):
        return (f"no job of {len(rows)} finished with a finite objective (every one diverged).\nFix: lower optim.lr "
                "(or sweep lower values) in a new sweep; a resume reuses these results.")
    return None
