"""Next-token loss that never materialises the full (tokens x vocab) logits.

Only positions with a target go through the LM head, in chunks, each recomputed in backward: Bamba's
128k vocabulary makes logits the largest activation (5k tokens x 128k x 4 bytes = 2.6 GB in float32),
and prompt tokens (no loss in SFT) need no logits at all.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from bamba_ft.data.tokenize import IGNORE_INDEX

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "seq_idx", "cu_seq_lens_q", "cu_seq_lens_k",
                "max_length_q", "max_length_k")


def _chunk_loss(hidden: torch.Tensor, targets: torch.Tensor, head: nn.Module) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


RECOMPUTE_BYTES = 256 * 2**20  # float32 logits of a chunk above this are recomputed in backward, not stored


def head_loss_sum(hidden: torch.Tensor, targets: torch.Tensor, head: nn.Module, chunk: int = 4096) -> torch.Tensor:
    """Sum of cross-entropy over rows of hidden (n, d) against targets (n,), chunked; large chunks recomputed."""
    total = hidden.new_zeros((), dtype=torch.float32)
    vocab = head.weight.shape[0] if hasattr(head, "weight") else head.out_features
    for s in range(0, hidden.shape[0], chunk):
        h, t = hidden[s : s + chunk], targets[s : s + chunk]
        if torch.is_grad_enabled() and h.requires_grad and h.shape[0] * vocab * 4 > RECOMPUTE_BYTES:
            total = total + checkpoint(_chunk_loss, h, t, head, use_reentrant=False)
        else:
            total = total + _chunk_loss(h, t, head)
    return total


def causal_lm(model: nn.Module) -> nn.Module:
    """The BambaForCausalLM inside a peft wrapper, or the model itself."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def loss_sum_and_count(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed next-token loss, number of target tokens) for a packed or padded batch with `labels`."""
    lm = causal_lm(model)
    inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    hidden = lm.model(**inputs, use_cache=False).last_hidden_state
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    return head_loss_sum(hidden[:, :-1][keep], targets[keep], lm.lm_head), keep.sum()


def mean_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    total, count = loss_sum_and_count(model, batch)
    return total / count.clamp(min=1)
