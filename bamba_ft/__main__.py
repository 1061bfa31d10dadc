"""`python -m bamba_ft [recipe=NAME] [key=value ...]`: compose the config, validate it, run its task."""

from __future__ import annotations

import errno
import importlib
import logging
import os
import sys

from bamba_ft import quiet

quiet.silence_import_noise()

import hydra  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from bamba_ft.config.overrides import check_overrides, in_sweep, to_run_config  # noqa: E402
from bamba_ft.config.schema import TASK_JOBS  # noqa: E402
from bamba_ft.config.store import config_dirs, register_configs  # noqa: E402
from bamba_ft.errors import BambaFTError  # noqa: E402
from bamba_ft.jobs import lock  # noqa: E402

log = logging.getLogger("bamba_ft")


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
DIVERGED_EXIT = 3  # training ended with a non-finite loss or weights (the summary says which)


def run_config(cfg: DictConfig) -> dict:
    """Validate the composed config and run its task; return what the task returns (a train run: its metrics)."""
    typed = to_run_config(cfg)  # validated: typed.task is a key of TASK_JOBS
    from bamba_ft.jobs.runtime import refuse_several_ranks

    refuse_several_ranks(typed.task)  # before any work: eval, generate and export run in one process
    job = importlib.import_module(TASK_JOBS[typed.task])
    quiet.lightning_through_root()  # imported by now, after Hydra configured logging
    if not lock.launching_process():
        quiet.ranks_above_zero()
    return job.run(typed)


def run_task(cfg: DictConfig) -> float | None:
    """Hydra's task function. In a sweep (`-m`) it returns the job's objective (sweep.objective) to the sweeper."""
    if in_sweep():
        from bamba_ft.jobs.sweep_job import run_sweep_job

        return run_sweep_job(cfg, run_config)
    debug = bool(OmegaConf.select(cfg, "debug", default=False)) or os.environ.get("BAMBA_FT_DEBUG") == "1"
    try:
        result = run_config(cfg)
    except BambaFTError as e:
        if debug:
            raise
        who = "bamba_ft" if lock.launching_process() else f"bamba_ft [{quiet.rank_label()}]"  # each rank says it
        print(f"\n{who}: {type(e).__name__}: {e}\n(set debug=true for the full traceback)", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        if debug or e.errno not in _DISK_FULL:
            raise
        print(f"\nbamba_ft: {e.strerror} while writing {e.filename or 'the run directory'}.\n"
              f"Nothing half-written is kept under a final name. Free space (or set hydra.run.dir to a larger disk), "
              f"then resume: the same command plus trainer.resume={OmegaConf.select(cfg, 'output_dir')}", file=sys.stderr)
        sys.exit(2)
    if isinstance(result, dict) and "stopped_at" in result:
        from bamba_ft.jobs.callbacks import STOPPED_EXIT

        sys.exit(STOPPED_EXIT.get(result.get("signal", ""), 143))
    if isinstance(result, dict) and result.get("diverged"):
        sys.exit(DIVERGED_EXIT)  # a script chaining an export on this run must not take it for a success
    return None


def main() -> None:
    register_configs()
    try:
        check_overrides(sys.argv[1:])
    except BambaFTError as e:
        print(f"bamba_ft: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(2)
    conf_dir = str(config_dirs()[0])
    try:
        hydra.main(config_path=conf_dir, config_name="train", version_base="1.3")(run_task)()
    except KeyboardInterrupt:
        # Ctrl-C in training is a graceful stop (GracefulStop saves interrupted.ckpt and exits 130); one that comes
        # before it is installed (loading the model, preparing data, the gradient probe) ends the command here.
        if "debug=true" in sys.argv[1:] or os.environ.get("BAMBA_FT_DEBUG") == "1":
            raise
        print("\nbamba_ft: interrupted (Ctrl-C); stopped without saving anything new. A training run's checkpoints "
              "written earlier, if any, are kept: resume with trainer.resume=<run dir>.", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
