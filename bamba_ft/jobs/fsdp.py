"""trainer.strategy=fsdp: FSDP2 (`fully_shard`) through Lightning's ModelParallelStrategy, with bamba_ft's checkpoints.

The mesh has one dimension over every rank: each holds 1/N of every weight, gradient and optimizer state. The
model is sharded and loaded in the LightningModule's `configure_model` (bamba_ft/model/shard.py).

A checkpoint is a directory (torch.distributed.checkpoint): each rank's shards of the trainable tensors and of
the optimizer state, and `meta.pt` with the rest (loops, data position, the run's config). It is written under
`.NAME.partial` and renamed into place, as checkpoint files are, and loads onto any number of ranks: the
shards are re-cut to the mesh that reads them.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy

from bamba_ft.errors import ConfigError
from bamba_ft.faults import fault_point
from bamba_ft.jobs.checkpoints import replace_path
from bamba_ft.model.restore import SHARDED_META, checkpoint_state, is_sharded, read_sharded


class ShardedStrategy(ModelParallelStrategy):
    """Fully sharded data parallel over all ranks (no tensor parallelism)."""

    def __init__(self) -> None:
        super().__init__(save_distributed_checkpoint=True)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()

    @property
    def shard_mesh(self):  # noqa: ANN201
        """The mesh `fully_shard` shards over: every rank."""
        return self.device_mesh["data_parallel"]

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        path = Path(self.broadcast(str(filepath)))
        tmp = path.with_name(f".{path.name}.partial")
        if self.is_global_zero and tmp.exists():
            shutil.rmtree(tmp)
        self.barrier()
        super().save_checkpoint(checkpoint, tmp, storage_options)  # every rank its shards, rank 0 also meta.pt
        self.barrier()
        if self.is_global_zero:
            with open(tmp / SHARDED_META, "rb") as f:  # the shard files are synced by their writer
                os.fsync(f.fileno())
            fault_point("checkpoint.before_rename")
            replace_path(tmp, path)
        self.barrier()

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """The trainable tensors and optimizer state into this rank's shards; returns the rest of the state."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        path = Path(self.broadcast(str(checkpoint_path)))
        if not is_sharded(path):
            raise ConfigError(f"trainer.resume: {path} is a checkpoint file from a run without trainer.strategy=fsdp; "
                              "its tensors are not sharded.\nFix: resume it with the strategy it was written with.")
        module = self.lightning_module
        trainable = module.trainable_keys()
        state = {k: v for k, v in get_model_state_dict(self.model).items() if k in trainable}
        read_sharded(path, state)
        set_model_state_dict(self.model, state, options=StateDictOptions(strict=False))
        for i, optimizer in enumerate(self.optimizers):
            key = f"optimizer_{i}"
            optim_state = {key: get_optimizer_state_dict(self.model, optimizer)}
            dcp.load(optim_state, checkpoint_id=str(path))
            set_optimizer_state_dict(self.model, optimizer, optim_state[key])
        return checkpoint_state(path)


def storage_dtype(model_dtype: str, precision: str, device: torch.device) -> torch.dtype | None:
    """The dtype sharded parameters are kept in: float32 under bf16 mixed precision with model.dtype=auto (FSDP's
    policy gathers them in bf16 to compute, so the optimizer updates float32 master weights); else None, the
    dtype model.dtype names."""
    if model_dtype == "auto" and device.type == "cuda" and precision == "bf16-mixed":
        return torch.float32
    return None
