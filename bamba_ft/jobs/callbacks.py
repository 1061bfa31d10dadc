"""Lightning plumbing: atomic checkpoint files that carry the run's config, and a stop at a step boundary on Ctrl-C
or SIGTERM."""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Checkpoint, EarlyStopping, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason

from bamba_ft.config.schema import RunConfig
from bamba_ft.faults import fault_point
from bamba_ft.jobs.checkpoints import (
    BEFORE_KEY,
    CONFIG_KEY,
    DATA_KEY,
    MID_STEP_KEY,
    WORLD_KEY,
    config_for_checkpoint,
    fsync_dir,
    resume_on_ranks,
)

log = logging.getLogger(__name__)


# Exit status of a run stopped by a signal after saving its checkpoint: 128 + the signal's number, as a shell
# reports a process killed by it, so schedulers and scripts tell a stopped run from a finished one.
STOPPED_EXIT = {"SIGINT": 130, "SIGTERM": 143}


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary name, syncs it, then renames it: a crash never leaves a truncated .ckpt
    under a checkpoint's name (a `.name.partial` left by a killed process is removed by the next resume)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        path = Path(path)
        tmp = path.with_name(f".{path.name}.partial")
        try:
            super().save_checkpoint(checkpoint, tmp, storage_options)
            fault_point("checkpoint.before_rename")
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
            fsync_dir(path.parent)
        finally:
            tmp.unlink(missing_ok=True)


class ConfigInCheckpoint(L.Callback):
    """Stores the run's config and number of ranks in every checkpoint, so a resume can tell what it would change
    and continue on another number of ranks."""

    def __init__(self, cfg: RunConfig, data_fingerprint: str | None = None, before: dict | None = None) -> None:
        self.config = config_for_checkpoint(cfg)
        self.data = data_fingerprint
        self.before = before or {}  # the metrics before training, for the summary of a resumed run

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint[CONFIG_KEY] = self.config
        checkpoint[WORLD_KEY] = trainer.world_size
        if trainer.accumulate_grad_batches > 1 and trainer.state.fn == "fit" and not trainer.sanity_checking:
            # a validation every N batches may fall between the batches of one step (best-* is written there)
            checkpoint[MID_STEP_KEY] = bool(trainer.fit_loop.epoch_loop._should_accumulate())
        if self.data is not None:
            checkpoint[DATA_KEY] = self.data
        if self.before:
            checkpoint[BEFORE_KEY] = self.before

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        resume_on_ranks(checkpoint, trainer.world_size, trainer.accumulate_grad_batches)  # before the loops restore


def _no_collective_in_a_handler(signum: int, frame: Any) -> None:
    log.info("SIGTERM received by this rank")


def validates_now(trainer: L.Trainer) -> bool:
    """Whether the fit runs a scheduled validation right after the training batch that just ended. Asked in
    on_train_batch_end, before anything sets trainer.should_stop (with which Lightning validates as it stops)."""
    if not trainer.enable_validation or not sum(trainer.num_val_batches):
        return False
    loop = trainer.fit_loop
    return loop.epoch_loop._should_check_val_fx(loop._data_fetcher)


class StepCheckpoint(ModelCheckpoint):
    """The periodic last.ckpt. At a step that also validates it is written after that validation, as Lightning
    writes a monitored checkpoint: it then holds the validation's early-stopping count and best-* ranking, and a
    resume from it goes on after that validation. Written before it, a resume would skip the validation (Lightning
    does not repeat one whose step has passed) and count one fewer towards early stopping."""

    @property
    def state_key(self) -> str:
        # ModelCheckpoint's, so checkpoints written with it and with this class restore each other's state
        return super().state_key.replace(type(self).__qualname__, ModelCheckpoint.__qualname__, 1)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        every = self._every_n_train_steps
        if every >= 1 and trainer.global_step % every == 0 and not self._should_skip_saving_checkpoint(trainer) \
                and validates_now(trainer):
            self._defer_save_until_validation = True  # ModelCheckpoint.on_validation_end saves it
            return
        start = time.perf_counter()
        super().on_train_batch_end(trainer, pl_module, *args)
        if exclude := getattr(pl_module, "exclude_from_rate", None):  # the save is no training time
            exclude(time.perf_counter() - start)


class StepLearningRateMonitor(LearningRateMonitor):
    """The learning rate once per logged optimizer step. Lightning's monitor logs it before every training batch of a
    logged step, so with trainer.accumulate_grad_batches=N the logs held each step's rate N times over."""

    def __init__(self) -> None:
        super().__init__(logging_interval="step")
        self._logged_step: int | None = None

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        step = trainer.fit_loop.epoch_loop._batches_that_stepped  # the step the logs record, as Lightning's monitor
        if step == self._logged_step:  # a later micro-batch of a step already logged: the same rate
            return
        if trainer._logger_connector.should_update_logs:
            self._logged_step = step
        super().on_train_batch_start(trainer, *args, **kwargs)


class GracefulStop(Checkpoint):
    """First Ctrl-C or SIGTERM: finish the current optimizer step, save `interrupted.ckpt`, stop.

    A second Ctrl-C stops at once without a checkpoint. Stopping between steps means the checkpoint never
    holds a half-applied update or a half-accumulated gradient. At a step that also validates, the checkpoint is
    written after that validation (as last.ckpt is, StepCheckpoint), so a resume counts it towards early stopping;
    should that validation end the fit by early stopping, the run finishes there instead. As a Checkpoint,
    Lightning runs it after the other callbacks, so that save sees early stopping's and best-*'s updates.

    With several ranks every rank must stop at the same step, since saving is collective; yet a signal reaches
    the ranks at different moments (or only rank 0: `docker stop`, Kubernetes) and possibly more than once. So
    the handler only records it, and after each optimizer step the ranks agree by one all-reduce whether any of
    them was asked to stop. Lightning's own SIGTERM handler runs a broadcast inside the signal handler and
    forwards the signal to the other ranks, whose handlers broadcast again: their collectives no longer pair
    up and the ranks hang. It is replaced by a no-op under several ranks.
    """

    def __init__(self, ckpt_dir: Path) -> None:
        self.ckpt_path = ckpt_dir / "interrupted.ckpt"
        self.requested: str | None = None
        self.stopped_at: int | None = None
        self._after_validation = False  # the stop's checkpoint waits for this step's validation
        self._last_step = -1
        self._mid_step = False  # the last training batch accumulated a gradient the optimizer has not applied

    def _handler(self, signum: int, frame: Any) -> None:
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        log.warning("\n%s received: stopping after this optimizer step%s", self.requested,
                    " (Ctrl-C again to abort without saving)" if signum == signal.SIGINT else "")

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

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # before the fit registers Lightning's handlers, which call this handler too (it is installed by then)
        connector = getattr(trainer, "_signal_connector", None)
        if trainer.world_size > 1 and hasattr(connector, "_sigterm_notifier_fn"):
            connector._sigterm_notifier_fn = _no_collective_in_a_handler

    def _agreed(self, trainer: L.Trainer) -> bool:
        """Whether any rank was asked to stop (collective: every rank calls it at the same optimizer step)."""
        import torch
        import torch.distributed as dist

        codes = ("SIGINT", "SIGTERM")
        asked = torch.tensor([codes.index(self.requested) + 1 if self.requested else 0], device=trainer.strategy.root_device)
        dist.all_reduce(asked, op=dist.ReduceOp.MAX)
        if int(asked.item()) and self.requested is None:
            self.requested = codes[int(asked.item()) - 1]  # a rank the signal did not reach
        return self.requested is not None

    def _stop_here(self, trainer: L.Trainer, sigterm_only: bool = False) -> None:
        """Save `interrupted.ckpt` and stop, if a stop was asked for and the state is at an optimizer step."""
        if self.stopped_at is not None or self._after_validation or trainer.sanity_checking:
            return
        if self._mid_step:
            return  # half-accumulated gradient: wait for the step
        if trainer.world_size > 1:
            # ranks agree after an optimizer step only; Lightning's check of SIGTERM elsewhere no longer fires
            if sigterm_only or not self._agreed(trainer):
                return
        elif not (trainer.received_sigterm or (self.requested is not None and not sigterm_only)):
            return
        if not sigterm_only and validates_now(trainer):
            self._after_validation = True
        else:
            self._save(trainer)
        trainer.should_stop = True

    def _save(self, trainer: L.Trainer) -> None:
        self.ckpt_path.parent.mkdir(parents=True, exist_ok=True)
        trainer.save_checkpoint(self.ckpt_path, weights_only=False)
        self.stopped_at = trainer.global_step

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_step, self._mid_step = trainer.global_step, False  # a resumed fit starts at its step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        # A batch that stepped ends a step, an epoch's shorter last step included; one that did not is inside one.
        stepped = trainer.global_step != self._last_step
        self._last_step, self._mid_step = trainer.global_step, not stepped
        if stepped:
            self._stop_here(trainer)

    # Lightning ends a fit on SIGTERM at its next check, which may come during validation or at an epoch's end,
    # before another training batch ends: the state there is the last optimizer step's, so save it there too.
    def on_validation_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.state.fn == "fit":
            self._stop_here(trainer, sigterm_only=True)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn != "fit":
            return
        if self._after_validation:
            self._after_validation = False
            if not any(isinstance(c, EarlyStopping) and c.stopping_reason != EarlyStoppingReason.NOT_STOPPED
                       for c in trainer.callbacks):
                self._save(trainer)
            # else early stopping ends the fit at this validation: the run finishes as it would have uninterrupted
            return
        self._stop_here(trainer, sigterm_only=True)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop_here(trainer, sigterm_only=True)


class PatientEarlyStopping(EarlyStopping):
    """Lightning's EarlyStopping, whose patience on a resume is the command line's (trainer.early_stopping_patience
    applies from the resumed step, as the other schedule keys do), not the one the checkpoint recorded. It also
    keeps the lowest val/loss of the run, resumes included: its best_score is the last loss that improved by more
    than min_delta, and the best-* checkpoints (none with trainer.save_top_k=0, those of this directory only after
    a resume into another) need not know the lowest."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lowest: float | None = None

    def _evaluate_stopping_criteria(self, current: Any) -> tuple[bool, str | None]:
        if bool(current.isfinite()) and (self.lowest is None or float(current) < self.lowest):
            self.lowest = float(current)
        return super()._evaluate_stopping_criteria(current)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "lowest": self.lowest}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        patience = self.patience
        super().load_state_dict(state_dict)
        self.patience = patience
        self.lowest = state_dict.get("lowest")  # None from a checkpoint written before it was kept
