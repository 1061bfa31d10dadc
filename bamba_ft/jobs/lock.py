"""One live process per run directory: an advisory lock (flock) held for the whole run.

The kernel drops the lock when its process ends, however it ends, so a crashed run never leaves a stale
lock behind; the lock file only names the owner for the message a second process shows.
"""

from __future__ import annotations

import fcntl
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from bamba_ft.errors import ConfigError
from bamba_ft.jobs.report import output_path_problem

LOCK_NAME = ".bamba_ft.lock"
_held: dict[Path, int] = {}  # run directory -> open file descriptor holding its lock (for this process's life)


def launching_process() -> bool:
    """False in the processes a distributed launcher starts for ranks > 0: they share rank 0's directory."""
    return all(int(os.environ.get(v, "0")) == 0 for v in ("RANK", "LOCAL_RANK", "NODE_RANK"))


def acquire(run_dir: Path) -> None:
    """Lock `run_dir` for this process, or raise a ConfigError naming the process that holds it."""
    run_dir = run_dir.resolve()
    if run_dir in _held or not launching_process():
        return
    if problem := output_path_problem(run_dir, f"the run directory {run_dir} (hydra.run.dir)", directory=True):
        raise ConfigError(problem)
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = os.pread(fd, 512, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise ConfigError(
            f"{run_dir} is in use by a live bamba_ft run ({owner}); two runs writing one directory would mix "
            "their checkpoints and metrics.\nFix: let it finish or stop it, or give this run its own directory "
            "(leave hydra.run.dir at its default, or pick another)."
        ) from None
    os.ftruncate(fd, 0)
    command = " ".join(sys.argv[1:])[:300]
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                  f"python -m bamba_ft {command}\n".encode(), 0)
    _held[run_dir] = fd


def release(run_dir: Path) -> None:
    fd = _held.pop(run_dir.resolve(), None)
    if fd is not None:
        os.close(fd)


def held_elsewhere(run_dir: Path) -> bool:
    """True when another live process holds `run_dir`'s lock."""
    run_dir = run_dir.resolve()
    path = run_dir / LOCK_NAME
    if run_dir in _held or not path.exists():
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops a lock taken just now


def refuse_to_write_over_a_run(run_dir: Path, task: str, resuming: bool) -> None:
    """A training run's directory takes only a resume of it (checked when the run starts, as it knows which
    checkpoint it resumes) or tasks that write elsewhere; anything else would replace its results."""
    from bamba_ft.jobs.checkpoints import refuse_earlier_run
    from bamba_ft.rundir import RunDir

    if task == "train":
        if not resuming:
            refuse_earlier_run(run_dir, None)
        return
    if found := RunDir(run_dir).training_run():
        raise ConfigError(f"{run_dir} holds a training run ({', '.join(found[:3])}); task={task} would write its "
                          "own outputs and .hydra/ files over the run's.\nFix: leave hydra.run.dir at its default "
                          "(eval.checkpoint / export.checkpoint read the run where it is), or choose another directory.",
                          "hydra.run.dir")


def refuse(error: ConfigError) -> None:
    """Print a user error and exit 2 from a Hydra callback (Hydra turns a callback's exception into a warning)."""
    print(f"bamba_ft: {type(error).__name__}: {error}", file=sys.stderr)
    sys.exit(2)


class RunLock(Callback):
    """Takes the lock before Hydra writes anything into the run directory (its .hydra/ files, the log)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        run_dir = Path(str(OmegaConf.select(config, "hydra.run.dir")))
        try:
            acquire(run_dir)
            if launching_process():  # before Hydra writes its .hydra/ files there
                refuse_to_write_over_a_run(run_dir, str(OmegaConf.select(config, "task")),
                                           OmegaConf.select(config, "trainer.resume") is not None)
        except ConfigError as e:
            refuse(e)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:  # each job of a sweep
        try:
            acquire(Path(str(config.hydra.runtime.output_dir)))
        except ConfigError as e:
            refuse(e)

    def on_job_end(self, config: DictConfig, **kwargs: Any) -> None:
        release(Path(str(config.hydra.runtime.output_dir)))
