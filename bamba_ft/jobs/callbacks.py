"""Lightning plumbing: atomic checkpoint files and a stop at a step boundary on Ctrl-C or SIGTERM."""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary name, then renames it: a crash never leaves a truncated .ckpt."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        path = Path(path)
        tmp = path.with_name(f".{path.name}.partial")
        try:
            super().save_checkpoint(checkpoint, tmp, storage_options)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


class GracefulStop(L.Callback):
    """First Ctrl-C or SIGTERM: finish the current optimizer step, save `interrupted.ckpt`, stop.

    A second Ctrl-C stops at once without a checkpoint. Stopping between steps means the checkpoint never
    holds a half-applied update or a half-accumulated gradient.
    """

    def __init__(self, ckpt_dir: Path) -> None:
        self.ckpt_path = ckpt_dir / "interrupted.ckpt"
        self.requested: str | None = None
        self.stopped_at: int | None = None
        self._last_step = -1

    def _handler(self, signum: int, frame: Any) -> None:
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        log.warning("\n%s received: stopping after this optimizer step (Ctrl-C again to abort without saving)",
                    self.requested)

    @contextmanager
    def installed(self) -> Iterator[None]:
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for s in previous:
            signal.signal(s, self._handler)
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        stepped = trainer.global_step != self._last_step
        self._last_step = trainer.global_step
        if (self.requested or trainer.received_sigterm) and stepped and self.stopped_at is None:
            self.ckpt_path.parent.mkdir(parents=True, exist_ok=True)
            trainer.save_checkpoint(self.ckpt_path, weights_only=False)
            self.stopped_at = trainer.global_step
            trainer.should_stop = True


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest of last.ckpt and interrupted.ckpt in a run's checkpoints/ directory."""
    found = [p for p in (run_dir / "checkpoints").glob("*.ckpt") if p.name in ("last.ckpt", "interrupted.ckpt")]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None
