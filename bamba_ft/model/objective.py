"""The next-token loss of a built model: its decoder's hidden states at the labelled positions go through the
chunked LM-head loss of ops/loss.py, with the logit scale of the model's family."""

from __future__ import annotations

import torch
from torch import nn

from bamba_ft.data.tokenize import IGNORE_INDEX
from bamba_ft.model.families import family_for
from bamba_ft.ops.loss import causal_lm, head_loss_sum

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "seq_idx", "cu_seq_lens_q", "cu_seq_lens_k",
                "max_length_q", "max_length_k")


def loss_sum_and_count(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed next-token loss, number of target tokens) for a packed or padded batch with `labels`."""
    lm = causal_lm(model)
    inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    hidden = lm.model(**inputs, use_cache=False).last_hidden_state
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    scale = family_for(lm.config.model_type).logit_scale(lm.config)  # Granite divides, Falcon-H1 multiplies
    return head_loss_sum(hidden[:, :-1][keep], targets[keep], lm.lm_head, scale=scale), keep.sum()


def mean_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    total, count = loss_sum_and_count(model, batch)
    return total / count.clamp(min=1)
