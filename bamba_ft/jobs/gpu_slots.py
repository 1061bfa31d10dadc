"""hydra/launcher=joblib on a machine with several GPUs: each parallel job runs on its own GPU(s).

The joblib launcher runs jobs in a pool of `hydra.launcher.n_jobs` worker processes and tells a job nothing
about which worker it is on. So each worker claims a slot the first time it runs a job: an flock on
`<sweep dir>/.gpu_slots/<i>.lock`, held for the worker's life and dropped by the kernel however it ends. It
then sets CUDA_VISIBLE_DEVICES to that slot's GPUs before anything initialises CUDA, and keeps the slot for
every later job it runs, since CUDA reads the variable once per process.
"""

from __future__ import annotations

import fcntl
import logging
import os
import subprocess
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from bamba_ft.errors import ConfigError
from bamba_ft.jobs.lock import refuse

log = logging.getLogger("bamba_ft")
ENV = "CUDA_VISIBLE_DEVICES"
_claimed: dict[str, Any] = {}  # this worker's slot: {"slot": i, "fd": lock fd, "devices": "0,1"}


def visible_gpus() -> list[str]:
    """The GPUs this process may use, without initialising CUDA (which would freeze CUDA_VISIBLE_DEVICES)."""
    env = os.environ.get(ENV)
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and not g.strip().startswith("-")]
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else []


def claim_slot(slot_dir: Path, gpus: list[str], per_job: int) -> tuple[int, int, str]:
    """Lock the first free slot of `per_job` GPUs: (slot, fd holding its lock, CUDA_VISIBLE_DEVICES value)."""
    slots = len(gpus) // per_job
    slot_dir.mkdir(parents=True, exist_ok=True)
    for i in range(slots):
        fd = os.open(slot_dir / f"{i}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        return i, fd, ",".join(gpus[i * per_job:(i + 1) * per_job])
    raise ConfigError(
        f"all {slots} GPU slots ({len(gpus)} GPUs, sweep.gpus_per_job={per_job}) are held by other jobs of this sweep.\n"
        f"Fix: hydra.launcher.n_jobs={slots} (one job per slot)."
    )


# Launchers whose jobs run on this machine (Hydra's own, joblib's workers, submitit's local processes); a Slurm job
# runs on a node with GPUs of its own, whatever the machine that submits it has.
_LAUNCHERS_HERE = ("BasicLauncher", "JoblibLauncher", "LocalLauncher")
_ON_THE_DEVICE = ("train", "eval", "generate", "bench", "doctor")  # tasks that take trainer.accelerator's device


def _swept_keys(config: DictConfig) -> set[str]:
    """The keys and groups whose value differs between the sweep's jobs (command-line sweeps, Optuna's params)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    task = [str(o) for o in OmegaConf.select(config, "hydra.overrides.task", default=[]) or []]
    keys = {o.key_or_group for o in OverridesParser.create().parse_overrides(task) if o.is_sweep_override()}
    params = OmegaConf.select(config, "hydra.sweeper.params", default=None)
    return keys | {str(k) for k in (params or {})}


def no_gpu_problem(config: DictConfig) -> str | None:
    """Why no job of this sweep can run, or None: trainer.accelerator=gpu for every job, jobs that run on this
    machine, and no CUDA device here. Each job failed on it in turn (as a single run does at once), and the sweep
    only said so after the last."""
    accelerator = str(OmegaConf.select(config, "trainer.accelerator"))
    launcher = str(OmegaConf.select(config, "hydra.launcher._target_", default="")).rsplit(".", 1)[-1]
    task = str(OmegaConf.select(config, "task", default="train"))
    if accelerator not in ("gpu", "cuda") or launcher not in _LAUNCHERS_HERE or task not in _ON_THE_DEVICE:
        return None
    if any(key.split(".")[0] == "trainer" for key in _swept_keys(config)):
        return None  # jobs may differ in their accelerator: those on the CPU can run
    import torch

    # device_count asks NVML first, so CUDA is not initialised here, before a job's CUDA_VISIBLE_DEVICES is set
    if torch.cuda.device_count() > 0:
        return None
    from bamba_ft.jobs.runtime import no_gpu_message

    return no_gpu_message(str(OmegaConf.select(config, "trainer.strategy")),
                          f", and this sweep's jobs run on this machine ({launcher}): every job would fail on it")


def _uses_joblib(config: DictConfig) -> bool:
    return "JoblibLauncher" in str(OmegaConf.select(config, "hydra.launcher._target_", default=""))


class GpuSlots(Callback):
    """Pins each job of a joblib-launched sweep to its own GPUs (sweep.gpus_per_job of them); does nothing else."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        per_job = int(OmegaConf.select(config, "sweep.gpus_per_job"))
        if not _uses_joblib(config) or per_job == 0:
            return
        slots = len(visible_gpus()) // per_job
        n_jobs = int(config.hydra.launcher.n_jobs)
        if slots and (n_jobs < 1 or n_jobs > slots):
            refuse(ConfigError(
                f"hydra.launcher.n_jobs={n_jobs} starts more parallel jobs than there are GPU slots ({slots}: "
                f"{len(visible_gpus())} GPUs, sweep.gpus_per_job={per_job}).\nFix: hydra.launcher.n_jobs={slots}."))

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        per_job = int(OmegaConf.select(config, "sweep.gpus_per_job"))
        if not _uses_joblib(config) or per_job == 0:
            return
        if not _claimed:
            gpus = visible_gpus()
            if len(gpus) < per_job:
                return  # no GPUs to share out (a CPU machine): nothing to pin
            try:
                slot, fd, devices = claim_slot(Path(config.hydra.sweep.dir) / ".gpu_slots", gpus, per_job)
            except ConfigError as e:
                refuse(e)
            _claimed.update(slot=slot, fd=fd, devices=devices)
        os.environ[ENV] = _claimed["devices"]
        log.info("job %s: GPU slot %d, %s=%s", config.hydra.job.num, _claimed["slot"], ENV, _claimed["devices"])
