"""Device and precision choices shared by the jobs."""

from __future__ import annotations

import torch

from bamba_ft.errors import ConfigError


def choose_device(accelerator: str) -> torch.device:
    """The device this process computes on: the first CUDA device unless the CPU is asked for or is all there is."""
    if accelerator in ("gpu", "cuda"):
        if not torch.cuda.is_available():
            raise ConfigError("trainer.accelerator=gpu but no CUDA device is visible. Fix: trainer=cpu.")
        return torch.device("cuda", torch.cuda.current_device())
    if accelerator == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto`: bf16 mixed precision on GPUs that have it, full float32 elsewhere."""
    if precision != "auto":
        return precision
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


def autocast_for(model: torch.nn.Module, device: torch.device):  # noqa: ANN201
    """bf16/fp16 autocast on CUDA when the model's weights are 16-bit (as Lightning's mixed precision does)."""
    import contextlib

    dtype = next(model.parameters()).dtype
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
