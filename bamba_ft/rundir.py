"""The layout of a run directory, in one place: every job asks `RunDir` where a run's files are.

    <run>/run_config.yaml         the resolved config of the run
    <run>/adapter/ or model/      the trained weights (peft adapter for LoRA runs, full weights otherwise)
    <run>/checkpoints/last.ckpt   the resumable state (also interrupted.ckpt after a stop, best-*.ckpt)
    <run>/logs/{csv,tensorboard}  the loggers' files
    <run>/metrics.json, predictions.jsonl, curves.png
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

RUN_CONFIG = "run_config.yaml"
ADAPTER_DIR = "adapter"  # peft adapter (LoRA runs)
MODEL_DIR = "model"  # full weights (full fine-tuning runs)
LAST = "last.ckpt"
INTERRUPTED = "interrupted.ckpt"
RESUMABLE = (INTERRUPTED, LAST)  # plus best-*.ckpt, which hold the full training state too


@dataclass(frozen=True)
class RunDir:
    root: Path

    def __init__(self, root: str | Path) -> None:
        object.__setattr__(self, "root", Path(root))

    @classmethod
    def of_checkpoint(cls, ckpt: Path) -> RunDir:
        """The run a checkpoint file (<run>/checkpoints/NAME.ckpt) belongs to."""
        return cls(Path(ckpt).parent.parent)

    @property
    def run_config(self) -> Path:
        return self.root / RUN_CONFIG

    @property
    def adapter(self) -> Path:
        return self.root / ADAPTER_DIR

    @property
    def full_model(self) -> Path:
        return self.root / MODEL_DIR

    def weights(self, peft_method: str) -> Path:
        """Where training saves its result: the adapter of a LoRA run, the full weights otherwise."""
        return self.adapter if peft_method == "lora" else self.full_model

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def trained_outputs(self) -> list[str]:
        """What a training run left here (its metrics, weights, checkpoints), relative to the run directory."""
        found = [p for p in (self.metrics, self.adapter, self.full_model) if p.exists()]
        found += sorted(self.checkpoints.glob("*.ckpt")) if self.checkpoints.is_dir() else []
        return [str(p.relative_to(self.root)) for p in found]

    def training_run(self) -> list[str]:
        """`trained_outputs` when this directory holds a training run (its run config beside them), else []: an
        evaluation's own directory has a metrics.json too."""
        return self.trained_outputs() if self.run_config.exists() else []

    @property
    def last_ckpt(self) -> Path:
        return self.checkpoints / LAST

    @property
    def interrupted_ckpt(self) -> Path:
        return self.checkpoints / INTERRUPTED

    def resumable_checkpoints(self) -> list[Path]:
        """Checkpoints that hold the full training state, newest first."""
        found = [p for p in self.checkpoints.glob("*.ckpt") if p.name in RESUMABLE or p.name.startswith("best")]
        return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def csv_logs(self) -> Path:
        return self.logs / "csv"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.json"

    @property
    def predictions(self) -> Path:
        return self.root / "predictions.jsonl"

    @property
    def curves(self) -> Path:
        return self.root / "curves.png"
