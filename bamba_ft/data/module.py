"""LightningDataModule: raw rows -> tokenized, length-checked examples -> packed (or padded) batches."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any

import datasets
import lightning as L
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from bamba_ft.config.schema import DataConfig
from bamba_ft.data.builtin import builtin_splits
from bamba_ft.data.formats import check_fields, detect_format, to_messages
from bamba_ft.data.load import load_rows
from bamba_ft.data.packing import BatchPlan, MaskedRows, collate_packed, collate_padded
from bamba_ft.data.tokenize import IGNORE_INDEX, tokenize_example
from bamba_ft.errors import DataError

log = logging.getLogger(__name__)
datasets.disable_progress_bars()


def _encode(row: dict, index: int, *, tokenizer, fmt: str, train_on: str, max_seq_len: int, where: str) -> dict:  # noqa: ANN001
    tok = tokenize_example(tokenizer, to_messages(row, fmt, index, where), train_on, max_seq_len, where)
    return {
        "input_ids": tok.input_ids,
        "labels": tok.labels,
        "length": len(tok.input_ids),
        "truncated": tok.truncated,
        "n_targets": sum(1 for t in tok.labels if t != IGNORE_INDEX),
    }


@dataclass
class SplitStats:
    rows: int
    kept: int
    truncated: int
    dropped_overlong: int
    dropped_no_targets: int
    tokens: int
    target_tokens: int

    def line(self, name: str) -> str:
        return (
            f"{name}: {self.kept}/{self.rows} examples, {self.tokens} tokens ({self.target_tokens} with loss); "
            f"truncated {self.truncated}, dropped {self.dropped_overlong} overlong, "
            f"{self.dropped_no_targets} with no loss tokens"
        )


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

    # ----- building the splits
    def _raw_splits(self) -> tuple[datasets.Dataset, datasets.Dataset | None]:
        c = self.cfg
        if c.source == "builtin":
            train, val = builtin_splits(c.builtin_kind, c.builtin_train_examples, c.builtin_val_examples, self.seed)
            return datasets.Dataset.from_list(train), datasets.Dataset.from_list(val)
        train = load_rows(c.source, c.split, "data.source")
        if c.val_source:
            return train, load_rows(c.val_source, c.val_split or c.split, "data.val_source")
        if c.val_split:
            return train, load_rows(c.source, c.val_split, "data.val_split")
        if c.val_fraction <= 0 or len(train) < 2:
            return train, None
        parts = train.train_test_split(test_size=c.val_fraction, seed=self.seed, shuffle=True)
        return parts["train"], parts["test"]

    def _tokenize(self, rows: datasets.Dataset, name: str, where: str) -> tuple[datasets.Dataset, SplitStats]:
        c = self.cfg
        if len(rows) == 0:
            raise DataError(f"{where}: the {name} split has no rows.")
        fmt = c.format if c.format != "auto" else detect_format(rows.column_names, where)
        check_fields(fmt, rows.column_names, where)
        self.fmt = self.fmt or fmt
        self.formats[name] = fmt
        encode = functools.partial(
            _encode, tokenizer=self.tokenizer, fmt=fmt, train_on=c.train_on, max_seq_len=c.max_seq_len, where=where
        )
        enc = rows.map(
            encode,
            with_indices=True,
            remove_columns=rows.column_names,
            num_proc=c.num_proc if c.num_proc > 1 else None,
            desc=f"tokenizing {name}",
        )
        keep_overlong = c.overlong == "truncate"
        flags = list(zip(enc["truncated"], enc["n_targets"]))
        overlong = sum(1 for t, _ in flags if t)
        no_targets = sum(1 for t, n in flags if n == 0 and (keep_overlong or not t))
        kept = enc.filter(
            lambda t, n: n > 0 and (keep_overlong or not t), input_columns=["truncated", "n_targets"]
        )
        stats = SplitStats(
            rows=len(rows),
            kept=len(kept),
            truncated=sum(1 for t, n in flags if t and n > 0) if keep_overlong else 0,
            dropped_overlong=0 if keep_overlong else overlong,
            dropped_no_targets=no_targets,
            tokens=sum(kept["length"]),
            target_tokens=sum(kept["n_targets"]),
        )
        if stats.kept == 0:
            raise DataError(
                f"{where}: no {name} examples left after filtering ({stats.line(name)}).\n"
                f"Fix: raise data.max_seq_len (now {c.max_seq_len}), set data.overlong=truncate, "
                "or check that rows have assistant/completion text."
            )
        return kept, stats

    def prepare(self) -> None:
        """Load and tokenize both splits (idempotent)."""
        if self.train_set is not None:
            return
        where = "data.source=builtin" if self.cfg.source == "builtin" else f"data.source={self.cfg.source}"
        train_rows, val_rows = self._raw_splits()
        self.train_set, self.stats["train"] = self._tokenize(train_rows, "train", where)
        if val_rows is not None and len(val_rows):
            val_rows = val_rows.select(range(min(len(val_rows), self.cfg.max_val_examples)))
            val_where = f"data.val_source={self.cfg.val_source}" if self.cfg.val_source else where
            self.val_set, self.stats["val"] = self._tokenize(val_rows, "validation", val_where)
            self.val_rows = [to_messages(r, self.formats["validation"], i, val_where) for i, r in enumerate(val_rows)]
        for name, st in self.stats.items():
            log.info("data %s", st.line(name))

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
        assert self.train_set is not None
        return next(iter(self._loader(self.train_set, self.make_plan(self.train_set, shuffle=False, sharded=False))))

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None
        self._plan = self.make_plan(self.train_set, shuffle=True)
        if self._resume is not None:
            self._plan.set_epoch(self._resume["epoch"])
            self._plan.skip = self._resume["batches_done"]
            self._resume = None
        if self.cfg.packing:
            log.info("packing efficiency: %.1f%% of the token budget holds real tokens", 100 * self._plan.efficiency())
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

    # ----- resume: the data position is part of the checkpoint
    def state_dict(self) -> dict[str, Any]:
        trainer = self.trainer
        if trainer is None:
            return {}
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return {"epoch": trainer.current_epoch, "batches_done": done}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self._resume = {"epoch": int(state["epoch"]), "batches_done": int(state["batches_done"])}
