"""recipe=preview: the data as training reads it, before any model loads: the counts and warnings of preparing
it, then the first batch's sequences decoded with their special tokens, the tokens that carry loss marked."""

from __future__ import annotations

import logging
import sys
from typing import Any

from transformers import PreTrainedTokenizerBase

from bamba_ft.config.schema import RunConfig
from bamba_ft.data.module import BambaDataModule
from bamba_ft.data.stream import STREAM_KEY
from bamba_ft.data.templates import FALLBACK, end_of_turn_text, ensure_chat_template, stop_token_ids
from bamba_ft.data.tokenize import IGNORE_INDEX
from bamba_ft.errors import DataError
from bamba_ft.model.build import load_tokenizer

log = logging.getLogger(__name__)

OPEN, CLOSE = "[[", "]]"  # around the tokens with loss, where the console shows no colour
GREEN, RESET = "\033[32m", "\033[0m"


def sequences(batch: dict[str, Any]) -> list[tuple[list[int], list[int]]]:
    """(token ids, labels) of each sequence in a collated batch: packed rows split at `cu_seq_lens_q`, padded rows
    without their padding."""
    ids, labels = batch["input_ids"], batch["labels"]
    if "cu_seq_lens_q" in batch:
        bounds = batch["cu_seq_lens_q"].tolist()
        flat_ids, flat_labels = ids.reshape(-1).tolist(), labels.reshape(-1).tolist()
        return [(flat_ids[a:b], flat_labels[a:b]) for a, b in zip(bounds, bounds[1:])]
    mask = batch["attention_mask"].bool()
    return [(row[m].tolist(), lab[m].tolist()) for row, lab, m in zip(ids, labels, mask)]


def marked(tokenizer: PreTrainedTokenizerBase, ids: list[int], labels: list[int], color: bool) -> str:
    """The sequence's text with its special tokens, the runs of tokens that carry loss marked."""
    out, start = [], 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or (labels[i] != IGNORE_INDEX) != (labels[start] != IGNORE_INDEX):
            text = tokenizer.decode(ids[start:i], skip_special_tokens=False, clean_up_tokenization_spaces=False)
            if labels[start] != IGNORE_INDEX:
                text = f"{GREEN}{text}{RESET}" if color else f"{OPEN}{text}{CLOSE}"
            out.append(text)
            start = i
    return "".join(out)


def run(cfg: RunConfig) -> dict:
    p = cfg.preview
    tokenizer = load_tokenizer(cfg.model)
    own = bool(getattr(tokenizer, "chat_template", None))
    ensure_chat_template(tokenizer, cfg.data.chat_template)
    dm = BambaDataModule(cfg.data, tokenizer, seed=cfg.trainer.seed)
    dm.prepare(train=p.split == "train")  # logs each split's counts and the data's warnings, as training does
    if p.split == "train":
        loader = dm.train_dataloader()  # the first batch of the first epoch, in training's order
    else:
        loader = dm.full_val_dataloader()
        if not loader:
            raise DataError("preview.split=validation: this data has no validation split (data.val_fraction=0 and no "
                            "data.val_source).\nFix: preview.split=train, or give validation data.")
    batch = next(iter(loader))
    if isinstance(batch, dict):
        batch.pop(STREAM_KEY, None)
    seqs = sequences(batch)
    color = sys.stdout.isatty() if p.color == "auto" else p.color == "true"
    stops = [repr(tokenizer.decode([t])) for t in stop_token_ids(tokenizer)]
    stops += [f"the text {marker!r}"] if (marker := end_of_turn_text(tokenizer)) else []  # no token ends a turn
    real = sum(len(s) for s, _ in seqs)
    losses = [sum(1 for t in labels if t != IGNORE_INDEX) for _, labels in seqs]
    with_loss = sum(losses)
    layout = "packed into one row" if "cu_seq_lens_q" in batch else "padded rows"
    template = (f"data.chat_template={cfg.data.chat_template}" if cfg.data.chat_template else "the tokenizer's own"
                if own else f"the {FALLBACK} preset (the tokenizer has none)")
    where = "green text" if color else f"text inside {OPEN} {CLOSE}"
    lines = [
        f"{p.split} batch 1: {len(seqs)} sequences, {real:,} tokens, {with_loss:,} with loss ({layout}); chat template: "
        f"{template}; generation stops at {', '.join(stops) or 'nothing (no EOS token)'}",
        f"loss is on the {where}; special tokens are shown as the model reads them",
    ]
    for k, ((ids, labels), n) in enumerate(zip(seqs[: p.examples], losses), 1):
        lines += ["", f"--- sequence {k} of {len(seqs)}: {len(ids)} tokens, {n} with loss ---",
                  marked(tokenizer, ids, labels, color)]
    print("\n".join(lines))
    return {"split": p.split, "sequences": len(seqs), "tokens": real, "loss_tokens": with_loss}
