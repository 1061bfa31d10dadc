"""The next-token loss of a built model: its decoder's hidden states at the labelled positions go through the
chunked LM-head loss of ops/loss.py, with the logit scale of the model's family.

A training step should never wait for the GPU in the middle: the host queues kernels only a little faster than
the GPU runs them (a Bamba-9B step on an H200), so every device-to-host sync costs the lead the host had built
up. The collators' `loss_index` selects the loss's rows without one, and a packed row's masks are handed to the
model ready-made, so transformers does not look for packed sequences with a sync of its own.
"""

from __future__ import annotations

import torch
from torch import nn

from bamba_ft.data.packing import LOSS_INDEX, loss_index
from bamba_ft.model.families import family_for
from bamba_ft.model.mixer import PACKED_ATTENTION
from bamba_ft.ops.loss import causal_lm, head_loss_sum

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "seq_idx", "cu_seq_lens_q", "cu_seq_lens_k",
                "max_length_q", "max_length_k")


def model_inputs(lm: nn.Module, batch: dict) -> dict:
    """The model's keyword arguments from a batch. A packed row attended by cu_seq_lens gets its (empty) masks
    ready-made: what transformers would build for it, but without its packed-sequence check, which syncs."""
    inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    if ("cu_seq_lens_q" in inputs and inputs.get("attention_mask") is None
            and getattr(lm.config, "_attn_implementation", None) in PACKED_ATTENTION):
        inputs["attention_mask"] = {"full_attention": None, "linear_attention": None}
    return inputs


def loss_sum_and_count(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed next-token loss, number of target tokens) for a packed or padded batch with `labels` (and, from the
    collators, `loss_index`)."""
    lm = causal_lm(model)
    hidden = lm.model(**model_inputs(lm, batch), use_cache=False).last_hidden_state
    labels = batch["labels"]
    index = batch.get(LOSS_INDEX)
    if index is None:  # a batch built elsewhere: found on its device (which syncs once)
        index = loss_index(labels)
    rows = hidden.flatten(0, 1).index_select(0, index)
    targets = labels.flatten().index_select(0, index + 1)
    scale = family_for(lm.config.model_type).logit_scale(lm.config)  # Granite divides, Falcon-H1 multiplies
    return head_loss_sum(rows, targets, lm.lm_head, scale=scale), index.new_full((), index.numel())


def mean_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    total, count = loss_sum_and_count(model, batch)
    return total / count.clamp(min=1)
