"""Fault injection for crash-consistency tests: kill this process at a named point of a writer.

Set `BAMBA_FT_FAULT` to a comma-separated list of point names; when the code reaches `fault_point(name)` for a
listed name, the process sends itself SIGKILL, which no handler, `finally` or `atexit` can intercept, so the
files on disk are exactly what a power cut or an OOM kill would leave. Unset (the normal case) it costs one
environment lookup.

    BAMBA_FT_FAULT=export.before_rename python -m bamba_ft task=export export.checkpoint=runs/x

Points (name: where the process dies):
  export.after_save      model, tokenizer and generation config written into the temporary directory
  export.before_verify   same files, plus the attention setting stripped from config.json; before the reload check
  export.after_verify    reload check passed; model card and export_report.json not yet written
  export.before_rename   temporary directory complete (export_report.json written); before it is moved onto the target
  export.mid_replace     overwriting: the old export moved aside to .<target>.old; the new one not yet moved in
  export.after_rename    export in place (its owner file still inside); the replaced old export not yet removed
  eval.before_write      evaluation done; none of its output files written
  eval.before_metrics    predictions.jsonl and curves.png written; metrics.json (written last) not yet
  checkpoint.before_rename  a training checkpoint fully written under its temporary name, not yet renamed
  adapter.before_rename  the trained adapter (or full weights) and tokenizer written to .adapter.partial, not yet renamed

A point written `name@N` fires the N-th time it is reached (`checkpoint.before_rename@2`: the second save).

Raising points (name: where an exception is raised instead, standing in for a failure that cannot be provoked on
every machine):
  train.forward_oom      torch.OutOfMemoryError at the start of a training forward: the first is the gradient
                         probe before training, the second the first training step
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable

ENV = "BAMBA_FT_FAULT"
_hits: dict[str, int] = {}  # times each point was reached in this process


def _fires(name: str) -> bool:
    wanted = os.environ.get(ENV)
    if not wanted:
        return False
    # `name@N` fires on the N-th time the point is reached (e.g. the second periodic checkpoint), `name` on the first
    _hits[name] = _hits.get(name, 0) + 1
    return any(p.strip() in (name, f"{name}@{_hits[name]}") for p in wanted.split(","))


def raise_point(name: str, error: Callable[[], BaseException]) -> None:
    """Raise `error()` if `name` is listed in the BAMBA_FT_FAULT environment variable."""
    if _fires(name):
        sys.stderr.write(f"{ENV}: raising at {name}\n")
        raise error()


def fault_point(name: str) -> None:
    """SIGKILL this process if `name` is listed in the BAMBA_FT_FAULT environment variable."""
    if not _fires(name):
        return
    # Announce before dying so a test can tell "killed here" from "crashed earlier"; stderr may be a pipe.
    sys.stderr.write(f"{ENV}: killing process {os.getpid()} at {name}\n")
    sys.stderr.flush()
    kill = getattr(signal, "SIGKILL", None)
    if kill is None:  # Windows has no SIGKILL; _exit also skips every handler and flush
        os._exit(137)
    os.kill(os.getpid(), kill)
