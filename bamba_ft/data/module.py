"""LightningDataModule: raw rows -> tokenized, length-checked examples -> packed (or padded) batches."""

from __future__ import annotations

import functools
import hashlib
import logging
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import datasets
import lightning as L
import numpy as np
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from bamba_ft.config.schema import DataConfig
from bamba_ft.data.builtin import builtin_splits
from bamba_ft.data.formats import check_fields, detect_format, role_map, to_messages
from bamba_ft.data.load import POSITIONS, load_rows, locate, mix_sources, number_rows, rename_columns
from bamba_ft.data.packing import BatchPlan, MaskedRows, collate_packed, collate_padded
from bamba_ft.data.stream import STREAM_KEY, StreamBatches, StreamPosition, StreamSource, open_stream
from bamba_ft.data.tokenize import REPEATED_WARNING, code_version, count_repeats, encode_row, split_long
from bamba_ft.errors import ConfigError, DataError

log = logging.getLogger(__name__)
datasets.disable_progress_bars()


@dataclass
class SplitStats:
    rows: int
    kept: int
    """Rows kept (a row split into windows counts once)."""
    truncated: int
    split: int
    """Rows longer than data.max_seq_len split into windows (data.overlong=split)."""
    split_windows: int
    """Examples those rows became (windows holding no loss token are left out: `split_windows_no_loss`)."""
    dropped_overlong: int
    dropped_no_targets: int
    dropped_prompt_too_long: int
    """Examples whose prompt alone fills data.max_seq_len, so truncation leaves no loss token."""
    tokens: int
    target_tokens: int
    empty_assistant: int
    """Rows with an empty (or whitespace-only) assistant message: kept, they teach an empty answer."""
    coerced: int
    """Rows where a number stood in a text field and was read as its decimal text."""
    split_windows_no_loss: int = 0
    """Windows of split rows left out because they hold no loss token (a prompt longer than data.max_seq_len):
    the kept windows see only data.overlong_stride tokens of what came before them."""
    unknown_targets: int = 0
    """Rows with a loss token the tokenizer could not encode (its unknown token): the model learns to emit it."""
    in_mix: int | None = None
    """data.sources: this source's examples in the mixed training set."""
    passes: float | None = None
    """data.sources: in_mix / kept, how often the mix reads this source's examples (data.stopping_strategy:
    below 1 a source is partly unused, above 1 its examples repeat)."""

    @classmethod
    def total(cls, parts: list[SplitStats]) -> SplitStats:
        """The counts of several sources added up (`in_mix` and `passes` belong to one source: left unset)."""
        return cls(**{f.name: sum(getattr(p, f.name) for p in parts) for f in fields(cls)
                      if f.name not in ("in_mix", "passes")})

    def line(self, name: str) -> str:
        return (
            f"{name}: {self.kept}/{self.rows} examples, {self.tokens} tokens ({self.target_tokens} with loss)"
            + (f" ({self.in_mix} in the training mix: {self.passes:.2f} passes)" if self.in_mix is not None else "")
            + f"; truncated {self.truncated}, "
            + (f"split {self.split} into {self.split_windows} windows" + (
                f" ({self.split_windows_no_loss} more without a loss token left out)" if self.split_windows_no_loss
                else "") + ", " if self.split else "")
            + f"dropped {self.dropped_overlong} overlong, "
            f"{self.dropped_prompt_too_long} with a prompt longer than data.max_seq_len, "
            f"{self.dropped_no_targets} with no loss tokens"
        )


def _warn_repeated(examples: datasets.Dataset, where: str) -> set[int]:
    """Warn when training examples repeat (`count_repeats`): each copy is trained every epoch. Returns the examples'
    token hashes."""
    ids = examples["input_ids"]
    repeats, hashes = count_repeats(ids)
    if repeats:
        log.warning(REPEATED_WARNING, repeats, len(ids), "", where, "epoch")
    return hashes


def _raise_earliest(rows: datasets.Dataset, encode: Callable[[dict], Any]) -> None:
    """Rows are tokenized in their split's order, which the hold-out shuffled, so the row a DataError named was not
    always the file's first bad one (every row bad: 'line 10'): raise the error of the earliest row in the file."""
    position = _positions(rows)
    if position is None:
        return
    for i in np.argsort(np.asarray(position), kind="stable"):
        encode(rows[int(i)])


def _positions(rows: datasets.Dataset) -> list[int] | None:
    """Each row's place in its source file (load.LINE, or load.ROW for CSV and Parquet), None where not recorded."""
    return next((rows[p] for p in POSITIONS if p in rows.column_names), None)


def held_out_count(n: int, fraction: float, cap: int) -> int:
    """How many of `n` rows data.val_fraction holds out: `fraction` of them (rounded up, as datasets does), but no
    more than data.max_val_examples (`cap`), since rows past it would be neither validated nor trained."""
    return min(math.ceil(fraction * n), max(cap, 0)) if fraction > 0 and n >= 2 else 0


def hold_out(rows: datasets.Dataset, fraction: float, seed: int, where: str,
             cap: int) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """(training rows, validation rows): `held_out_count` rows held out (None when that is 0), at least one row
    left to train on, else a DataError with the counts and the fix. The rows held out are the first of one seeded
    permutation, so a lower `cap` holds out a prefix of what a higher one did."""
    held = held_out_count(len(rows), fraction, cap)
    if held == 0:
        return rows, None
    if held >= len(rows):
        raise DataError(f"{where}: data.val_fraction={fraction} holds out {held} of its {len(rows)} rows, which leaves "
                        "none to train on.\nFix: lower data.val_fraction, or give a validation file "
                        "(data.val_source=...).")
    parts = rows.train_test_split(test_size=held, seed=seed, shuffle=True)
    return parts["train"], parts["test"]


def even_quotas(sizes: list[int], room: int) -> list[int]:
    """How many of each part's `sizes` rows to take, `room` in all, shared evenly: a part with fewer rows than its
    share gives the rest to the others (so data.max_val_examples validates every source, not the first alone)."""
    quotas, left = [0] * len(sizes), [i for i, n in enumerate(sizes) if n > 0]
    while room > 0 and left:
        share = max(1, room // len(left))
        for i in list(left):
            take = min(share, sizes[i] - quotas[i], room)
            quotas[i] += take
            room -= take
            if quotas[i] == sizes[i]:
                left.remove(i)
            if not room:
                break
    return quotas


class BambaDataModule(L.LightningDataModule):
    """Builds both splits once (`prepare`), then serves batches; its position survives checkpoint/resume."""

    def __init__(self, cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int = 42) -> None:
        super().__init__()
        self.cfg, self.tokenizer, self.seed = cfg, tokenizer, seed
        self.train_set: datasets.Dataset | None = None
        self.val_set: datasets.Dataset | None = None
        self.val_rows: list[list[dict] | str] = []  # formatted validation examples, for generation metrics
        self.stats: dict[str, SplitStats] = {}
        self.fmt: str | None = None  # the training split's format
        self.formats: dict[str, str] = {}  # each split's format (a validation file may use another)
        self._plan: BatchPlan | None = None
        self._resume: dict[str, int] | None = None
        # data.streaming: the training rows as a stream, and how far training has consumed it
        self.stream: datasets.IterableDataset | None = None
        self.stream_sources: list[StreamSource] = []
        self.stream_position = StreamPosition()
        self.stream_tokens = self.stream_batches = 0  # real tokens and batches trained (for packing efficiency)
        self.source_rows: list[int] = []  # per source: stream rows read into trained windows, and passes started
        self.source_passes: list[int] = []
        self.stream_rows: Counter[str] = Counter()  # rows read into trained windows, by what the length policy did
        # the windows the split ones became (split_windows) and left out for holding no loss token, as SplitStats
        self.stream_windows: Counter[str] = Counter()
        self._stream_warned: set[str] = set()  # data warnings given once per run, whichever stream reads the row
        # per source whose validation rows data.val_fraction holds out: the rows it held them out of; the permutation
        # that picks them depends on that count, so an evaluation checks it against the run's (metrics.json)
        self.hold_out_rows: dict[str, int] = {}

    # ----- building the splits
    def _raw_splits(self) -> tuple[datasets.Dataset, datasets.Dataset | None]:
        """Both splits' raw rows; each row keeps its place in its source (load.LINE/ROW) through the split shuffle."""
        c = self.cfg
        if c.source == "builtin":
            train, val = builtin_splits(c.builtin_kind, c.builtin_train_examples, c.builtin_val_examples, self.seed)
            return number_rows(datasets.Dataset.from_list(train)), number_rows(datasets.Dataset.from_list(val))
        train = load_rows(c.source, c.split, "data.source", c.config, c.field)
        if c.val_source:
            return train, load_rows(c.val_source, c.val_split or c.split, "data.val_source", field=c.val_field)
        if c.val_split:
            return train, load_rows(c.source, c.val_split, "data.val_split", c.config)
        train, val = hold_out(train, c.val_fraction, self.seed, f"data.source={c.source}", c.max_val_examples)
        if val is not None:
            self.hold_out_rows[f"data.source={c.source}"] = len(train) + len(val)
        return train, val

    def _stats(self, rows: datasets.Dataset, enc: datasets.Dataset, name: str, where: str) -> tuple[list[int], SplitStats]:
        """Which examples to keep, and the split's counts; warns once per kind of doubtful row."""
        c = self.cfg
        drop_overlong = c.overlong == "drop"
        cols = enc.select_columns(["overlong", "n_targets", "full_targets", "empty_assistant", "coerced",
                                   "unknown_targets"]).to_dict()
        trunc, n_tg, full = cols["overlong"], cols["n_targets"], cols["full_targets"]
        no_targets = [f == 0 for f in full]
        overlong = [t and f > 0 and drop_overlong for t, f in zip(trunc, full)]
        # Truncation cut away every answer token: the prompt alone is longer than max_seq_len.
        prompt_long = [f > 0 and n == 0 and not o for f, n, o in zip(full, n_tg, overlong)]
        keep = [i for i, n in enumerate(n_tg) if n > 0 and not overlong[i]]
        kept_lengths = enc.select(keep)["length"] if keep else []
        stats = SplitStats(
            rows=len(rows), kept=len(keep),
            truncated=sum(1 for i in keep if trunc[i]) if c.overlong == "truncate" else 0,
            split=sum(1 for i in keep if trunc[i]) if c.overlong == "split" else 0, split_windows=0,
            dropped_overlong=sum(overlong), dropped_no_targets=sum(no_targets),
            dropped_prompt_too_long=sum(prompt_long),
            tokens=sum(kept_lengths), target_tokens=sum(n_tg[i] for i in keep),
            empty_assistant=sum(cols["empty_assistant"]), coerced=sum(1 for n in cols["coerced"] if n),
            unknown_targets=sum(1 for n in cols["unknown_targets"] if n),
        )

        position = _positions(rows)

        def at(flags: list[bool]) -> str:
            # the earliest in the file: the held-out split has shuffled the rows
            flagged = [i for i, f in enumerate(flags) if f]
            return locate(where, rows[min(flagged, key=position.__getitem__) if position else flagged[0]])

        if stats.dropped_prompt_too_long:
            log.warning("data warning: %d %s examples dropped: the prompt alone is longer than data.max_seq_len=%d, "
                        "so no answer token is left (first: %s). Fix: raise data.max_seq_len.",
                        stats.dropped_prompt_too_long, name, c.max_seq_len, at(prompt_long))
        if 0 < stats.dropped_no_targets < stats.rows:
            log.warning("data warning: %d %s rows dropped: they hold no token to learn (no assistant or completion "
                        "text, or data.train_on leaves none) (first: %s). Fix: check those rows (data.roles names "
                        "the roles), or remove them.", stats.dropped_no_targets, name, at(no_targets))
        if stats.empty_assistant:
            log.warning("data warning: %d %s rows have an empty assistant message, which teaches an empty answer "
                        "(first: %s). Fix: remove those rows or fill in the answers.",
                        stats.empty_assistant, name, at(cols["empty_assistant"]))
        if stats.coerced:
            log.warning("data warning: %d %s rows hold a number where text belongs; it was read as its decimal text, "
                        "so '007' became '7' (first: %s). Fix: store those fields as strings: quoted in JSON, a string "
                        "column in Parquet (a CSV column whose values all look like numbers is read as numbers).",
                        stats.coerced, name, at(cols["coerced"]))
        if stats.unknown_targets:
            log.warning("data warning: %d %s rows have answer text the tokenizer cannot encode: it becomes its "
                        "unknown token (%s), which the model then learns to emit (first: %s). Fix: use a tokenizer "
                        "that covers these characters (model.tokenizer), or clean the text.",
                        stats.unknown_targets, name, self.tokenizer.unk_token, at(cols["unknown_targets"]))
        if stats.kept == 0:
            all_no_targets = stats.dropped_no_targets == stats.rows
            raise DataError(self._why_empty(stats, name, where, at([a == all_no_targets for a in no_targets])))
        return keep, stats

    def _why_empty(self, st: SplitStats, name: str, where: str, first: str) -> str:
        c = self.cfg
        if st.dropped_no_targets == st.rows:
            fix = ("check that rows have assistant/completion text (after data.roles), "
                   "or set data.train_on=all to train on every token")
        else:
            fix = f"raise data.max_seq_len (now {c.max_seq_len})" + (
                ", or set data.overlong=truncate" if c.overlong == "drop" else "")
        return f"{where}: no {name} examples left after filtering ({st.line(name)}; first: {first}).\nFix: {fix}."

    def _tokenize(self, rows: datasets.Dataset, name: str, where: str,
                  fmt: str | None = None) -> tuple[datasets.Dataset, SplitStats]:
        c = self.cfg
        if len(rows) == 0:
            raise DataError(f"{where}: the {name} split has no rows.")
        columns = [col for col in rows.column_names if col not in POSITIONS]
        fmt = fmt if fmt and fmt != "auto" else c.format  # a source left at auto takes data.format
        fmt = fmt if fmt != "auto" else detect_format(columns, where)
        check_fields(fmt, columns, where)
        self.fmt = self.fmt or fmt
        self.formats[name] = fmt
        encode = functools.partial(
            encode_row, tokenizer=self.tokenizer, fmt=fmt, train_on=c.train_on, max_seq_len=c.max_seq_len,
            split=c.overlong == "split", where=where, renames=role_map(c.roles), code=code_version(),
        )
        try:
            enc = rows.map(
                encode,
                remove_columns=rows.column_names,
                num_proc=c.num_proc if c.num_proc > 1 else None,
                desc=f"tokenizing {name}",
            )
        except DataError:
            _raise_earliest(rows, encode)
            raise
        keep, stats = self._stats(rows, enc, name, where)
        kept = enc.select(keep).remove_columns(["overlong", "full_targets", "empty_assistant", "coerced",
                                                "unknown_targets"])
        if stats.split:
            kept = kept.map(functools.partial(split_long, max_seq_len=c.max_seq_len, overlap=c.overlong_stride),
                            batched=True, batch_size=16, remove_columns=kept.column_names, desc=f"splitting {name}")
            windows = kept["window"]
            stats.split_windows = sum(1 for w in windows if w >= 0)
            stats.split_windows_no_loss = sum(kept["no_loss"])
            stats.tokens, stats.target_tokens = sum(kept["length"]), sum(kept["n_targets"])
            kept = kept.remove_columns(["window", "no_loss"])
        return kept, stats

    def prepare(self, train: bool = True) -> None:
        """Load and tokenize both splits (idempotent); `train=False`: the validation split only (an evaluation,
        which still reads the training rows where its validation rows are held out of them)."""
        if self.train_set is not None or self.stream is not None or (not train and self.val_set is not None):
            return
        if self.cfg.streaming:
            self.stream, self.stream_sources, vals = open_stream(self.cfg, self.seed)
            self.fmt = self.formats["train"] = self.stream_sources[0].fmt
            self._validation_parts(vals)
            if "val" in self.stats:
                log.info("data %s", self.stats["val"].line("val"))
            return
        if self.cfg.sources:
            self._prepare_sources(train)
            return
        where = "data.source=builtin" if self.cfg.source == "builtin" else f"data.source={self.cfg.source}"
        train_rows, val_rows = self._raw_splits()
        if train:
            self.train_set, self.stats["train"] = self._tokenize(train_rows, "train", where)
        if self.cfg.max_val_examples <= 0:  # no row was held out of training for it either
            log.warning("data: data.max_val_examples=%d: no validation.", self.cfg.max_val_examples)
        elif val_rows is not None and len(val_rows):
            val_rows = val_rows.select(range(min(len(val_rows), self.cfg.max_val_examples)))
            val_where = f"data.val_source={self.cfg.val_source}" if self.cfg.val_source else where
            self.val_set, self.stats["val"] = self._tokenize(val_rows, "validation", val_where)
            fmt, renames = self.formats["validation"], role_map(self.cfg.roles)
            self.val_rows = [to_messages(r, fmt, locate(val_where, r), renames) for r in val_rows]
        for name, st in self.stats.items():
            log.info("data %s", st.line(name))
        if self.cfg.source != "builtin" and self.train_set is not None:
            trained = _warn_repeated(self.train_set, where)
            if self.val_set is not None:
                self._warn_val_in_train(trained, where)

    def _warn_val_in_train(self, trained: set[int], where: str) -> None:
        """Validation examples that are training examples too (`trained`: their token hashes; a row repeated in the
        data, held out in one copy and trained in another) make the validation loss partly a measure of
        memorisation: counted and warned about."""
        both = sum(1 for ids in self.val_set["input_ids"] if hash(tuple(ids)) in trained)
        if both:
            log.warning("data warning: %d of the %d validation examples are also training examples (the same tokens: "
                        "rows repeated in %s), so the validation loss partly measures memorisation. Fix: remove the "
                        "repeated rows, or validate on other data (data.val_source).", both, len(self.val_set), where)

    def _prepare_sources(self, train: bool = True) -> None:
        """data.sources: each source read, renamed, split and tokenized in its own format, then mixed (`train`)."""
        c = self.cfg
        parts, vals, loaded = [], [], []
        for i, s in enumerate(c.sources):
            key = f"data.sources[{i}]"
            rows = rename_columns(load_rows(s.source, s.split, f"{key}.source", s.config, s.field), s.columns,
                                  f"{key}.columns")
            if s.max_examples is not None:
                rows = rows.select(range(min(len(rows), s.max_examples)))
            loaded.append(rows)
        # data.max_val_examples shared over the sources (`even_quotas`): each holds out its share and trains the rest
        wanted = [0 if c.val_source else held_out_count(len(rows), c.val_fraction, c.max_val_examples) for rows in loaded]
        for i, (s, rows, quota) in enumerate(zip(c.sources, loaded, even_quotas(wanted, c.max_val_examples))):
            where = f"data.sources[{i}].source={s.source}"
            rows, val = hold_out(rows, c.val_fraction, self.seed, where, quota)
            if val is not None:
                vals.append((val, where, s.format))
                self.hold_out_rows[where] = len(rows) + len(val)
            if train:
                enc, self.stats[f"train[{i}]"] = self._tokenize(rows, f"train[{i}]", where, s.format)
                _warn_repeated(enc, where)  # in each source: a weighted mix may repeat examples by design
                parts.append(enc.add_column("__source__", [i] * len(enc)))
        if train:
            self._mix(parts)
        if c.val_source:
            vals = [(load_rows(c.val_source, c.val_split or c.split, "data.val_source", field=c.val_field),
                     f"data.val_source={c.val_source}", None)]
        self._validation_parts(vals)
        for name, st in self.stats.items():
            log.info("data %s", st.line(name))
        if self.train_set is not None and self.val_set is not None:
            trained = {hash(tuple(ids)) for ids in self.train_set["input_ids"]}
            self._warn_val_in_train(trained, "data.sources")

    def _mix(self, parts: list[datasets.Dataset]) -> None:
        """The training set: the sources' tokenized examples mixed by their weights, with the counts per source."""
        c = self.cfg
        mixed = mix_sources(parts, [s.weight for s in c.sources], self.seed, c.stopping_strategy)
        counts = Counter(mixed["__source__"])
        for i in range(len(parts)):
            st = self.stats[f"train[{i}]"]
            st.in_mix, st.passes = counts[i], counts[i] / st.kept
        self.train_set = mixed.remove_columns("__source__")
        self.fmt = self.formats["train[0]"]
        self.stats["train"] = SplitStats.total([self.stats[f"train[{i}]"] for i in range(len(parts))])
        self.stats["train"].kept = len(mixed)
        self.stats["train"].tokens = sum(self.train_set["length"])
        self.stats["train"].target_tokens = sum(self.train_set["n_targets"])

    def _validation_parts(self, parts: list[tuple[datasets.Dataset, str, str | None]]) -> None:
        """Validation examples from several sources, each in its own format, up to data.max_val_examples in all."""
        sets, stats, renames = [], [], role_map(self.cfg.roles)
        quotas = even_quotas([len(rows) for rows, _, _ in parts], self.cfg.max_val_examples)
        for i, ((rows, where, fmt), quota) in enumerate(zip(parts, quotas)):
            rows = rows.select(range(quota))
            if not len(rows):
                continue
            enc, st = self._tokenize(rows, f"validation[{i}]", where, fmt)
            sets.append(enc)
            stats.append(st)
            self.val_rows += [to_messages(r, self.formats[f"validation[{i}]"], locate(where, r), renames) for r in rows]
        if sets:
            self.val_set, self.stats["val"] = datasets.concatenate_datasets(sets), SplitStats.total(stats)
            self.formats["validation"] = next(f for k, f in self.formats.items() if k.startswith("validation["))

    # ----- Lightning hooks
    def setup(self, stage: str | None = None) -> None:
        self.prepare()

    def _loader(self, dataset: datasets.Dataset, plan: BatchPlan) -> DataLoader:
        examples = MaskedRows(dataset.select_columns(["input_ids", "labels"]))
        collate = (
            collate_packed
            if self.cfg.packing
            else functools.partial(collate_padded, pad_id=self.tokenizer.pad_token_id)
        )
        return DataLoader(examples, batch_sampler=plan, collate_fn=collate, num_workers=self.cfg.num_workers)

    def train_fingerprint(self) -> str | None:
        """The training set as a resume depends on it: its example count and a hash of every example's tokens
        and labels, in order (read as Arrow buffers: under a second for 20M tokens on a laptop CPU); None for a stream,
        whose position is its own record."""
        if self.stream is not None or self.train_set is None:
            return None
        digest = hashlib.sha256()
        for table in self.train_set.with_format("arrow").iter(batch_size=16384):
            for name in ("input_ids", "labels"):
                column = table.column(name).combine_chunks()
                digest.update(np.asarray(column.value_lengths(), dtype=np.int64).tobytes())
                digest.update(np.asarray(column.flatten(), dtype=np.int64).tobytes())
        return f"{len(self.train_set)} examples, tokens sha256 {digest.hexdigest()[:16]}"

    def make_plan(self, dataset: datasets.Dataset, shuffle: bool, sharded: bool = True) -> BatchPlan:
        """The batch plan of `dataset`; `sharded` gives this rank's share when a Trainer runs distributed."""
        trainer = self.trainer if sharded else None
        return BatchPlan(
            dataset["length"],
            packing=self.cfg.packing,
            max_tokens=self.cfg.max_tokens_per_batch,
            batch_size=self.cfg.batch_size,
            seed=self.seed,
            shuffle=shuffle,
            rank=trainer.global_rank if trainer else 0,
            world_size=trainer.world_size if trainer else 1,
            pad=not shuffle,
        )

    def first_batch(self) -> dict:
        """The first training batch in a fixed order (a probe for gradient checks)."""
        if self.stream is not None:
            batch = next(iter(self._stream_batches(sharded=False, start=StreamPosition())))
            batch.pop(STREAM_KEY)
            return batch
        assert self.train_set is not None
        return next(iter(self._loader(self.train_set, self.make_plan(self.train_set, shuffle=False, sharded=False))))

    def _stream_batches(self, sharded: bool, start: StreamPosition) -> StreamBatches:
        assert self.stream is not None
        trainer = self.trainer if sharded else None
        return StreamBatches(self.stream, self.stream_sources, self.tokenizer, self.cfg, self.seed,
                             rank=trainer.global_rank if trainer else 0,
                             world_size=trainer.world_size if trainer else 1, start=start,
                             warned=self._stream_warned)

    def train_dataloader(self) -> DataLoader:
        if self.stream is not None:
            # batch_size=None: StreamBatches collates itself; it is endless, so trainer.max_steps ends training
            return DataLoader(self._stream_batches(sharded=True, start=self.stream_position), batch_size=None,
                              num_workers=self.cfg.num_workers)
        assert self.train_set is not None
        self._plan = self.make_plan(self.train_set, shuffle=True)
        if self._resume is not None:
            self._plan.resume_from(self._resume["epoch"], self._resume["batches_done"])
            self._resume = None
        if len(self._plan) == 0:
            world = self._plan.world_size
            raise DataError(
                f"the training set ({len(self.train_set)} examples) makes fewer batches than the {world} ranks, so "
                "every rank would train 0 steps.\nFix: lower data.max_tokens_per_batch (or data.batch_size without "
                "packing), add data, or run on fewer devices (trainer.devices)."
            )
        if self.cfg.packing:
            log.info("packing efficiency: %.1f%% of the token budget holds real tokens", 100 * self._plan.efficiency())
        if self._plan.left_out and self.trainer is not None and self.trainer.global_rank == 0:
            # one epoch's count is every epoch's: packing goes by length, and a shuffle only reorders equal ones
            world, left = self._plan.world_size, self._plan.left_out
            log.warning("data: %d of the %d batches of each epoch are not trained: %d ranks take %d each, and the "
                        "remainder is left out (which rows, the epoch's shuffle decides). To train every batch, "
                        "choose data.max_tokens_per_batch (or the data) so the count divides by %d.",
                        left, left + world * len(self._plan), world, len(self._plan), world)
        return self._loader(self.train_set, self._plan)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_set is None:
            return []
        return self._loader(self.val_set, self.make_plan(self.val_set, shuffle=False))

    def full_val_dataloader(self) -> DataLoader | list:
        """Every validation batch in this process (evaluation outside the distributed training loop)."""
        if self.val_set is None:
            return []
        return self._loader(self.val_set, self.make_plan(self.val_set, shuffle=False, sharded=False))

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:  # noqa: ANN401
        """A stream batch's position is recorded here, as the batch reaches training (after any prefetch)."""
        meta = batch.pop(STREAM_KEY, None) if isinstance(batch, dict) else None
        if meta is not None:
            self.stream_tokens += meta.pop("tokens")
            self.stream_batches += 1
            read = meta.pop("sources")
            self.source_rows = [a + r for a, (r, _) in zip(self.source_rows or [0] * len(read), read)]
            self.source_passes = [a + n for a, (_, n) in zip(self.source_passes or [0] * len(read), read)]
            self.stream_rows.update(meta.pop("verdicts", {}))
            self.stream_windows.update(meta.pop("windows", {}))
            self.stream_position = StreamPosition(**meta)
            if self.stream_position.steps_done == 0 and self.cfg.packing:  # a window (or the stream) ended
                log.info("stream: epoch %d, %d rows read in all; packing efficiency %.1f%% over %d batches so far%s",
                         meta["epoch"], sum(self.source_rows), 100 * self.packing_efficiency(), self.stream_batches,
                         self._sources_line())
        return batch

    def _sources_line(self) -> str:
        if len(self.source_rows) < 2:
            return ""
        return "; rows read per source " + ", ".join(
            f"train[{i}] {r} ({n} passes started)" for i, (r, n) in enumerate(zip(self.source_rows, self.source_passes)))

    def stream_report(self) -> dict[str, Any]:
        """The stream's position and counts, for metrics.json: batches, and rows and passes per source."""
        return {**vars(self.stream_position), "batches": self.stream_batches, "source_rows": self.source_rows,
                "source_passes": self.source_passes, "rows": dict(sorted(self.stream_rows.items()))} | (
                {"split_windows": self.stream_windows["split_windows"],
                 "split_windows_no_loss": self.stream_windows["split_windows_no_loss"]}
                if self.cfg.overlong == "split" else {})

    def _world_size(self) -> int:
        return self.trainer.world_size if self.trainer is not None else 1

    def packing_efficiency(self) -> float | None:
        """Real tokens / token budget over the training batches: this epoch's plan, or the stream's batches so far."""
        if not self.cfg.packing:
            return None
        if self.stream is not None:
            return self.stream_tokens / (self.stream_batches * self.cfg.max_tokens_per_batch) if self.stream_batches else None
        return self._plan.efficiency() if self._plan else None

    # ----- resume: the data position is part of the checkpoint
    def state_dict(self) -> dict[str, Any]:
        if self.cfg.streaming:
            return {"stream": {**vars(self.stream_position), "tokens": self.stream_tokens,
                               "batches": self.stream_batches, "shuffle_buffer": self.cfg.shuffle_buffer,
                               "source_rows": self.source_rows, "source_passes": self.source_passes,
                               "rows": dict(self.stream_rows), "windows": dict(self.stream_windows)}}
        trainer = self.trainer
        if trainer is None:
            return {}
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return {"epoch": trainer.current_epoch, "batches_done": done, "world_size": trainer.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state and ("stream" in state) != self.cfg.streaming:
            raise ConfigError(f"trainer.resume: the checkpoint was written with data.streaming={'stream' in state}, "
                              f"this run has data.streaming={self.cfg.streaming}, and their data positions do not "
                              f"translate.\nFix: resume with data.streaming={str('stream' in state).lower()}.")
        if state and "stream" in state:
            s = dict(state["stream"])
            shuffled = int(s.pop("shuffle_buffer", 0))  # checkpoints older than the shuffle read rows in order
            if shuffled != self.cfg.shuffle_buffer:
                raise ConfigError(f"trainer.resume: the checkpoint's stream was read with data.shuffle_buffer={shuffled}"
                                  f", this run has data.shuffle_buffer={self.cfg.shuffle_buffer}, so its position "
                                  f"would name other rows.\nFix: resume with data.shuffle_buffer={shuffled}.")
            self.stream_tokens, self.stream_batches = int(s.pop("tokens")), int(s.pop("batches"))
            self.source_rows = [int(n) for n in s.pop("source_rows", [])]  # counted since checkpoints had them
            self.source_passes = [int(n) for n in s.pop("source_passes", [])]
            self.stream_rows = Counter({k: int(v) for k, v in s.pop("rows", {}).items()})
            self.stream_windows = Counter({k: int(v) for k, v in s.pop("windows", {}).items()})
            self.stream_position = StreamPosition(**{k: int(v) for k, v in s.items()})
        elif state:
            # batches_done counts one rank's batches: on another number of ranks, the same batches of the plan
            # are done when each rank has done batches_done * saved / now (jobs/checkpoints.py resume_on_ranks)
            done = int(state["batches_done"])
            if "world_size" in state and int(state["world_size"]) != self._world_size():
                done = self._done_on_ranks(int(state["epoch"]), done, int(state["world_size"]), self._world_size())
            self._resume = {"epoch": int(state["epoch"]), "batches_done": done}

    def _done_on_ranks(self, epoch: int, done: int, saved: int, now: int) -> int:
        """The batches of epoch `epoch` each of `now` ranks has done where each of `saved` ranks had done `done`.
        An epoch whose batch count does not divide by the ranks leaves its remainder out: when the saved ranks had
        finished the epoch, the new ones have too (else one rank would train the remainder the saved ranks left
        out, as a step of its own, or a checkpoint of an epoch's end on one rank would be refused as a split)."""
        if self.train_set is not None:  # built by now in a run (setup)
            plan = self.make_plan(self.train_set, shuffle=True, sharded=False)
            plan.set_epoch(epoch)
            batches = len(plan)
            if done >= batches // saved:
                return batches // now
        if (done * saved) % now:
            raise ConfigError(f"trainer.resume: {saved} ranks had done {done} batches each, which {now} ranks "
                              f"cannot share evenly.\nFix: resume on {saved} ranks, or from a checkpoint "
                              "written at the end of an optimizer step (last.ckpt, interrupted.ckpt).")
        return done * saved // now
