"""Attention over packed rows for Bamba's few attention layers.

`varlen` attends within each sequence of a packed row, located by `cu_seq_lens_*`: on CUDA through torch's
flash-attention varlen kernel (`torch.nn.attention.varlen`); elsewhere the sequences are gathered into a
right-padded (sequences, longest, ...) batch for causal sdpa and scattered back. Neither builds the dense
(tokens x tokens) block-diagonal mask that sdpa would otherwise need (on CPU that mask made attention a third
of a 4k-token step). Rows that are not packed (generation, padded batches) go through plain sdpa.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import logging

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

log = logging.getLogger(__name__)

VARLEN = "varlen"


@functools.cache
def _varlen_fn():  # noqa: ANN202
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


@functools.cache
def _varlen_params() -> frozenset[str]:
    fn = _varlen_fn()
    return frozenset(inspect.signature(fn).parameters) if fn is not None else frozenset()


def varlen_available() -> bool:
    if _varlen_fn() is None or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability()[0] >= 8  # flash kernels: Ampere and newer


def flash_attn_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention interface: q, k, v (batch, heads, tokens, dim) -> (batch, tokens, heads, dim)."""
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    seq_idx = kwargs.get("seq_idx")
    if cu_q is None and attention_mask is None and seq_idx is not None and bool((seq_idx[:, -1] != seq_idx[:, 0]).any()):
        raise ValueError("Packed rows reached attention without cu_seq_lens_q/k; pass them with seq_idx (batch size 1).")
    if cu_q is None or attention_mask is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    if query.shape[0] != 1:
        raise ValueError("varlen attention takes one packed row (batch size 1) with cu_seq_lens_q/k.")
    if dropout:
        raise ValueError("varlen attention has no dropout; set attention_dropout=0.")
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (tokens, heads, dim)
    groups = q.shape[1] // k.shape[1]
    max_q = int(kwargs.get("max_length_q") or int(torch.diff(cu_q).max()))
    if not (query.is_cuda and varlen_available() and query.dtype in (torch.float16, torch.bfloat16)):
        return _padded_sdpa(q, k, v, cu_q, max_q, scaling, groups)[None], None
    extra: dict = {"scale": scaling}
    if groups > 1:
        if "enable_gqa" in _varlen_params():
            extra["enable_gqa"] = True
        else:
            k, v = (t.repeat_interleave(groups, dim=1) for t in (k, v))
    if "window_size" in _varlen_params():
        extra["window_size"] = (-1, 0)  # causal
    else:
        extra["is_causal"] = True
    cu_k = cu_q if cu_k is None else cu_k
    max_k = int(kwargs.get("max_length_k") or max_q)
    out = _varlen_fn()(q, k, v, cu_q.to(torch.int32), cu_k.to(torch.int32), max_q, max_k, **extra)
    return out[None], None


def _padded_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, longest: int, scale: float | None, groups: int
) -> torch.Tensor:
    """Causal attention within each packed sequence via a right-padded batch; (tokens, heads, dim) in and out.

    Right padding is exact under a causal mask: a real query only sees keys at or before it, all real.
    """
    cu = cu.long()
    lengths = torch.diff(cu)
    pos = torch.arange(longest, device=q.device)
    valid = pos[None, :] < lengths[:, None]  # (sequences, longest)
    index = torch.where(valid, cu[:-1, None] + pos[None, :], 0)
    qp, kp, vp = (t[index].transpose(1, 2) for t in (q, k, v))  # (sequences, heads, longest, dim)
    extra = {"enable_gqa": True} if groups > 1 else {}
    out = torch.nn.functional.scaled_dot_product_attention(qp, kp, vp, is_causal=True, scale=scale, **extra)
    return out.transpose(1, 2)[valid]  # sequences are contiguous and in order, so this restores token order


def _varlen_mask(*args, attention_mask: torch.Tensor | None = None, **kwargs):  # noqa: ANN002, ANN003, ANN202
    # Packed and unpadded rows need no mask (cu_seq_lens or is_causal); padded rows fall back to sdpa's mask.
    if attention_mask is None:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def register_varlen_attention() -> None:
    AttentionInterface.register(VARLEN, varlen_attention_forward)
    AttentionMaskInterface.register(VARLEN, _varlen_mask)


def choose_attention(requested: str, device_type: str) -> str:
    """Resolve `model.attn_implementation=auto` to the fastest exact choice for packed rows on this device."""
    if requested != "auto":
        return requested
    if device_type == "cuda" and flash_attn_installed():
        return "flash_attention_2"
    return VARLEN
