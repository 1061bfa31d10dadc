"""The data pipeline benchmark: generated chat rows read, tokenized, packed and collated, in memory (at each
bench.data_pipeline_num_proc) and streamed, each configuration in a fresh process so its peak memory is its own.

`python -m bamba_ft.jobs.bench_data PATH NUM_PROC SOURCE` measures one configuration and prints its row as JSON.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

log = logging.getLogger("bamba_ft")
PATHS = ("memory", "stream")
RSS_INTERVAL_S = 0.1
MIB = 2**20


def write_chat_rows(path: Path, n: int, seed: int) -> None:
    """`n` builtin chat rows as JSON Lines, generated in chunks so that a million never sit in memory at once."""
    from bamba_ft.data.builtin import generate_sft

    chunk = 60_000  # a multiple of the 6 skills, so every chunk cycles through them evenly
    with path.open("w") as f:
        for start in range(0, n, chunk):
            f.write("".join(json.dumps(r) + "\n" for r in generate_sft(min(chunk, n - start), seed + start)))


def _private_bytes(pid: int) -> int:
    """Memory only process `pid` holds (USS: private clean + dirty pages), from /proc/PID/smaps_rollup."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:])
    return sum(int(fields[k].split()[0]) for k in ("Private_Clean", "Private_Dirty")) * 1024  # kB


def tree_rss(root: int) -> int:
    """Resident bytes of process `root` plus the private memory of its descendants (datasets.map workers), from
    Linux's /proc. A forked worker shares the parent's pages until it writes them: adding its whole RSS would
    count those pages twice."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])  # "pid (comm) state ppid ..."
        except (OSError, IndexError, ValueError):
            continue  # the process ended while being read
        children.setdefault(ppid, []).append(int(stat.parent.name))
    total = int(Path(f"/proc/{root}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            total += _private_bytes(pid)
        except (OSError, KeyError, IndexError, ValueError):
            pass  # ended while being read
    return total


class PeakRSS:
    """The largest `tree_rss` of this process, sampled every RSS_INTERVAL_S in a thread, and its value at entry."""

    def __enter__(self) -> PeakRSS:
        self.baseline = self.peak = tree_rss(os.getpid())
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(RSS_INTERVAL_S):
            self.peak = max(self.peak, tree_rss(os.getpid()))

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, tree_rss(os.getpid()))


def measure(path: str, num_proc: int, source: str) -> dict:
    """One configuration in this process: the default data settings on `source`, no validation hold-out."""
    from bamba_ft.config.schema import DataConfig
    from bamba_ft.data.builtin import build_char_tokenizer
    from bamba_ft.data.module import BambaDataModule
    from bamba_ft.data.stream import STREAM_KEY, StreamBatches

    tok = build_char_tokenizer()
    cfg = DataConfig(source=source, val_fraction=0.0, num_proc=num_proc, streaming=path == "stream")
    row: dict = {"path": path, "num_proc": num_proc}
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        dm = BambaDataModule(cfg, tok)
        dm.prepare()
        t1 = time.perf_counter()
        if path == "memory":
            loader = dm.train_dataloader()  # builds this epoch's plan: best-fit packing of every example
            t2 = time.perf_counter()
            batches = sum(1 for _ in loader)  # each batch collated, as an epoch of training does
            examples, tokens = dm.stats["train"].kept, dm.stats["train"].tokens
            row |= {"pack_s": t2 - t1, "collate_s": time.perf_counter() - t2}
        else:  # one pass: rows read, shuffled, tokenized, packed window by window and collated as they come
            examples = tokens = batches = 0
            for batch in StreamBatches(dm.stream, dm.stream_sources, tok, cfg, dm.seed):
                examples += len(batch["cu_seq_lens_q"]) - 1
                tokens += batch[STREAM_KEY]["tokens"]
                batches += 1
                if batch[STREAM_KEY]["epoch"] == 1:
                    break
        total = time.perf_counter() - t0
    return row | {
        "examples": examples, "tokens": tokens, "batches": batches, "prepare_s": t1 - t0, "total_s": total,
        "examples_per_s": examples / total, "tokens_per_s": tokens / total,
        "packing_efficiency": tokens / (batches * cfg.max_tokens_per_batch),
        "baseline_rss_mib": rss.baseline / MIB, "peak_rss_mib": rss.peak / MIB,
    }


def measure_isolated(path: str, num_proc: int, source: str) -> dict:
    """`measure` in a fresh interpreter with an empty datasets cache (nothing tokenized before is reused)."""
    root = str(Path(__file__).resolve().parents[2])
    with tempfile.TemporaryDirectory(prefix="bamba_ft_bench_cache_") as cache:
        env = {**os.environ, "HF_DATASETS_CACHE": cache, "TOKENIZERS_PARALLELISM": "false",
               "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
        proc = subprocess.run([sys.executable, "-m", "bamba_ft.jobs.bench_data", path, str(num_proc), source],
                              env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        return {"path": path, "num_proc": num_proc, "error": f"exit {proc.returncode}: {tail}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def data_pipeline(n: int, num_procs: list[int], paths: list[str], seed: int, isolate: bool = True) -> dict:
    """Every configuration on the same `n` generated chat rows (written as JSON Lines first, untimed)."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="bamba_ft_bench_data_") as tmp:
        source = Path(tmp) / "chat.jsonl"
        write_chat_rows(source, n, seed)
        for path in paths:
            for num_proc in num_procs if path == "memory" else [1]:  # a stream is tokenized as it is read
                row = (measure_isolated if isolate else measure)(path, num_proc, str(source))
                log.info("bench data pipeline: %s", json.dumps(row))
                rows.append(row)
    return {"examples": n, "rows": rows}


def data_pipeline_lines(d: dict) -> list[str]:
    """The markdown table of `data_pipeline`'s rows."""
    lines = ["", f"data pipeline: {d['examples']:,} builtin chat rows from JSON Lines, default data settings, each "
                 "configuration in a fresh process. prepare: read and tokenize every row (memory), open the stream "
                 "(stream: its one pass, read, shuffled, tokenized, packed and collated, is in the total). Peak memory: "
                 f"RSS of the process plus the private memory of its worker processes, sampled every "
                 f"{RSS_INTERVAL_S} s, and its rise over the start",
             "", "| path | data.num_proc | examples | tokens | prepare s | pack s | collate s | total s | "
                 "examples/s | tokens/s | packing | peak memory MiB (rise) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in d["rows"]:
        if "error" in r:
            lines.append(f"| {r['path']} | {r['num_proc']} | {r['error']} |")
            continue
        split = [f"{r[k]:.1f}" if k in r else "-" for k in ("pack_s", "collate_s")]
        lines.append(f"| {r['path']} | {r['num_proc']} | {r['examples']:,} | {r['tokens']:,} | {r['prepare_s']:.1f} | "
                     f"{' | '.join(split)} | {r['total_s']:.1f} | {r['examples_per_s']:,.0f} | "
                     f"{r['tokens_per_s']:,.0f} | {100 * r['packing_efficiency']:.1f}% | {r['peak_rss_mib']:,.0f} "
                     f"(+{r['peak_rss_mib'] - r['baseline_rss_mib']:,.0f}) |")
    return lines


if __name__ == "__main__":
    from bamba_ft import quiet

    quiet.silence_import_noise()
    print(json.dumps(measure(sys.argv[1], int(sys.argv[2]), sys.argv[3])))
