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
  export.after_rename    export in place; before the replaced old export (if any) is removed
  eval.before_write      evaluation done; none of its output files written
  eval.before_metrics    predictions.jsonl and curves.png written; metrics.json (written last) not yet

Writers elsewhere (training checkpoints, adapters) add their own `<area>.<moment>` points; list them here.
"""

from __future__ import annotations

import os
import signal
import sys

ENV = "BAMBA_FT_FAULT"


def fault_point(name: str) -> None:
    """SIGKILL this process if `name` is listed in the BAMBA_FT_FAULT environment variable."""
    wanted = os.environ.get(ENV)
    if not wanted or name not in {p.strip() for p in wanted.split(",")}:
        return
    # Announce before dying so a test can tell "killed here" from "crashed earlier"; stderr may be a pipe.
    sys.stderr.write(f"{ENV}: killing process {os.getpid()} at {name}\n")
    sys.stderr.flush()
    kill = getattr(signal, "SIGKILL", None)
    if kill is None:  # Windows has no SIGKILL; _exit also skips every handler and flush
        os._exit(137)
    os.kill(os.getpid(), kill)
