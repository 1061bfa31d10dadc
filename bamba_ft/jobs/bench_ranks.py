"""`recipe=bench` on several GPUs (torchrun): data parallel scaling of the variants' training steps.

Every rank builds the variant's model on the GPU of its local rank and times the same steps as one GPU would,
each step's gradients all-reduced by torch's DistributedDataParallel (overlapping backward, as Lightning's DDP
does in training). All ranks train on the same batches: the work per GPU then equals a one-GPU run's, so
per-GPU tokens/s at N GPUs over one GPU's is the scaling efficiency. Rank 0 gathers every rank's row and reports
tokens/s per GPU (the mean over ranks) and peak memory per GPU (the largest).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch import nn

from bamba_ft.config.schema import BenchConfig, torchrun_world_size
from bamba_ft.errors import ConfigError


def world_size() -> int:
    """Processes of this benchmark (torchrun and SLURM's srun set WORLD_SIZE)."""
    world = torchrun_world_size()
    return 1 if world is None else world


def check_distributed(b: BenchConfig) -> None:
    """The sweeps and the profile run one process; several ranks measure the variants table only."""
    sweeps = {"bench.token_budgets": b.token_budgets, "bench.seq_scaling": b.seq_scaling,
              "bench.data_pipeline_examples": b.data_pipeline_examples, "bench.mixer_only": b.mixer_only,
              "bench.layer_parts": b.layer_parts, "bench.profile": b.profile}
    on = [k for k, v in sweeps.items() if v]
    if world_size() > 1 and on:
        raise ConfigError(f"{', '.join(on)} with {world_size()} ranks: the sweeps and the profile measure one GPU.\n"
                          "Fix: run them without torchrun, or leave them unset for the multi-GPU scaling run.")


def start(device: torch.device) -> None:
    import torch.distributed as dist

    if world_size() > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)


def stop() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


class _LossStep(nn.Module):
    """`loss_fn(model, batch)` as a module's forward: DDP prepares its gradient hooks in its forward."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module, dict], torch.Tensor]) -> None:
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch: dict) -> torch.Tensor:
        return self.loss_fn(self.model, batch)


_wrapped: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {loss_fn: its DDP step}


def step_module(model: nn.Module, loss_fn: Callable, device: torch.device, find_unused: bool) -> nn.Module:
    """What a timed step calls with the batch: the loss, through DDP when several ranks run.

    A model serves several measurements (repeats, memory modes): it is wrapped once, since every DDP wrapper adds
    its own gradient hooks. `find_unused`: transformers' fused path leaves out_proj adapters without gradient.
    """
    if world_size() == 1:
        return _LossStep(model, loss_fn)
    per_model = _wrapped.setdefault(model, {})
    if loss_fn not in per_model:
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        per_model[loss_fn] = DistributedDataParallel(_LossStep(model, loss_fn), device_ids=ids,
                                                     find_unused_parameters=find_unused)
    return per_model[loss_fn]


def gather(row: dict) -> list[dict] | None:
    """Every rank's row, on rank 0 (None elsewhere); the row itself with one rank."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return [row]
    rows: list[dict] | None = [{} for _ in range(dist.get_world_size())] if dist.get_rank() == 0 else None
    dist.gather_object(row, rows, dst=0)
    return rows
