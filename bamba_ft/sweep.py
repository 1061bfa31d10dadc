"""Hydra callback: after a multirun, print one table of every run's final metrics."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from bamba_ft.jobs.report import table


def _cell(value: Any, pct: bool = False) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}%" if pct else f"{value:.4f}"


class SweepSummary(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = []
        for run in sorted(sweep_dir.glob("*/"), key=lambda p: (len(p.name), p.name)):
            overrides_file = run / ".hydra" / "overrides.yaml"
            overrides = overrides_file.read_text().replace("\n- ", " ").strip("- \n") if overrides_file.exists() else ""
            metrics_file = run / "metrics.json"
            if not metrics_file.exists():
                rows.append([run.name, overrides, "failed or unfinished", "", "", ""])
                continue
            m = json.loads(metrics_file.read_text())
            after, train = m.get("after", {}), m.get("train", {})
            rows.append([run.name, overrides, _cell(after.get("val_loss")), _cell(after.get("exact_match"), True),
                         _cell(train.get("final_train_loss")), str(train.get("steps", "-"))])
        if rows:
            print(f"\nsweep {sweep_dir}:")
            print(table(rows, ["run", "overrides", "val loss", "exact match", "train loss", "steps"]))
