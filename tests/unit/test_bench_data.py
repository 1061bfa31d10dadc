"""The data pipeline benchmark's rows and table (on ~100 rows, in this process), and its memory accounting;
speed itself is never asserted."""

from __future__ import annotations

import multiprocessing
import os

import pytest

from bamba_ft.jobs.bench_data import MIB, data_pipeline, data_pipeline_lines, tree_rss


def test_data_pipeline_rows_and_table() -> None:
    # data.num_proc=2: the in-memory rows are tokenized by two worker processes (1, the default, by every training
    # test); a fresh source file, so nothing is read back from the datasets cache
    d = data_pipeline(120, [2], ["memory", "stream"], seed=0, isolate=False)
    memory, stream = d["rows"]
    assert (memory["path"], memory["num_proc"], stream["path"]) == ("memory", 2, "stream")
    # one streamed pass packs every example the in-memory epoch does, as the two processes tokenized them
    assert memory["examples"] == stream["examples"] == 120 and memory["tokens"] == stream["tokens"] > 0
    for r in d["rows"]:
        assert r["examples_per_s"] == pytest.approx(r["examples"] / r["total_s"], rel=1e-12)
        assert r["tokens_per_s"] == pytest.approx(r["tokens"] / r["total_s"], rel=1e-12)
        assert 0.5 < r["packing_efficiency"] <= 1.0 and r["peak_rss_mib"] >= r["baseline_rss_mib"] > 0
    assert memory["total_s"] >= memory["prepare_s"] + memory["pack_s"] + memory["collate_s"]
    table = [line for line in data_pipeline_lines(d) if line.startswith("|")]
    assert len(table) == 4 and {line.count("|") for line in table} == {13}
    assert table[2].startswith("| memory | 2 | 120 | ") and table[3].startswith("| stream | 1 | 120 | ")
    assert table[3].split(" | ")[5:7] == ["-", "-"]  # a stream packs and collates inside its pass


def _hold(n: int, ready, done) -> None:  # noqa: ANN001
    buf = bytearray(n)
    buf[::4096] = b"\x01" * len(range(0, n, 4096))  # touch every page, so all of it is resident
    ready.set()
    done.wait(30)


def test_tree_rss_counts_a_workers_private_memory_not_what_it_shares() -> None:
    """A forked worker's RSS includes the parent's pages it shares (hundreds of MiB here); only its own count."""
    ctx = multiprocessing.get_context("fork")
    ready, done = ctx.Event(), ctx.Event()
    before = tree_rss(os.getpid())
    worker = ctx.Process(target=_hold, args=(200 * MIB, ready, done))
    worker.start()
    try:
        assert ready.wait(30)
        grown = (tree_rss(os.getpid()) - before) / MIB
    finally:
        done.set()
        worker.join()
    # the 200 MiB, plus the pages the worker's interpreter wrote (3.5 MiB measured; its whole RSS added 505 MiB)
    assert 195 <= grown <= 240
