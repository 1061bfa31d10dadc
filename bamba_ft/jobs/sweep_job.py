"""One job of a sweep: run it, turn its metrics into the sweeper's objective, record the outcome in its directory.

Every job writes `sweep_job.json` beside its outputs (status ok | failed | diverged | stopped, the objective, the
error), so the end-of-sweep table and a resumed sweep read results from disk, whichever launcher ran the job.
A job that raises returns a penalised objective instead, so the sweeper (basic, Optuna) goes on with the others.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from bamba_ft.errors import BambaFTError, ConfigError
from bamba_ft.jobs.report import atomic_write_json

log = logging.getLogger("bamba_ft")

RESULT_NAME = "sweep_job.json"
# Overrides that change how a sweep runs, not what a job computes: a resumed sweep matches jobs without them.
_NOT_IDENTITY = ("sweep.resume",)


def job_identity(overrides: list[str]) -> tuple[str, ...]:
    """A job's overrides in a canonical order, without those that do not change its result."""
    return tuple(sorted(o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in _NOT_IDENTITY))


def penalty(direction: str) -> float:
    """The objective of a failed or diverged job: the worst value (Optuna accepts inf; it refuses nan)."""
    return -math.inf if direction == "maximize" else math.inf


def objective_value(metrics: dict, key: str) -> float:
    """`key` looked up in metrics.json's `after`, then `train` ('/' read as '_'), then as a dotted path."""
    name = key.replace("/", "_")
    for block in ("after", "train"):
        section = metrics.get(block) or {}
        for k in (key, name):
            if k in section and isinstance(section[k], (int, float)):
                return float(section[k])
    node: Any = metrics
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, (int, float)) and not isinstance(node, bool):
        return float(node)
    known = [k for b in ("after", "train") for k, v in (metrics.get(b) or {}).items() if isinstance(v, (int, float))]
    raise ConfigError(
        f"sweep.objective={key}: not a number in this run's metrics.json.{' Valid: ' + ', '.join(known) if known else ''}"
        "\n(exact_match needs eval.generate=true.)"
    )


def read_result(job_dir: Path) -> dict | None:
    try:
        return json.loads((job_dir / RESULT_NAME).read_text())
    except (OSError, ValueError):
        return None


def _previous(sweep_dir: Path, identity: tuple[str, ...]) -> dict | None:
    """The newest recorded outcome of a job with these overrides in `sweep_dir` (ok before anything else)."""
    found = [r for d in sweep_dir.iterdir() if d.is_dir() and (r := read_result(d))
             and job_identity(r.get("overrides", [])) == identity]
    found.sort(key=lambda r: (r.get("status") == "ok", r.get("finished", 0)))
    return found[-1] if found else None


def run_sweep_job(cfg: DictConfig, run: Callable[[DictConfig], dict]) -> float:
    """Run one job of a multirun with `run`; return its objective, penalised when it fails; never raise for it."""
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    job_dir = Path(hc.runtime.output_dir)
    overrides = list(hc.overrides.task)
    key = str(OmegaConf.select(cfg, "sweep.objective"))
    direction = str(OmegaConf.select(cfg, "sweep.direction"))
    record: dict[str, Any] = {"job": hc.job.num, "overrides": overrides, "objective_key": key,
                              "direction": direction, "run_dir": str(job_dir), "error": None, "pid": os.getpid(),
                              "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
    if OmegaConf.select(cfg, "sweep.resume"):
        prev = _previous(Path(hc.sweep.dir), job_identity(overrides))
        if prev and prev.get("status") == "ok":
            log.info("sweep.resume: job %s (%s) finished before in %s; reusing its result",
                     hc.job.num, " ".join(overrides), prev["run_dir"])
            atomic_write_json(job_dir / RESULT_NAME, {**prev, "job": hc.job.num, "reused": True})
            return float(prev["objective"])
        if prev and prev.get("status") == "stopped" and Path(prev["run_dir"]) == job_dir:
            log.info("sweep.resume: job %s continues from its checkpoint in %s", hc.job.num, job_dir)
            OmegaConf.update(cfg, "trainer.resume", str(job_dir))
    t0 = time.time()
    try:
        result = run(cfg)
    except Exception as e:  # a job's crash must not end the sweep; KeyboardInterrupt still does
        # a ConfigError's first line only counts its problems: lead with the problems themselves
        detail = "; ".join(e.problems) if isinstance(e, ConfigError) else str(e)
        brief = f"{type(e).__name__}: {detail}".strip()
        log.error("job %s failed: %s", hc.job.num, brief.splitlines()[0])
        if not isinstance(e, BambaFTError):
            (job_dir / "error.txt").write_text(traceback.format_exc())
        record.update(status="failed", objective=penalty(direction), error=brief)
        _finish(job_dir, record, t0)
        if OmegaConf.select(cfg, "debug"):
            raise
        return record["objective"]
    if isinstance(result, dict) and "stopped_at" in result:
        # Ctrl-C or SIGTERM stops the whole sweep, not only this job: the next ones would start otherwise.
        # `sweep.resume=true` continues this job from its checkpoint and runs the rest.
        from bamba_ft.jobs.callbacks import STOPPED_EXIT

        signal = result.get("signal", "SIGTERM")
        record.update(status="stopped", objective=None, error=f"stopped by {signal} at step {result['stopped_at']}")
        _finish(job_dir, record, t0)
        print(f"sweep stopped; to continue it: the same command plus sweep.resume=true hydra.sweep.dir={hc.sweep.dir}")
        sys.exit(STOPPED_EXIT.get(signal, 143))
    try:
        value = objective_value(result, key)
    except ConfigError as e:
        record.update(status="failed", objective=penalty(direction), error=str(e))
        _finish(job_dir, record, t0)
        return record["objective"]
    ok = math.isfinite(value)
    record.update(status="ok" if ok else "diverged", objective=value if ok else penalty(direction),
                  error=None if ok else f"{key} is {value}", metrics=_key_metrics(result))
    _finish(job_dir, record, t0)
    return record["objective"]


def _key_metrics(metrics: dict) -> dict[str, float | None]:
    after, train = metrics.get("after") or {}, metrics.get("train") or {}
    return {"val_loss": after.get("val_loss"), "exact_match": after.get("exact_match"),
            "train_loss": train.get("final_train_loss"), "steps": train.get("steps"),
            "tokens_per_sec": train.get("tokens_per_sec")}


def _finish(job_dir: Path, record: dict, t0: float) -> None:
    record["seconds"] = round(time.time() - t0, 2)
    record["finished"] = time.time()
    atomic_write_json(job_dir / RESULT_NAME, record)
