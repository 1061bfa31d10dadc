"""Device and precision choices shared by the jobs."""

from __future__ import annotations

import os
from typing import Any

import torch

from bamba_ft.config.schema import torchrun_world_size
from bamba_ft.errors import ConfigError


def local_rank() -> int:
    """This process's index among the processes of its node (torchrun, SLURM and Lightning's launcher set it)."""
    for var in ("LOCAL_RANK", "SLURM_LOCALID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


ONE_PROCESS_TASKS = ("eval", "generate", "export")  # read a model and write their results once, in one process


def launched_ranks(environ: dict[str, str] | None = None) -> int:
    """How many processes a distributed launcher started for this command (torchrun sets WORLD_SIZE, srun
    SLURM_STEP_NUM_TASKS); 1 for a plain `python -m bamba_ft`. A rank above 0 counts as several."""
    env = os.environ if environ is None else environ
    tasks = env.get("SLURM_STEP_NUM_TASKS", "")
    counts = [n for n in (torchrun_world_size(env), int(tasks) if tasks.isdigit() else None) if n is not None]
    above_zero = any(env.get(v, "0").isdigit() and int(env.get(v, "0")) > 0
                     for v in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))
    return max([*counts, 2 if above_zero else 1])


def refuse_several_ranks(task: str, environ: dict[str, str] | None = None) -> None:
    """recipe=eval, generate and export run in one process. Started by torchrun or srun, every rank ran the whole
    task: each evaluated the same rows again and wrote the same metrics.json, predictions or export directory, and
    an export's ranks removed each other's half-written copy or found the other's finished one and failed on it
    (`export.output_dir exists`), so the command failed although an export had been written."""
    ranks = launched_ranks(environ)
    if task in ONE_PROCESS_TASKS and ranks > 1:
        raise ConfigError(f"recipe={task} runs in one process, and a launcher started {ranks} ranks of it (torchrun "
                          f"or srun with several tasks): each would run all of it and write its results again, "
                          f"over the others'.\nFix: start it without torchrun or srun's tasks: python -m bamba_ft "
                          f"recipe={task} ... (several ranks are for training: trainer.devices, trainer.strategy).")


def no_gpu_message(strategy: str, consequence: str = "") -> str:
    """trainer.accelerator=gpu on a machine without a visible CUDA device: the problem, `consequence`, the fix."""
    several = "fsdp" if strategy == "fsdp" else "ddp"  # the strategy asked for, on CPU processes
    return (f"trainer.accelerator=gpu but no CUDA device is visible{consequence}. Fix: trainer=cpu (for several "
            f"CPU processes over gloo: trainer=cpu trainer.strategy={several} trainer.devices=N).")


def choose_device(accelerator: str, devices: Any = "auto", strategy: str = "auto") -> torch.device:
    """The device this process computes on, chosen as Lightning will choose it.

    Each rank of a multi-GPU run takes the GPU of its local rank (or the local-rank-th entry of a `devices` list),
    from the first tensor on; the model, the gradient probe and the packing check run there, not on GPU 0.
    """
    if accelerator in ("gpu", "cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(no_gpu_message(strategy))
    elif accelerator == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    rank, count = local_rank(), torch.cuda.device_count()
    ids = [int(d) for d in devices] if isinstance(devices, (list, tuple)) else list(range(count))
    if rank >= len(ids) or ids[rank] >= count:
        raise ConfigError(
            f"local rank {rank} has no GPU: trainer.devices={devices!r} and {count} visible. "
            "Fix: start at most one process per visible GPU (torchrun --nproc-per-node, or trainer.devices)."
        )
    device = torch.device("cuda", ids[rank])
    torch.cuda.set_device(device)
    return device


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto`: bf16 mixed precision on GPUs that have it, full float32 elsewhere."""
    if precision == "16-mixed" and device.type != "cuda":
        # Lightning would switch to bf16-mixed with a warning, while the run reports float16
        raise ConfigError(f"trainer.precision=16-mixed: float16 mixed precision runs on CUDA only, not on {device.type}."
                          "\nFix: trainer.precision=bf16-mixed, or 32-true (full float32).")
    if precision != "auto":
        return precision
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The dtype Lightning's autocast computes in under a resolved `precision` (bf16-mixed, 16-mixed); None for the
    full and *-true precisions, which compute in the weights' dtype."""
    return {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)


def autocast_for(model: torch.nn.Module, device: torch.device):  # noqa: ANN201
    """bf16/fp16 autocast on CUDA when the model's weights are 16-bit (as Lightning's mixed precision does)."""
    import contextlib

    dtype = next(model.parameters()).dtype
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def exit_status_of(returncode: int) -> int:
    """The shell's exit status for a child process's `returncode` (negative: killed by that signal)."""
    return 128 - returncode if returncode < 0 else returncode


def exit_as_a_failed_rank() -> None:
    """When a rank that Lightning's launcher started ends with a non-zero status, the launcher's watcher kills the
    other ranks and then the launching process with SIGKILL, so the command ended with 137 whatever the rank said:
    a data error (2) or a Ctrl-C (130) that reached a rank first read as a crash. The watcher now ends the launching
    process with the failed rank's status instead, after saying which rank it was (that rank printed why)."""
    import sys

    from lightning.fabric.strategies.launchers import subprocess_script

    observer = getattr(subprocess_script, "_ChildProcessObserver", None)
    if observer is None or getattr(observer, "_bamba_ft", False):
        return

    def terminate_all(self: Any) -> None:
        failed = next((p for p in self._child_processes if p.returncode), None)
        for p in self._child_processes:
            if p.returncode is None:
                p.send_signal(self._termination_signal)
        status = exit_status_of(failed.returncode) if failed is not None else 1
        print(f"\nbamba_ft: a rank above 0 (pid {failed.pid if failed else '?'}) ended with status {status}; this "
              "run stops with it.", file=sys.stderr, flush=True)
        os._exit(status)

    observer._terminate_all = terminate_all
    observer._bamba_ft = True
