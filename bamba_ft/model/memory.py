"""Activation memory: which decoder layers are recomputed in backward, and saved tensors held in host memory.

Checkpointing unit: one whole decoder layer (input norm, Mamba-2 mixer or attention, MLP norm, MLP), run under
`torch.utils.checkpoint` (non-reentrant) by transformers' own per-layer switch: backward keeps only the layer's
input and recomputes the rest. Modes pick the layers: none | all | mamba | attention | every-K. A layer is a
Mamba layer when it holds its family's Mamba-2 mixer and an attention layer when it holds its family's attention
module (Falcon-H1 layers hold both; Nemotron-H MLP/MoE blocks hold neither, so only all and every-K pick them).

Offload: while the training forward runs, torch's `save_on_cpu(pin_memory=True)` hooks move every tensor autograd
saves to pinned host memory and bring it back for backward. Under checkpointing what a checkpointed layer saves
is its input, which `torch.utils.checkpoint` saves outside its own hooks, so the offload hooks receive it.
Parameters and buffers stay where they are: they live on the device anyway, and copying the frozen base weights
out on every step would cost more than all activations of a short row.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
from torch import nn
from torch.autograd.graph import save_on_cpu, saved_tensors_hooks

from bamba_ft.config.schema import RunConfig, checkpointing_problem
from bamba_ft.errors import DeviceMemoryError, ModelError
from bamba_ft.model.families import family_of
from bamba_ft.ops.loss import causal_lm
from bamba_ft.ops.mamba2 import SegmentAwareMixer

log = logging.getLogger(__name__)


def checkpointed_layers(mode: str, is_mamba: list[bool], is_attention: list[bool] | None = None) -> list[int]:
    """Indices of the decoder layers that `mode` checkpoints, given which layers hold a Mamba-2 mixer and which
    hold attention (default: every layer that is not a Mamba layer, as in Bamba and Granite 4.0-H)."""
    problem = checkpointing_problem(mode)
    if problem:
        raise ModelError(problem)
    n = len(is_mamba)
    if is_attention is None:
        is_attention = [not m for m in is_mamba]
    if mode == "none":
        return []
    if mode == "all":
        return list(range(n))
    if mode in ("mamba", "attention"):
        kinds = is_mamba if mode == "mamba" else is_attention
        return [i for i in range(n) if kinds[i]]
    return list(range(0, n, int(mode.removeprefix("every-"))))  # every-K: as transformers' every_n_layers


def apply_checkpointing(model: nn.Module, mode: str) -> list[int]:
    """Checkpoint the decoder layers `mode` names (and no others); returns their indices. May be called again."""
    lm = causal_lm(model)
    layers = lm.model.layers
    family = family_of(lm)
    chosen = checkpointed_layers(mode, *(
        [any(isinstance(m, kind) for m in layer.modules()) for layer in layers]
        for kind in (family.mixer_class, family.attention_class)))
    if chosen and not all(getattr(layer, "_gradient_checkpointing_func", None) for layer in layers):
        # transformers 5.2x renamed the switch; 5.17 only has gradient_checkpointing_enable
        if hasattr(lm, "activation_checkpointing_enable"):
            lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for i, layer in enumerate(layers):
        if not hasattr(layer, "gradient_checkpointing"):
            raise ModelError(f"decoder layer {i} ({type(layer).__name__}) has no per-layer checkpointing switch; "
                             "this transformers version is too old. Fix: model.gradient_checkpointing=none.")
        layer.gradient_checkpointing = i in chosen  # transformers' GradientCheckpointingLayer reads it per call
        for m in layer.modules():
            if isinstance(m, SegmentAwareMixer):
                m.checkpointed = i in chosen  # model.scan_states=auto keeps the scan's states here
    return chosen


class OffloadActivations(saved_tensors_hooks):
    """torch's `save_on_cpu(pin_memory=True)` for everything autograd saves except `model`'s parameters and buffers
    (by storage, so views such as a transposed weight stay too) and tensor subclasses (quantized weights)."""

    def __init__(self, model: nn.Module) -> None:
        device = next(model.parameters()).device
        pin = device.type != "cpu"  # on the CPU the move is a no-op: tensor.cpu() returns the tensor itself
        self.inner = save_on_cpu(pin_memory=pin, device_type=device.type if pin else "cuda")
        self.kept = {_storage(t) for t in (*model.parameters(), *model.buffers())} - {None}
        self.offloaded = self.held = 0  # counts, for tests and logs

        def pack(t: torch.Tensor) -> tuple[bool, object]:
            if type(t) is not torch.Tensor or _storage(t) in self.kept:
                self.held += 1
                return False, t
            self.offloaded += 1
            return True, self.inner.pack_hook(t)

        def unpack(packed: tuple[bool, object]) -> torch.Tensor:
            moved, value = packed
            return self.inner.unpack_hook(value) if moved else value

        super().__init__(pack, unpack)


def _storage(t: torch.Tensor) -> int | None:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # tensors without a plain storage (subclasses, meta)
        return None


@contextlib.contextmanager
def activation_memory(model: nn.Module, offload: bool) -> Iterator[OffloadActivations | None]:
    """The context a training forward runs in: offload hooks when `offload`, else nothing."""
    if not offload:
        yield None
        return
    hooks = OffloadActivations(model)
    with hooks:  # saved_tensors_hooks.__enter__ returns None
        yield hooks


def describe(mode: str, offload: bool) -> str:
    """The memory settings as overrides, for logs and error messages."""
    return f"model.gradient_checkpointing={mode}, model.activation_offload={str(offload).lower()}"


def out_of_memory_error(cfg: RunConfig, where: str, batch: tuple[int, int] | None,
                        error: BaseException, graphs: bool = False) -> DeviceMemoryError:
    """What ran out of memory, under which settings, and the overrides that lower activation memory (and, where the
    model replays its conv+scan as CUDA graphs, `graphs`, turning them off)."""
    m, d = cfg.model, cfg.data
    first = (str(error).strip().splitlines() or [type(error).__name__])[0]
    size = f"{batch[0]:,} tokens, longest sequence {batch[1]:,}" if batch else "size unknown"
    fixes = []
    if m.gradient_checkpointing != "all":
        fixes.append(("model.gradient_checkpointing=all",
                      "keep only each decoder layer's input; recompute the rest in backward (about a third more compute)"))
    if not m.activation_offload:
        fixes.append(("model.activation_offload=true", "hold the saved activations in pinned host memory "
                      "(device-host copies each step)"))
    if d.packing:
        half = max(1, d.max_tokens_per_batch // 2)
        fixes.append((f"data.max_tokens_per_batch={half}", "fewer tokens per batch" + (
            f" (with data.max_seq_len={half}: one sequence of {d.max_seq_len:,} tokens fills a batch)"
            if d.max_seq_len > half else "")))
        limits = f"data.max_tokens_per_batch={d.max_tokens_per_batch}, data.max_seq_len={d.max_seq_len}"
    else:
        fixes.append((f"data.batch_size={max(1, d.batch_size // 2)}", "fewer rows per batch (or a lower data.max_seq_len)"))
        limits = f"padded: data.batch_size={d.batch_size}, data.max_seq_len={d.max_seq_len}"
    if graphs:
        fixes.append(("model.cuda_graphs=false", "no CUDA graphs of the conv+scan: frees their buffers (about 67 KB "
                      "per token of the longest row at the Bamba-9B shape) and their memory pool"))
    width = max(len(k) for k, _ in fixes)
    return DeviceMemoryError(
        f"out of memory in {where} ({first[:200]}).\n"
        f"  batch: {size} ({limits})\n"
        f"  memory mode: {describe(m.gradient_checkpointing, m.activation_offload)}\n"
        "Fix, one or more of:\n" + "\n".join(f"  {k.ljust(width)}  {why}" for k, why in fixes)
    )
