"""The training objective selects its rows and builds a packed row's masks without syncing with the device, and
gives exactly what the plain boolean selection and transformers' own mask building give (float64)."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import masking_utils

from bamba_ft.data.packing import LOSS_INDEX, collate_packed, collate_padded, loss_index
from bamba_ft.data.tokenize import IGNORE_INDEX
from bamba_ft.model.mixer import install_mixer
from bamba_ft.model.objective import loss_sum_and_count, model_inputs
from bamba_ft.ops.attention import VARLEN, register_varlen_attention
from bamba_ft.ops.loss import head_loss_sum
from tests.conftest import LORA_TARGETS, make_model

X = IGNORE_INDEX


def test_loss_index_marks_the_tokens_whose_next_token_is_a_target() -> None:
    labels = torch.tensor([[X, 5, 6, X, X, 7],
                           [X, X, 8, 9, X, X]])
    # (row, token) -> flat row * 6 + token, for each token followed by a target
    assert loss_index(labels).tolist() == [0, 1, 4, 7, 8]


def examples(seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n, prompt in [(9, 3), (1, 0), (14, 6), (5, 5)]:  # a length-1 sequence, and one with no target at all
        ids = torch.randint(1, 256, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [X] * max(prompt, 1) + ids[max(prompt, 1):]})
    return out


def lora_model(attn: str) -> torch.nn.Module:
    if attn == VARLEN:
        register_varlen_attention()
    model = make_model(torch.float64, seed=0, attn=attn)
    install_mixer(model, "torch")
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-zero B, so every adapter tensor gets a gradient
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)
    return model.double()


def boolean_selection(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: the target rows picked by a boolean mask (what the loss did before `loss_index`)."""
    lm = model.get_base_model()
    hidden = lm.model(**model_inputs(lm, batch), use_cache=False).last_hidden_state
    keep = batch["labels"][:, 1:] != X
    return head_loss_sum(hidden[:, :-1][keep], batch["labels"][:, 1:][keep], lm.lm_head), keep.sum()


def loss_and_grads(model: torch.nn.Module, batch: dict,
                   loss=loss_sum_and_count) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:  # noqa: ANN001
    model.zero_grad(set_to_none=True)
    total, count = loss(model, batch)
    (total / count).backward()
    return total.detach(), count, [p.grad.clone() for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("collate", ["packed", "padded", "left_padded"])
def test_loss_index_gives_what_the_boolean_selection_gives(collate: str) -> None:
    model = lora_model(VARLEN)
    batch = {"packed": collate_packed, "padded": lambda e: collate_padded(e, pad_id=0),
             "left_padded": lambda e: collate_padded(e, pad_id=0, left=True)}[collate](examples())
    assert LOSS_INDEX in batch
    with_index = loss_and_grads(model, batch)
    without = loss_and_grads(model, {k: v for k, v in batch.items() if k != LOSS_INDEX})  # found from the labels
    plain = loss_and_grads(model, batch, boolean_selection)
    assert int(with_index[1]) == int(without[1]) == int(plain[1]) == sum(len(e["input_ids"]) - max(1, e["labels"].count(X))
                                                     for e in examples())
    for got in (with_index, without):
        torch.testing.assert_close(got[0], plain[0], rtol=1e-13, atol=0)
        for a, b in zip(got[2], plain[2], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-15)


def test_a_batch_without_targets_gives_zero_loss_and_count() -> None:
    model = lora_model(VARLEN)
    rows = examples()
    batch = collate_packed([{**e, "labels": [X] * len(e["labels"])} for e in rows])
    assert batch[LOSS_INDEX].numel() == 0
    total, count = loss_sum_and_count(model, batch)
    assert float(total) == 0.0 and int(count) == 0


def test_a_packed_row_attended_by_seq_lens_skips_transformers_packed_sequence_search(monkeypatch) -> None:  # noqa: ANN001
    """transformers looks for packed sequences in position_ids with a device sync; a row whose attention takes
    cu_seq_lens gets its masks ready-made instead, and gives the same loss."""
    model = lora_model(VARLEN)
    batch = collate_packed(examples())
    want = loss_sum_and_count(model, batch)[0].detach()
    inputs = model_inputs(model.get_base_model(), batch)
    assert inputs["attention_mask"] == {"full_attention": None, "linear_attention": None}

    def searched(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("transformers searched the packed row for its sequences")

    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", searched)
    torch.testing.assert_close(loss_sum_and_count(model, batch)[0].detach(), want, rtol=1e-13, atol=0)


def test_masks_are_left_to_transformers_where_attention_needs_them() -> None:
    varlen, sdpa = lora_model(VARLEN).get_base_model(), lora_model("sdpa").get_base_model()
    packed, padded = collate_packed(examples()), collate_padded(examples(), pad_id=0)
    assert "attention_mask" not in model_inputs(sdpa, packed)  # sdpa needs the block-diagonal mask transformers builds
    assert model_inputs(varlen, padded)["attention_mask"] is padded["attention_mask"]
