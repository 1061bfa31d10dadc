"""Streaming training data: rows read lazily, tokenized as they come, packed window by window, resumable.

Every rank reads the same stream and packs it the same way: each window of data.stream_buffer examples is
packed best-fit (`pack_batches`) and rank r trains the window's batches r, r + world, ... So the ranks see
disjoint examples, take the same number of steps without talking to each other, and one position (where the
window starts, plus the steps done in it) holds for every rank: rank 0's checkpoint resumes them all. The
price is that each rank tokenizes the whole stream, a small CPU cost next to a training step.
"""

from __future__ import annotations

import functools
import itertools
import logging
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import datasets
import torch

from bamba_ft.config.schema import DataConfig, SourceConfig
from bamba_ft.data.builtin import builtin_splits
from bamba_ft.data.formats import check_fields, detect_format, role_map
from bamba_ft.data.load import (
    POSITIONS,
    ROW,
    column_names,
    load_rows,
    load_stream,
    locate,
    mix_sources,
    number_rows,
    rename_columns,
    stream_read_error,
)
from bamba_ft.data.packing import collate_packed, collate_padded, pack_batches, padded_batches
from bamba_ft.data.tokenize import REPEATED_WARNING, count_repeats, encode_row, split_long
from bamba_ft.errors import BambaFTError, DataError

log = logging.getLogger(__name__)
SOURCE = "__source__"  # which of data.sources a mixed row came from
STREAM_KEY = "stream"  # batch key holding the position after the batch; BambaDataModule pops it before the model
PLACE = "place"  # a buffered example's (source, row): the collate functions read input_ids and labels only


@dataclass(frozen=True)
class StreamPosition:
    epoch: int = 0
    """Passes over the stream completed."""
    rows_read: int = 0
    """Rows of the training stream before the current window, in this pass."""
    row_items: int = 0
    """Examples of the next row packed into an earlier window (a row cut into several by data.overlong=split)."""
    steps_done: int = 0
    """Batches of the current window this rank has trained."""


@dataclass
class StreamSource:
    fmt: str
    columns: list[str]
    where: str
    first_row: int = 1
    """ROW of the source's first training row (after any held-out head): reading it starts a pass over the source."""


ValParts = list[tuple[datasets.Dataset, str, str | None]]


def open_stream(c: DataConfig, seed: int) -> tuple[datasets.IterableDataset, list[StreamSource], ValParts]:
    """The training rows as one stream (sources mixed), each source's format, and the validation rows.

    Validation stays in memory: data.val_source or data.val_split when given, else the first
    data.max_val_examples rows of the stream (split evenly over data.sources), which training then skips.
    """
    if c.source == "builtin" and not c.sources:
        train, val = builtin_splits(c.builtin_kind, c.builtin_train_examples, c.builtin_val_examples, seed)
        rows = number_rows(datasets.Dataset.from_list(train)).to_iterable_dataset()
        source = _source(rows, c.format, "data.source=builtin")
        return rows, [source], [(number_rows(datasets.Dataset.from_list(val)), source.where, None)]
    specs = c.sources or [SourceConfig(source=c.source, split=c.split, config=c.config, field=c.field, format=c.format)]
    hold = not c.val_source and not c.val_split and c.val_fraction > 0 and c.max_val_examples > 0
    head = max(1, c.max_val_examples // len(specs))
    streams, sources, vals = [], [], []
    for i, s in enumerate(specs):
        key = f"data.sources[{i}]" if c.sources else "data"
        where = f"{key}.source={s.source}"
        with reading([where]):  # datasets' readers parse a file's first block when the stream is opened
            rows = rename_columns(load_stream(s.source, s.split, f"{key}.source", s.config, s.field), s.columns,
                                  f"{key}.columns")
            if s.max_examples is not None:
                rows = rows.take(s.max_examples)
            if hold:
                vals.append((datasets.Dataset.from_list(list(rows.take(head))), where, s.format))
                rows = rows.skip(head)
            fmt = s.format if s.format != "auto" else c.format  # a source left at auto takes data.format
            sources.append(_source(rows, fmt, where, held=head if hold else 0))
        streams.append(rows.map(functools.partial(_tag, source=i)))
    if c.val_source:
        vals = [(load_rows(c.val_source, c.val_split or c.split, "data.val_source", field=c.val_field),
                 f"data.val_source={c.val_source}", None)]
    elif c.val_split:
        vals = [(load_rows(c.source, c.val_split, "data.val_split", c.config), f"data.source={c.source}", None)]
    mixed = streams[0] if len(streams) == 1 else mix_sources(streams, [s.weight for s in specs], seed,
                                                                c.stopping_strategy)
    return mixed, sources, vals


@contextmanager
def reading(wheres: list[str]) -> Iterator[None]:
    """Reader errors of streamed sources (a malformed line met mid-stream) as one DataError naming the source and,
    for a JSONL file, the line."""
    try:
        yield
    except BambaFTError:
        raise
    except Exception as e:  # pyarrow, pandas and datasets raise many types here
        raise stream_read_error(e, wheres) from e


def _tag(row: dict, source: int) -> dict:
    return {SOURCE: source}


def _source(rows: datasets.IterableDataset, fmt: str, where: str, held: int = 0) -> StreamSource:
    columns = [col for col in column_names(rows) if col not in POSITIONS]
    if not columns:
        after = f" after the first {held} held out for validation (data.max_val_examples)" if held else ""
        raise DataError(f"{where}: the stream has no training rows{after}.\nFix: point the source at more rows"
                        + (", lower data.max_val_examples, or set data.val_source." if held else "."))
    fmt = fmt if fmt != "auto" else detect_format(columns, where)
    check_fields(fmt, columns, where)
    return StreamSource(fmt, columns, where, first_row=held + 1)


def _encode_stream_row(row: dict, *, sources: list[StreamSource], tokenizer: Any, c: DataConfig,  # noqa: ANN401
                       renames: Mapping[str, str]) -> dict:
    """`encode_row` plus the in-memory length policy (`BambaDataModule._stats`), for one row: its examples."""
    src = sources[row.get(SOURCE) or 0]
    # Mixed streams carry every source's columns (None where a row lacks them); each row sees only its own.
    own = {k: row[k] for k in (*src.columns, *POSITIONS) if k in row}
    enc = encode_row(own, tokenizer=tokenizer, fmt=src.fmt, train_on=c.train_on, max_seq_len=c.max_seq_len,
                     split=c.overlong == "split", where=src.where, renames=renames)
    full, n = enc["full_targets"], enc["n_targets"]
    if full == 0:
        verdict = "dropped_no_targets"
    elif enc["overlong"] and c.overlong == "drop":
        verdict = "dropped_overlong"
    elif n == 0:
        verdict = "dropped_prompt_too_long"
    else:
        verdict = "kept"
    ids, labels = ([enc["input_ids"]], [enc["labels"]]) if verdict == "kept" else ([], [])
    no_loss = 0  # windows of a split row left out for holding no loss token, counted as SplitStats counts them
    if verdict == "kept" and c.overlong == "split" and enc["overlong"]:
        windows = split_long({"input_ids": ids, "labels": labels}, max_seq_len=c.max_seq_len, overlap=c.overlong_stride)
        ids, labels, no_loss = windows["input_ids"], windows["labels"], sum(windows["no_loss"])
    if verdict == "kept" and enc["overlong"]:
        verdict = "split" if c.overlong == "split" else "truncated"
    return {"_ids": ids, "_labels": labels, "_verdict": verdict, "_empty": enc["empty_assistant"],
            "_coerced": enc["coerced"] > 0, "_unknown": enc["unknown_targets"] > 0,
            "_windows": {"split_windows": len(ids), "split_windows_no_loss": no_loss} if verdict == "split" else {}}


def balance(batches: list[list[int]], world_size: int) -> list[list[int]]:
    """`batches` made a multiple of `world_size` in number by halving the ones with the most examples; when no
    batch has two examples left, the remainder is dropped (every rank drops the same)."""
    batches = list(batches)
    while len(batches) % world_size:
        k = max(range(len(batches)), key=lambda b: len(batches[b]))
        if len(batches[k]) < 2:
            return batches[: len(batches) // world_size * world_size]
        half = len(batches[k]) // 2
        batches[k : k + 1] = [batches[k][:half], batches[k][half:]]
    return batches


# What a training row's length verdict (`_encode_stream_row`) is warned with, the first time it is seen in a run
# (formatted with data.max_seq_len and the row's place).
_COUNTED = "; metrics.json counts them under data.train_stream.rows."
_VERDICT_WARNINGS = {
    "truncated": "data warning: training rows longer than data.max_seq_len=%d are cut to it (data.overlong=truncate) "
                 "(first: %s)" + _COUNTED,
    "dropped_overlong": "data warning: training rows longer than data.max_seq_len=%d are dropped (data.overlong=drop) "
                        "(first: %s)" + _COUNTED,
    "dropped_no_targets": "data warning: training rows with no token to learn (no assistant or completion text) are "
                          "dropped (data.max_seq_len=%d) (first: %s)" + _COUNTED,
    "dropped_prompt_too_long": "data warning: examples are dropped: the prompt alone is longer than "
                               "data.max_seq_len=%d, so no answer token is left (first: %s). Fix: raise data.max_seq_len.",
}
# A split row's windows that hold no loss token (SplitStats.split_windows_no_loss in memory)
_NO_LOSS_WARNING = ("data warning: windows of training rows split at data.max_seq_len=%d (data.overlong=split) hold no "
                    "loss token and are left out: the kept windows see only data.overlong_stride tokens of the prompt "
                    "before them (first: %s); metrics.json counts them under data.train_stream.split_windows_no_loss.")


class StreamBatches(torch.utils.data.IterableDataset):
    """This rank's collated batches of an endless stream (it restarts when the rows run out), from `start` on.

    Each batch holds, under STREAM_KEY, the position after it and its real tokens. `peak_buffer` is the most
    examples held at once (never above data.stream_buffer).
    """

    def __init__(self, rows: datasets.IterableDataset, sources: list[StreamSource], tokenizer: Any,  # noqa: ANN401
                 cfg: DataConfig, seed: int, rank: int = 0, world_size: int = 1,
                 start: StreamPosition | None = None, warned: set[str] | None = None) -> None:
        self.rows, self.sources, self.tokenizer, self.cfg, self.seed = rows, sources, tokenizer, cfg, seed
        self.rank, self.world_size, self.start = rank, world_size, start or StreamPosition()
        self.peak_buffer = 0
        # the kinds of rows already warned about: shared by the streams of one run (the probe's, the fit's)
        self._warned: set[str] = warned if warned is not None else set()

    def __iter__(self) -> Iterator[dict]:
        pos = self.start
        while True:
            steps = 0
            for batch in self._epoch(pos):
                steps += 1
                yield batch
            if steps == 0 and pos == StreamPosition(pos.epoch):
                raise DataError(
                    f"{self.sources[0].where}: a whole pass over the stream gave rank {self.rank} no training batch "
                    f"({self.world_size} ranks). Fix: check the rows (all may have been dropped: see the warnings), "
                    "lower data.max_tokens_per_batch, or run on fewer devices.")
            pos = StreamPosition(pos.epoch + 1)

    def _pass_rows(self, epoch: int) -> Iterator[dict]:
        """The rows of pass `epoch` in training order: shuffled (data.shuffle_buffer, seeded by the run seed and
        the pass), else in stream order. The same for every rank and process, so a row count is a position."""
        rows = self.rows
        if self.cfg.shuffle_buffer:
            # datasets fills the buffer from up to 10 shards at once; for one shard that only adds a reader thread
            # pool whose shutdown sleeps 5 s at the end of every pass (Parquet).
            rows = rows.shuffle(seed=self.seed, buffer_size=self.cfg.shuffle_buffer,  # a new dataset: its epoch is ours
                                max_buffer_input_shards=min(10, rows.num_shards))
            rows.set_epoch(epoch)
        # iter(batch_size=) rather than iter(rows): in a DataLoader worker, datasets' __iter__ shards the rows by
        # worker and reseeds every shuffle with the worker id, so a row count would mean other rows there.
        with reading([src.where for src in self.sources]):
            for batch in rows.iter(batch_size=256):
                names = list(batch)
                for values in zip(*batch.values()):
                    yield dict(zip(names, values))

    def _encoded(self, pos: StreamPosition) -> Iterator[dict]:
        encode = functools.partial(_encode_stream_row, sources=self.sources, tokenizer=self.tokenizer, c=self.cfg,
                                   renames=role_map(self.cfg.roles))
        for row in itertools.islice(self._pass_rows(pos.epoch), pos.rows_read, None):  # read, not tokenized, on resume
            yield {**row, **encode(row)}

    def _epoch(self, pos: StreamPosition) -> Iterator[dict]:
        buffer: list[dict] = []
        start, skip_steps = (pos.rows_read, pos.row_items), pos.steps_done
        read = [[0, 0] for _ in self.sources]  # per source: rows that started in this window, passes started
        verdicts: Counter[str] = Counter()  # those rows by what the length policy did with them
        windows: Counter[str] = Counter()  # the windows those of them split became, and left out
        for k, enc in enumerate(self._encoded(pos)):
            row, src = pos.rows_read + k, enc.get(SOURCE) or 0
            self._warn(enc)
            if k or not pos.row_items:  # else the row started in the window before, which counted it
                read[src][0] += 1
                read[src][1] += enc.get(ROW) == self.sources[src].first_row
                verdicts[enc["_verdict"]] += 1
                windows.update(enc["_windows"])
            n_items = len(enc["_ids"])
            for j in range(pos.row_items if k == 0 else 0, n_items):
                buffer.append({"input_ids": enc["_ids"][j], "labels": enc["_labels"][j], PLACE: (src, enc.get(ROW))})
                self.peak_buffer = max(self.peak_buffer, len(buffer))
                if len(buffer) == self.cfg.stream_buffer:
                    after = StreamPosition(pos.epoch, *((row, j + 1) if j + 1 < n_items else (row + 1, 0)))
                    yield from self._window(buffer, pos.epoch, start, skip_steps, after, read, verdicts, windows)
                    buffer, start, skip_steps = [], (after.rows_read, after.row_items), 0
                    read, verdicts, windows = [[0, 0] for _ in self.sources], Counter(), Counter()
        if buffer:
            yield from self._window(buffer, pos.epoch, start, skip_steps, StreamPosition(pos.epoch + 1), read,
                                    verdicts, windows)

    def _window(self, examples: list[dict], epoch: int, start: tuple[int, int], skip_steps: int,
                after: StreamPosition, read: list[list[int]], verdicts: Counter[str],
                windows: Counter[str]) -> Iterator[dict]:
        """This rank's batches of one window; the same window packs the same way on every rank and on resume.

        The window's rows per source (`read`), by length verdict, and the windows its split rows became and left
        out travel with its last batch, which moves the position past them.
        """
        c = self.cfg
        self._warn_repeated(examples)
        lengths = [len(e["input_ids"]) for e in examples]
        seed = hash((self.seed, epoch, *start))  # ints hash the same in every process
        if c.packing:
            batches = pack_batches(lengths, c.max_tokens_per_batch, seed)
            collate = collate_packed
        else:
            batches = padded_batches(len(examples), c.batch_size, seed, shuffle=True)
            collate = functools.partial(collate_padded, pad_id=self.tokenizer.pad_token_id)
        mine = balance(batches, self.world_size)[self.rank :: self.world_size]
        for s in range(skip_steps, len(mine)):
            batch = collate([examples[i] for i in mine[s]])
            done = after if s + 1 == len(mine) else StreamPosition(epoch, *start, s + 1)
            batch[STREAM_KEY] = {**asdict(done), "tokens": sum(lengths[i] for i in mine[s]),
                                 "sources": read if s + 1 == len(mine) else [[0, 0]] * len(read),
                                 "verdicts": dict(verdicts) if s + 1 == len(mine) else {},
                                 "windows": dict(windows) if s + 1 == len(mine) else {}}
            yield batch

    def _warn(self, enc: dict) -> None:
        """The in-memory path's data warnings, once each (a stream has no end to count them at)."""
        kinds = {"_empty": "an empty assistant message, which teaches an empty answer",
                 "_coerced": "a number where text belongs, read as its decimal text ('007' became '7')",
                 "_unknown": "answer text the tokenizer cannot encode, learnt as its unknown token"}
        for flag, what in kinds.items():
            if enc[flag] and flag not in self._warned:
                self._warned.add(flag)
                log.warning("data warning: a training row has %s (%s); later ones are not reported.",
                            what, self._at(enc))
        verdict = enc["_verdict"]
        if verdict in _VERDICT_WARNINGS and verdict not in self._warned:
            self._warned.add(verdict)
            log.warning(_VERDICT_WARNINGS[verdict], self.cfg.max_seq_len, self._at(enc))
        if enc["_windows"].get("split_windows_no_loss") and "no_loss" not in self._warned:
            self._warned.add("no_loss")
            log.warning(_NO_LOSS_WARNING, self.cfg.max_seq_len, self._at(enc))

    def _warn_repeated(self, examples: list[dict]) -> None:
        """The in-memory path's warning of repeated training examples, looked for within each window (whose examples
        are held anyway, so memory stays bounded by data.stream_buffer) and in each source, once per source. A
        weighted mix repeats examples by design, restarting a source that runs out: a row read again is no repeat."""
        if self.cfg.source == "builtin" and not self.cfg.sources:  # generated: as in memory, not checked
            return
        for i, src in enumerate(self.sources):
            own = [e for e in examples if e[PLACE][0] == i]
            if f"repeated[{i}]" in self._warned or not own:
                continue
            repeats, _ = count_repeats((e["input_ids"] for e in own), (e[PLACE] for e in own))
            if repeats:
                self._warned.add(f"repeated[{i}]")
                scope = (f" of a stream window (data.stream_buffer={self.cfg.stream_buffer}: examples in different "
                         "windows are not compared)")
                log.warning(REPEATED_WARNING, repeats, len(own), scope, src.where, "pass")

    def _at(self, enc: dict) -> str:
        return locate(self.sources[enc.get(SOURCE) or 0].where, enc)
