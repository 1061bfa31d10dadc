"""Chat template + tokenization + label masks (loss on assistant/completion tokens by default)."""

from __future__ import annotations

import functools
import hashlib
import itertools
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from jinja2.exceptions import TemplateError
from transformers import PreTrainedTokenizerBase

from bamba_ft.data.formats import NO_LOSS, to_messages, tools_of
from bamba_ft.data.load import locate
from bamba_ft.data.templates import PRESETS
from bamba_ft.errors import DataError

IGNORE_INDEX = -100
# The warning for training examples that repeat (`count_repeats`), formatted with the repeats, the examples looked
# at, where they were looked at (" of a stream window ..." or ""), the source and how often each copy is trained.
REPEATED_WARNING = ("data warning: %d of the %d training examples%s repeat an earlier one (the same tokens) in %s, so "
                    "each copy is trained every %s. Fix: deduplicate the rows, or keep them if the repeats are meant "
                    "to weight those examples.")


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict], where: str, tools: list[dict] | None = None,
            add_generation_prompt: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except TemplateError as e:  # includes the template's own raise_exception(...)
        raise DataError(
            f"{where}: the chat template cannot render this conversation: {e}\n"
            f"Fix: set data.chat_template to a template that can ({', '.join(PRESETS)} or your own), "
            "or change the rows it refuses."
        ) from e


def _check_tools_rendered(tokenizer: PreTrainedTokenizerBase, messages: list[dict], tools: list[dict] | None,
                          full: str, where: str) -> None:
    """A template that ignores `tools`, `tool_calls` or tool results would train on conversations without them."""
    fix = (f"Fix: set data.chat_template to a template that renders them (the presets {', '.join(PRESETS)} do), "
           "or remove them from the data.")
    if tools and _render(tokenizer, messages, where) == full:
        raise DataError(f"{where}: the chat template ignores the row's tools (the rendered text is the same "
                        f"without them).\n{fix}")
    calls = [i for i, m in enumerate(messages) if m.get("tool_calls")]
    if calls:
        bare = [{k: v for k, v in m.items() if k != "tool_calls"} for m in messages]
        if _render(tokenizer, bare, where, tools) == full:
            raise DataError(f"{where}: the chat template ignores tool_calls (message {calls[0]}'s calls leave the "
                            f"rendered text unchanged).\n{fix}")
    for i, m in enumerate(messages):
        if m["role"] == "tool" and m["content"] not in full:
            raise DataError(f"{where}: the chat template does not render tool results (message {i}).\n{fix}")


def _assistant_spans(tokenizer: PreTrainedTokenizerBase, messages: list[dict], where: str) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns.

    Each assistant turn i spans from the end of render(messages[:i], generation prompt) to the end of
    render(messages[:i+1]); this needs no special template markup, only that renders grow by appending.
    """
    tools = tools_of(messages)
    full = _render(tokenizer, messages, where, tools)
    if tools or any(m.get("tool_calls") or m["role"] == "tool" for m in messages):
        _check_tools_rendered(tokenizer, messages, tools, full, where)
    spans = []
    loss_from = getattr(messages, "loss_from", 0)  # assistant turns of a prompt_completion prompt: context only
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or i < loss_from or m.get(NO_LOSS):  # weight 0: context, as a prompt is
            continue
        before = _render(tokenizer, messages[:i], where, tools, add_generation_prompt=True) if i or tools else ""
        upto = _render(tokenizer, messages[: i + 1], where, tools)
        if not before:  # an opening assistant turn: the template's header before it is markup, not the answer
            before = upto[: _after_opening_header(tokenizer, upto)]
        if not (upto.startswith(before) and full.startswith(upto)):
            raise DataError(
                f"{where}: the chat template does not render conversations by appending turns, so assistant "
                "tokens cannot be located.\nFix: set data.chat_template to a template that does, or data.train_on=all."
            )
        spans.append((len(before), len(upto)))
    return full, spans


def _after_opening_header(tokenizer: PreTrainedTokenizerBase, rendered: str) -> int:
    """Where the answer of a conversation's opening assistant turn (`rendered`) starts: after the template's
    assistant header, the text its generation prompt adds (transformers renders no generation prompt for an empty
    conversation, so it is read off a probe turn); 0 when the header cannot be told."""
    probe = [{"role": "user", "content": "?"}]
    try:
        bare = tokenizer.apply_chat_template(probe, tokenize=False)
        prompted = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
    except Exception:  # a template that refuses the probe: the whole turn carries loss, as before
        return 0
    header = prompted[len(bare):] if prompted.startswith(bare) else ""
    at = rendered.find(header) if header else -1
    return at + len(header) if at >= 0 else 0


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
    max_seq_len: int | None,
    where: str = "data",
) -> Tokenized:
    """Token ids and labels (-100 where no loss) for one conversation or text, cut at `max_seq_len` (None: uncut)."""
    if isinstance(example, str):
        text, spans = example, []
        # verbose=False: transformers warns about rows over model_max_length; the length policy here is ours.
        ids = tokenizer(text, add_special_tokens=True, verbose=False)["input_ids"]
        if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
            ids = ids + [tokenizer.eos_token_id]  # documents end, so the model learns to stop
        labels = list(ids)
    else:
        text, spans = _assistant_spans(tokenizer, example, where)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        ids = enc["input_ids"]
        if train_on == "all":  # a conversation without an assistant turn gets no loss, never loss on its prompt
            labels = list(ids)
        else:
            labels = _mask_outside(ids, enc["offset_mapping"], spans)
    if labels:
        labels[0] = IGNORE_INDEX  # nothing predicts a sequence's first token; in a packed row it follows another
    full_targets = sum(1 for t in labels if t != IGNORE_INDEX)
    if max_seq_len is None:
        return Tokenized(ids, labels, False, full_targets)
    truncated = len(ids) > max_seq_len
    return Tokenized(ids[:max_seq_len], labels[:max_seq_len], truncated, full_targets)


def _mask_outside(ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """Each token's id where its characters lie inside one span, else IGNORE_INDEX.

    Tokens and spans both run left to right, so one sweep suffices: linear in tokens + spans, where testing
    every span for every token would be quadratic in a long conversation.
    """
    labels, k = [], 0
    for tok, (start, end) in zip(ids, offsets):
        while k < len(spans) and spans[k][1] < end:
            k += 1  # spans ending before this token ends cannot hold it, nor any later token
        inside = k < len(spans) and spans[k][0] <= start and end <= spans[k][1] and end > start
        labels.append(tok if inside else IGNORE_INDEX)
    return labels


def split_windows(ids: list[int], labels: list[int], max_len: int, overlap: int) -> list[tuple[list[int], list[int]]]:
    """A long example as windows of `max_len` tokens, each later one repeating the last `overlap` tokens before it.

    The repeated tokens are context only (label IGNORE_INDEX): every label of the original is trained in
    exactly one window. A window's first token can carry no label (nothing in the window predicts it), so
    windows overlap by at least one token; an overlap of 0 is read as 1.
    """
    overlap = max(overlap, 1)
    step = max_len - overlap
    windows, start = [], 0
    while True:
        end = min(start + max_len, len(ids))
        window_labels = labels[start:end]
        if start:
            window_labels[:overlap] = [IGNORE_INDEX] * overlap
        windows.append((ids[start:end], window_labels))
        if end == len(ids):
            return windows
        start += step


def count_repeats(examples: Iterable[Sequence[int]], places: Iterable[Hashable] | None = None) -> tuple[int, set[int]]:
    """How many training examples repeat an earlier one (the same tokens), each copy a weight nobody chose, and the
    examples' token hashes. `places`: each example's place in its source, where one may come again by design (a
    weighted stream mix restarts a source that runs out): a repeat is then the same tokens at another place."""
    first: dict[int, Hashable] = {}
    repeats = 0
    for ids, place in zip(examples, itertools.count() if places is None else places):
        repeats += first.setdefault(hash(tuple(ids)), place) != place
    return repeats, set(first)


def prompt_and_reference(tokenizer: PreTrainedTokenizerBase, example: list[dict] | str) -> tuple[str, str] | None:
    """(prompt rendered up to the last assistant turn, that turn's content), for generation metrics."""
    if isinstance(example, str):
        return None
    last = max((i for i, m in enumerate(example) if m["role"] == "assistant"), default=None)
    if last is None:
        return None
    prompt = tokenizer.apply_chat_template(example[:last], tools=tools_of(example), tokenize=False,
                                           add_generation_prompt=True)
    return prompt, example[last]["content"]


@functools.cache
def code_version() -> str:
    """A fingerprint of the data package's code. datasets caches a map's result under its function's name and
    arguments (dill pickles an importable function by reference, not by its code), so after an upgrade of bamba_ft
    that changes how rows are read or tokenized, the rows the old code tokenized came back from the cache. Passed
    to the mapped functions as an argument, it is part of that key."""
    h = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def encode_row(row: dict, *, tokenizer, fmt: str, train_on: str, max_seq_len: int, split: bool, where: str,  # noqa: ANN001
               renames: Mapping[str, str], code: str = "") -> dict:
    """One raw row tokenized (`tokenize_example`), with the counts the length policy and the data report use.
    `code` (`code_version`) only keys datasets' cache."""
    at = locate(where, row)
    coerced: list[str] = []
    example = to_messages(row, fmt, at, renames, coerced)
    tok = tokenize_example(tokenizer, example, train_on, None if split else max_seq_len, at)
    unk = tokenizer.unk_token_id
    empty = not isinstance(example, str) and any(
        m["role"] == "assistant" and not m["content"].strip() and not m.get("tool_calls") for m in example)
    return {
        "input_ids": tok.input_ids,
        "labels": tok.labels,
        "length": len(tok.input_ids),
        "overlong": tok.truncated or len(tok.input_ids) > max_seq_len,
        "n_targets": sum(1 for t in tok.labels if t != IGNORE_INDEX),
        "full_targets": tok.full_targets,
        "empty_assistant": empty,
        "coerced": len(coerced),
        # the id read once: a tokenizer's unk_token_id converts its token on every access; None matches no id
        "unknown_targets": sum(1 for t, label in zip(tok.input_ids, tok.labels) if label != IGNORE_INDEX and t == unk),
    }


def split_long(batch: dict[str, list], *, max_seq_len: int, overlap: int) -> dict[str, list]:
    """Examples longer than `max_seq_len` replaced by their windows (`split_windows`); windows without loss go.
    `no_loss` counts those, on the first window kept of their example (0 on the others)."""
    out: dict[str, list] = {"input_ids": [], "labels": [], "length": [], "n_targets": [], "window": [], "no_loss": []}
    for ids, labels in zip(batch["input_ids"], batch["labels"]):
        windows = split_windows(ids, labels, max_seq_len, overlap) if len(ids) > max_seq_len else [(ids, labels)]
        counts = [sum(1 for t in w_labels if t != IGNORE_INDEX) for _, w_labels in windows]
        no_loss = counts.count(0)
        for i, ((w_ids, w_labels), n) in enumerate(zip(windows, counts)):
            if n:
                out["input_ids"].append(w_ids)
                out["labels"].append(w_labels)
                out["length"].append(len(w_ids))
                out["n_targets"].append(n)
                out["window"].append(i if len(windows) > 1 else -1)
                out["no_loss"].append(no_loss)
                no_loss = 0
    return out
