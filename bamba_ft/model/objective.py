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


def loss_sum_and_count(model: nn.Module, batch: dict, router_aux: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed next-token loss, number of target tokens) for a packed or padded batch with `labels` (and, from the
    collators, `loss_index`).

    `router_aux` (training): an MoE model whose config sets output_router_logits also gets its routers'
    load-balancing loss times router_aux_loss_coef, as its ForCausalLM adds it to the mean loss; here it is added
    once per target token, so the sum over the targets gives that mean (and a step of several micro-batches the
    mean of their auxiliary losses weighted by their targets). Validation leaves it out: val/loss stays the
    next-token loss its perplexity is read from."""
    lm = causal_lm(model)
    family = family_for(lm.config.model_type)
    aux = router_aux and family.router_aux_loss is not None and bool(getattr(lm.config, "output_router_logits", False))
    out = lm.model(**model_inputs(lm, batch), use_cache=False, **({"output_router_logits": True} if aux else {}))
    hidden = out.last_hidden_state
    labels = batch["labels"]
    index = batch.get(LOSS_INDEX)
    if index is None:  # a batch built elsewhere: found on its device (which syncs once)
        index = loss_index(labels)
    rows = hidden.flatten(0, 1).index_select(0, index)
    targets = labels.flatten().index_select(0, index + 1)
    scale = family.logit_scale(lm.config)  # Granite divides, Falcon-H1 multiplies
    total = head_loss_sum(rows, targets, lm.lm_head, scale=scale)
    if aux:
        mask = batch.get("attention_mask")  # padded rows' mask; a packed row has none (or model_inputs' dict)
        balance = family.router_aux_loss(lm.config, out.router_logits, mask if isinstance(mask, torch.Tensor) else None)
        total = total + (lm.config.router_aux_loss_coef * index.numel()) * balance.to(total.dtype)
    return total, index.new_full((), index.numel())


def mean_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    total, count = loss_sum_and_count(model, batch)
    return total / count.clamp(min=1)
