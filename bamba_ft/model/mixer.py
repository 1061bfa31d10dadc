"""Installs bamba_ft's segment-aware mixer on a loaded model, and says which paths may take packed rows.

Per instance: each Mamba-2 mixer of *this* model gets its family's segment-aware subclass (same parameters,
same state-dict keys; bamba_ft/model/families/), and its norms and MLPs the fused subclasses the family lists;
other models in the process keep transformers' classes.

Packing-safe paths (shown exact by tests/unit/test_packing_equivalence.py and tests/unit/test_families.py):
- the segment-aware mixers, every backend (kernels, torch);
- attention: flash_attention_2 and bamba_ft's `varlen` with `cu_seq_lens_*`; sdpa/eager with the block-diagonal
  mask transformers builds from packed `position_ids`, in the families whose decoder passes them to the mask
  (not granitemoehybrid's).
transformers' own mixer (`model.mixer=hf`) is not packing-safe: its torch path carries conv and SSD state
across sequences, so packed batches are refused there.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from bamba_ft.config.schema import SWITCH, Mixer, ScanStates, canonical_switch
from bamba_ft.errors import ModelError, pick
from bamba_ft.model.families import Family, family_of
from bamba_ft.ops.graphs import ConvScanGraphs
from bamba_ft.ops.kernels import available_backend
from bamba_ft.ops.mamba2 import (
    SegmentAwareMixer,
    conv_scan_params,
    fused_conv_scan_runs,
    resolve_backend,
    seq_idx_from_cu_seqlens,
    seq_idx_from_position_ids,
)

PACKED_ATTENTION = ("varlen", "flash_attention_2", "flash_attention_3")  # read cu_seq_lens_*, ignore masks


def _mixers(model: nn.Module, family: Family) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, family.mixer_class)]


# What each mixer's forward resolves on its inputs' device. kernels too resolves per call (auto): install_mixer
# has checked that the kernels load, and a model still on the CPU (before it is moved) runs torch meanwhile.
_PER_CALL = {Mixer.AUTO: Mixer.AUTO, Mixer.KERNELS: Mixer.AUTO, Mixer.TORCH: Mixer.TORCH}


def install_mixer(model: nn.Module, mixer: str = Mixer.AUTO, cuda_graphs: bool | str = False,
                  device: torch.device | None = None, scan_states: str = ScanStates.AUTO) -> Mixer:
    """Put bamba_ft's mixer on every Mamba-2 mixer of `model` (`model.mixer`); returns the backend that will run
    on `device` (default: the model's; kernels, torch or hf).

    cuda_graphs: the mixers' conv+scan kernels are replayed as CUDA graphs (one `ConvScanGraphs` shared by all):
    true (refused where the fused conv+scan does not run), auto (where it runs) or false.
    scan_states: whether the kernels' scan keeps its chunk states for backward (`model.scan_states`).
    """
    choice = pick({m.value: m for m in Mixer}, mixer, "model.mixer")
    states = _scan_states(scan_states)
    family = family_of(model)
    mixers = _mixers(model, family)
    if choice == Mixer.HF:
        return Mixer.HF
    device = device or next(model.parameters()).device
    if choice == Mixer.KERNELS and available_backend("cuda") == Mixer.TORCH:
        raise ModelError(
            "model.mixer=kernels needs CUDA and the mamba-ssm package (plus causal-conv1d for the fused conv).\n"
            "Fix: install them (README, 'CUDA kernels'), or use model.mixer=auto."
        )
    for m in mixers:
        m.__class__ = family.segment_mixer_class
        m.backend = _PER_CALL[choice]
        m.scan_states = states
    for m in model.modules():  # fused elementwise parts (CUDA); they run transformers' forward elsewhere
        if type(m) in family.fused:
            m.__class__ = family.fused[type(m)]
    for base in (m for m in model.modules() if isinstance(m, family.base_model_class)):
        base.register_forward_pre_hook(_complete_packing_kwargs, with_kwargs=True)
    backend = resolve_backend(_PER_CALL[choice], device)
    graphs_mode = pick({v: v for v in SWITCH}, canonical_switch(cuda_graphs), "model.cuda_graphs")
    fused = bool(mixers) and all(fused_conv_scan_runs(m, backend) for m in mixers)
    if graphs_mode == "true" or (graphs_mode == "auto" and fused):
        if not fused:
            raise ModelError(
                f"model.cuda_graphs=true replays the fused CUDA conv+scan, which this run does not use (mixer "
                f"backend {backend} on {device.type}).\n"
                "Fix: set model.cuda_graphs=false, or run on a GPU with mamba-ssm and causal-conv1d installed."
            )
        graphs = ConvScanGraphs()
        for m in mixers:
            m.conv_scan_graphs = graphs
    return backend


# model.cuda_graphs=auto: the longest packed row (data.max_tokens_per_batch) whose graphs are captured. The graphs'
# buffers hold about 67 KB per token at the Bamba-9B shape, and every 256-token bucket up to it is captured.
GRAPHS_AUTO_MAX_TOKENS = 16384


def why_no_graphs(device: torch.device, packing: bool, longest: int, checkpointing: str, offload: bool,
               processes: int, quant: str) -> str | None:
    """Why model.cuda_graphs=auto leaves the conv+scan graphs off for such a training run, or None where they pay:
    a float8 base (quant.method=fp8), whose kernels are fast enough that without the graphs its CPU holds the GPU
    back, on packed rows of at most GRAPHS_AUTO_MAX_TOKENS on one CUDA device, without checkpointing or offload.
    The bf16 step waits on its kernels instead, and the graphs' copies made it about 3% slower (BENCHMARKS.md);
    checkpointing and offload add device work, and checkpointed layers keep their scan states, which the graphs
    recompute. Distributed runs have not been measured with them."""
    reasons = [
        (device.type != "cuda", f"not a CUDA device ({device.type})"),
        (quant != "fp8", f"quant.method={quant}: the step waits on the GPU, not on launching its kernels"),
        (not packing, "data.packing=false"),
        (longest > GRAPHS_AUTO_MAX_TOKENS, f"data.max_tokens_per_batch={longest} > {GRAPHS_AUTO_MAX_TOKENS}"),
        (checkpointing != "none", f"model.gradient_checkpointing={checkpointing}"),
        (offload, "model.activation_offload=true"),
        (processes > 1, f"{processes} processes"),
    ]
    return next((why for off, why in reasons if off), None)


def graphs_installed(model: nn.Module) -> bool:
    """Whether `model`'s mixers replay their conv+scan as CUDA graphs (model.cuda_graphs)."""
    return any(m.__dict__.get("conv_scan_graphs") is not None for m in model.modules())


def prepare_graphs(model: nn.Module, longest: int, dtype: torch.dtype, rows: int = 1) -> int:
    """Capture the conv+scan CUDA graphs (`model.cuda_graphs`) of every length bucket up to `longest` tokens per
    row, for activations of `dtype`, so that no training step pays for a capture; returns the graphs captured
    (0 when the model's mixers replay none)."""
    done: set[tuple] = set()
    captured = 0
    for m in _mixers(model, family_of(model)):
        graphs = m.__dict__.get("conv_scan_graphs")
        key = (id(graphs), m.conv_dim, m.num_heads, m.head_dim, m.ssm_state_size, m.chunk_size)
        if graphs is None or key in done:
            continue
        done.add(key)
        with torch.no_grad():
            params, rest = conv_scan_params(m)
        captured += graphs.prepare(params, rest, rows, longest, dtype)
    return captured


def _scan_states(value: str) -> ScanStates:
    return pick({s.value: s for s in ScanStates}, value, "model.scan_states")


@contextmanager
def on_mixers(model: nn.Module, **attributes: object) -> Iterator[None]:
    """Inside the block, `model`'s segment-aware mixers carry `attributes`; afterwards what they had before (an
    attribute a mixer did not have is removed again)."""
    mixers = [m for m in model.modules() if isinstance(m, SegmentAwareMixer)]
    before = [{k: m.__dict__[k] for k in attributes if k in m.__dict__} for m in mixers]
    for m in mixers:
        for k, v in attributes.items():
            setattr(m, k, v)
    try:
        yield
    finally:
        for m, had in zip(mixers, before):
            for k in attributes:
                if k in had:
                    setattr(m, k, had[k])
                else:
                    m.__dict__.pop(k, None)


def scan_states(model: nn.Module, policy: str | None) -> contextlib.AbstractContextManager:
    """Inside the block, `model`'s segment-aware mixers follow `policy` (a `model.scan_states` value; None: as
    installed)."""
    return contextlib.nullcontext() if policy is None else on_mixers(model, scan_states=_scan_states(policy))


@contextmanager
def stock_forward(model: nn.Module) -> Iterator[None]:
    """Run transformers' own mixer, norms and MLPs inside the block (to compare with a model loaded elsewhere)."""
    stock = family_of(model).stock_classes
    swapped = [(m, type(m)) for m in model.modules() if type(m) in stock]
    for m, ours in swapped:
        m.__class__ = stock[ours]
    try:
        yield
    finally:
        for m, ours in swapped:
            m.__class__ = ours


def packing_safe(model: nn.Module) -> bool:
    """True when every Mamba mixer and the attention of `model` keep packed sequences apart."""
    family = family_of(model)
    mixers = _mixers(model, family)
    if not mixers or not all(isinstance(m, SegmentAwareMixer) for m in mixers):
        return False
    return unsafe_attention(model) is None


def unsafe_attention(model: nn.Module) -> str | None:
    """The attention implementation that would let packed sequences see each other in this family, or None."""
    attn = getattr(_config(model), "_attn_implementation", None)
    return None if family_of(model).packed_masks or attn in PACKED_ATTENTION else attn


def _config(model: nn.Module):  # noqa: ANN202
    return model.get_base_model().config if hasattr(model, "get_base_model") else model.config


def _complete_packing_kwargs(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """Fill in `seq_idx` (and varlen attention lengths) for packed rows given only some of the keys.

    transformers' DataCollatorWithFlattening can leave out `seq_idx`; without it the mixer would treat the row
    as one sequence. Rows with a cache (generation) or a padding mask are left alone.
    """
    if kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
        return None
    if kwargs.get("seq_idx") is not None:
        return None
    position_ids, cu = kwargs.get("position_ids"), kwargs.get("cu_seq_lens_q")
    if cu is not None:
        ids = kwargs.get("input_ids")
        total = ids.shape[1] if ids is not None else kwargs["inputs_embeds"].shape[1]
        kwargs["seq_idx"] = seq_idx_from_cu_seqlens(cu, total)
    elif position_ids is not None and kwargs.get("attention_mask") is None:
        seq_idx = seq_idx_from_position_ids(position_ids)
        if bool((seq_idx[:, -1] > 0).any()):
            kwargs["seq_idx"] = seq_idx
            if position_ids.shape[0] == 1:
                starts = torch.nonzero(torch.diff(seq_idx[0], prepend=seq_idx[0, :1] - 1)).flatten()
                cu = torch.cat([starts, starts.new_tensor([seq_idx.shape[1]])]).to(torch.int32)
                longest = int(torch.diff(cu).max())
                kwargs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)
    else:
        return None
    return args, kwargs
