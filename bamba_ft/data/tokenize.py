"""Chat template + tokenization + label masks (loss on assistant/completion tokens by default)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from bamba_ft.data.builtin import CHAT_TEMPLATE
from bamba_ft.errors import DataError

IGNORE_INDEX = -100


def ensure_chat_template(tokenizer: PreTrainedTokenizerBase, override: str | None) -> None:
    """Use `override` (a template or a file holding one), else the tokenizer's own, else bamba_ft's builtin."""
    if override:
        path = Path(override)
        tokenizer.chat_template = path.read_text() if path.is_file() else override
    elif not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = CHAT_TEMPLATE
    if tokenizer.pad_token_id is None:
        # Padded batches need a pad id; it never reaches the loss (labels are -100 there).
        tokenizer.pad_token = tokenizer.eos_token


def _assistant_spans(tokenizer: PreTrainedTokenizerBase, messages: list[dict], where: str) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns.

    Each assistant turn i spans from the end of render(messages[:i], generation prompt) to the end of
    render(messages[:i+1]); this needs no special template markup, only that renders grow by appending.
    """
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (upto.startswith(before) and full.startswith(upto)):
            raise DataError(
                f"{where}: the chat template does not render conversations by appending turns, so assistant "
                "tokens cannot be located.\nFix: set data.chat_template to a template that does, or data.train_on=all."
            )
        spans.append((len(before), len(upto)))
    return full, spans


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]
    truncated: bool
    full_targets: int
    """Loss tokens before the cut: more than zero while `labels` has none means the prompt filled `max_seq_len`."""


def tokenize_example(
    tokenizer: PreTrainedTokenizerBase,
    example: list[dict] | str,
    train_on: str,
    max_seq_len: int,
    where: str = "data",
) -> Tokenized:
    """Token ids and labels (-100 where no loss) for one conversation or text, cut at `max_seq_len`."""
    if isinstance(example, str):
        text, spans = example, []
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
            ids = ids + [tokenizer.eos_token_id]  # documents end, so the model learns to stop
        labels = list(ids)
    else:
        text, spans = _assistant_spans(tokenizer, example, where)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"]
        if train_on == "all":  # a conversation without an assistant turn gets no loss, never loss on its prompt
            labels = list(ids)
        else:
            labels = [
                tok if any(s <= start and end <= e for s, e in spans) and end > start else IGNORE_INDEX
                for tok, (start, end) in zip(ids, enc["offset_mapping"])
            ]
    if labels:
        labels[0] = IGNORE_INDEX  # nothing predicts a sequence's first token; in a packed row it follows another
    truncated = len(ids) > max_seq_len
    full_targets = sum(1 for t in labels if t != IGNORE_INDEX)
    return Tokenized(ids[:max_seq_len], labels[:max_seq_len], truncated, full_targets)


def prompt_and_reference(tokenizer: PreTrainedTokenizerBase, example: list[dict] | str) -> tuple[str, str] | None:
    """(prompt rendered up to the last assistant turn, that turn's content), for generation metrics."""
    if isinstance(example, str):
        return None
    last = max((i for i, m in enumerate(example) if m["role"] == "assistant"), default=None)
    if last is None:
        return None
    prompt = tokenizer.apply_chat_template(example[:last], tokenize=False, add_generation_prompt=True)
    return prompt, example[last]["content"]
