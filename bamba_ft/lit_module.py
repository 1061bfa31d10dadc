"""LightningModule: token-weighted loss, AdamW with warmup + decay, metrics; it builds no model.

An optimizer step's gradient is that of the mean loss over every target token of the step: of all its accumulated
micro-batches on all ranks. Each micro-batch's backward runs on its summed loss over `loss_unit` (a constant of the
run, so every micro-batch and rank weighs its tokens alike, and 16-bit gradients stay in range), and before the
step the gradients are rescaled by the step's target tokens. A mean per micro-batch, which Lightning averages over
the accumulated batches (and DDP over the ranks), would weight the tokens of a batch with few targets up, and
halve the gradient of an epoch's last step when it holds one batch of two. A step of one micro-batch on one rank
backpropagates its mean loss directly.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import GradClipAlgorithmType
from torch import nn

from bamba_ft.config.schema import OptimConfig
from bamba_ft.data.packing import LOSS_INDEX
from bamba_ft.errors import ModelError
from bamba_ft.faults import raise_point
from bamba_ft.model.memory import activation_memory
from bamba_ft.model.objective import loss_sum_and_count
from bamba_ft.model.quant import is_quantized


def lr_lambda(step: int, warmup: int, total: int, schedule: str, floor: float) -> float:
    """Multiplier of the peak learning rate at optimizer step `step`."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress
    return floor + (1.0 - floor) * shape


FUSED_DEVICES = ("cuda",)  # where AdamW runs fused (torch has a fused CPU AdamW too; it does not pay for LoRA)


def fused_adamw(params: list[torch.Tensor], scaled: bool) -> bool:
    """AdamW fused on plain tensors of `FUSED_DEVICES`. Sharded (DTensor) parameters take the foreach path, and so
    does a run with a gradient scaler (16-mixed): a fused step unscales the gradients itself, after Lightning would
    clip them, so clipping would see scaled gradients."""
    return bool(params) and not scaled and all(p.device.type in FUSED_DEVICES and type(p.data) is torch.Tensor
                                               for p in params)


def batch_tokens(batch: dict) -> tuple[int, int]:
    """(tokens in the batch, longest sequence in it): packed rows by their boundaries, padded rows by their mask."""
    if "max_length_q" in batch:  # a packed row (its collator's ints: no sync with the GPU)
        return batch["input_ids"].numel(), int(batch["max_length_q"])
    if "cu_seq_lens_q" in batch:
        cu = batch["cu_seq_lens_q"]
        return int(cu[-1]), int((cu[1:] - cu[:-1]).max())
    mask = batch.get("attention_mask")
    if mask is None:
        return batch["input_ids"].numel(), batch["input_ids"].shape[-1]
    return int(mask.sum()), int(mask.sum(-1).max())


def training_loss(model: nn.Module, batch: dict, offload: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed loss, target tokens) of a forward whose saved tensors go to host memory when `offload`."""
    raise_point("train.forward_oom", lambda: torch.OutOfMemoryError("CUDA out of memory (injected by BAMBA_FT_FAULT)"))
    with activation_memory(model, offload):
        return loss_sum_and_count(model, batch, router_aux=True)


def training_mean_loss(model: nn.Module, batch: dict, offload: bool) -> torch.Tensor:
    total, count = training_loss(model, batch, offload)
    return total / count.clamp(min=1)


class BambaLitModule(L.LightningModule):
    def __init__(self, model: nn.Module, optim: OptimConfig, activation_offload: bool = False,
                 configure: Callable[[BambaLitModule], None] | None = None, loss_unit: float = 1.0) -> None:
        """`configure`: run once by Lightning's `configure_model`, with the process group up (sharding).
        `loss_unit`: what a micro-batch's summed loss is divided by for its backward, the same on every rank (the
        batch's token budget, which its targets never exceed: the loss stays below their mean, so a 16-bit backward
        stays in range)."""
        super().__init__()
        self.loss_unit = float(loss_unit)
        self._step_targets = 0  # target tokens of the micro-batches accumulated since the last optimizer step
        self._step_loss: torch.Tensor | float = 0.0  # and their summed loss (on the device: no sync)
        self.model = model
        self.optim = optim
        self.activation_offload = activation_offload
        self._configure = configure
        self.last_batch: tuple[int, int] | None = None  # (tokens, longest sequence) of the latest training batch
        # Checkpoints hold only trainable tensors (the frozen base is reloaded from its source).
        self.strict_loading = False
        self._val_sum = self._val_count = None
        self._tokens = 0
        self._t0: float | None = None  # start of the logged training rate's window (moved on past validations)
        self._paused_at: float | None = None
        self.fit_tokens = 0  # real tokens this rank trained on in this fit (the throughput window resets)
        # DDP broadcasts rank 0's parameters when it wraps the module; torchao's NF4 tensor takes that copy through a
        # re-quantization which moves the base of every rank, rank 0's included, so the adapters would train on
        # (and the closing evaluation score) a base that a reload of the saved adapter does not rebuild; torchao's
        # int8 and int4 tensors cannot be broadcast at all, nor float8 codes over gloo. Each rank quantized the same
        # weights alike, so the quantized base needs no broadcast.
        self._ddp_params_and_buffers_to_ignore = [
            name for name, p in self.named_parameters() if not p.requires_grad and is_quantized(p)]

    def forward(self, batch: dict, train: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed loss, target tokens). Every loss goes through here: under FSDP this module is the sharding root,
        whose hooks gather the embeddings and LM head that the loss reads outside the model's own forward."""
        if train:
            return training_loss(self.model, batch, self.activation_offload)
        return loss_sum_and_count(self.model, batch)

    def mean_loss(self, batch: dict) -> torch.Tensor:
        total, count = self(batch, train=True)
        return total / count.clamp(min=1)

    def configure_model(self) -> None:
        if self._configure is not None:
            configure, self._configure = self._configure, None
            configure(self)

    @staticmethod
    def real_tokens(batch: dict) -> int:
        mask = batch.get("attention_mask")
        return int(mask.sum()) if mask is not None else batch["input_ids"].numel()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.last_batch = batch_tokens(batch)
        total, count = self(batch, train=True)
        # the collators' loss index counts the targets on the host, so no sync with the device
        self._step_targets += int(batch[LOSS_INDEX].numel()) if LOSS_INDEX in batch else int(count)
        self._step_loss = self._step_loss + total.detach()
        real = self.real_tokens(batch)
        self._tokens += real
        self.fit_tokens += real
        if self.trainer.world_size == 1:  # several ranks: logged with the step, over every rank's targets
            # the step's mean so far: at its last micro-batch, the loss the step trains on
            self.log("train/loss", self._step_loss / max(self._step_targets, 1), prog_bar=True, on_step=True,
                     on_epoch=False)
        if self._one_batch_a_step():
            return total / count.clamp(min=1)  # the step's mean as it is: no rescaling of the gradients after
        return total / self.loss_unit

    def _one_batch_a_step(self) -> bool:
        return self.trainer.accumulate_grad_batches == 1 and self.trainer.world_size == 1

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """The accumulated gradients, of sum / loss_unit over the micro-batches, which Lightning divided by
        accumulate_grad_batches and DDP or FSDP averaged over the ranks, made the mean over the step's targets."""
        targets, loss = self._step_targets, self._step_loss
        self._step_targets, self._step_loss = 0, 0.0
        if self._one_batch_a_step():
            return
        ranks = self.trainer.world_size
        if ranks > 1:
            summed = torch.stack([torch.tensor(float(targets), dtype=torch.float64, device=self.device),
                                  torch.as_tensor(loss, device=self.device).detach().double()])
            summed = self.trainer.strategy.reduce(summed, reduce_op="sum")
            targets = int(summed[0])
            # the step's mean over every rank's targets, which it trains on (not rank 0's share alone)
            self.log("train/loss", (summed[1] / max(targets, 1)).float(), prog_bar=True, on_step=True,
                     on_epoch=False)
        scale = self.trainer.accumulate_grad_batches * ranks * self.loss_unit / max(targets, 1)
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        plain = [g for g in grads if type(g) is torch.Tensor]
        if plain:
            torch._foreach_mul_(plain, scale)
        for g in grads:
            if type(g) is not torch.Tensor:  # a sharded (DTensor) gradient
                g.mul_(scale)

    def on_train_batch_end(self, outputs: Any, batch: dict, batch_idx: int) -> None:
        now = time.perf_counter()
        if self._t0 is None:  # the first batch includes start-up; measure from its end
            self._t0, self._tokens = now, 0
            return
        if self.trainer.global_step % max(1, self.trainer.log_every_n_steps) == 0 and (
                now > self._t0 or self.trainer.world_size > 1):  # every rank, or none, takes part in the sum
            tokens = float(self._tokens)
            if self.trainer.world_size > 1:  # the run's rate, as metrics.json's tokens_per_sec: every rank's tokens
                summed = torch.tensor(tokens, dtype=torch.float64, device=self.device)
                tokens = float(self.trainer.strategy.reduce(summed, reduce_op="sum"))
            self.log("train/tokens_per_sec", tokens / max(now - self._t0, 1e-9), prog_bar=True)
            self._t0, self._tokens = now, 0

    def exclude_from_rate(self, seconds: float) -> None:
        """Leave `seconds` spent on something other than training (a validation, a checkpoint) out of the window of
        train/tokens_per_sec, the training rate, as its tokens are."""
        if self._t0 is not None:
            self._t0 += seconds

    def on_validation_start(self) -> None:
        self._paused_at = time.perf_counter()

    def on_validation_end(self) -> None:
        # the validation ran after the logged step that reset the window, so it would fall in the next one; the
        # checkpoints written as it ends (best-*, a deferred last.ckpt) are left out with it
        if self._paused_at is not None:
            self.exclude_from_rate(time.perf_counter() - self._paused_at)
            self._paused_at = None

    def on_train_end(self) -> None:
        # every rank's, summed here: the summary is written by rank 0 alone (collective: all ranks end the fit)
        total = torch.tensor(float(self.fit_tokens), device=self.device, dtype=torch.float64)
        self.fit_tokens = int(self.trainer.strategy.reduce(total, reduce_op="sum"))

    def on_validation_epoch_start(self) -> None:
        self._val_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        self._val_count = torch.zeros((), device=self.device, dtype=torch.float64)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        total, count = self(batch)
        self._val_sum += total.double()
        self._val_count += count.double()

    def on_validation_epoch_end(self) -> None:
        # Token-weighted over all batches and ranks (a mean of batch means would weight short batches up).
        total = self.trainer.strategy.reduce(self._val_sum, reduce_op="sum")
        count = self.trainer.strategy.reduce(self._val_count, reduce_op="sum")
        if float(count) > 0:
            loss = (total / count).float()
            self.log("val/loss", loss, prog_bar=True, sync_dist=False)
            self.log("val/ppl", torch.exp(loss), sync_dist=False)  # exp of the token mean; inf past float32's 88 nats

    def configure_optimizers(self) -> Any:
        params = [p for p in self.model.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]  # weight decay per group: _apply_hyperparameters
        groups = [{"params": decay}, {"params": no_decay}]
        fused = fused_adamw(params, self._grad_scaler() is not None)
        opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=self.optim.lr, fused=fused or None)
        self._apply_hyperparameters(opt)
        total = int(self.trainer.estimated_stepping_batches)
        o = self.optim
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_lambda(s, o.warmup_steps, total, o.scheduler, o.min_lr_ratio)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def _grad_scaler(self) -> Any:
        """The precision plugin's gradient scaler (16-mixed), or None (bf16-mixed, 32-true, bf16-true)."""
        return getattr(self.trainer.precision_plugin, "scaler", None)

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        """Lightning's mixed-precision plugin refuses to clip for a fused optimizer, as a fused step unscales a
        gradient scaler's gradients itself. bf16-mixed has no scaler, so the gradients are already true and are
        clipped as under full precision; with a scaler the optimizer is never fused (`fused_adamw`)."""
        if gradient_clip_val and getattr(optimizer, "_step_supports_amp_scaling", False) and self._grad_scaler() is None:
            L.pytorch.plugins.Precision.clip_gradients(
                self.trainer.precision_plugin, optimizer, gradient_clip_val,
                gradient_clip_algorithm or GradClipAlgorithmType.NORM)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def _apply_hyperparameters(self, opt: torch.optim.Optimizer) -> None:
        o = self.optim
        for group in opt.param_groups:
            decays = all(p.dim() >= 2 for p in group["params"])  # matrices decay; biases and norms do not
            group.update(betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay if decays else 0.0)

    def on_fit_start(self) -> None:
        """Train mode for the fit. A model loaded by from_pretrained is in eval mode, and Lightning keeps the mode it
        finds (its validation restores it too): a full fine-tune (no peft wrapper to switch it) trained with
        dropout off and without the gradient checkpointing transformers' layers apply only in training."""
        self.model.train()

    def on_train_start(self) -> None:
        """On resume Lightning restores the optimizer's hyperparameters and the schedule's peak learning rate from
        the checkpoint, which would silently undo a changed `optim.*`; this run's config applies from here on
        (the keys that changed were listed at start and are recorded in its run_config.yaml)."""
        for config in self.trainer.lr_scheduler_configs:
            sched = config.scheduler
            self._apply_hyperparameters(sched.optimizer)
            sched.base_lrs = [self.optim.lr] * len(sched.optimizer.param_groups)
            for group, factor in zip(sched.optimizer.param_groups, [f(sched.last_epoch) for f in sched.lr_lambdas]):
                group["initial_lr"] = self.optim.lr
                group["lr"] = self.optim.lr * factor

    # Checkpoints: trainable tensors only.
    def trainable_keys(self) -> set[str]:
        return {f"model.{n}" for n, p in self.model.named_parameters() if p.requires_grad}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        trainable = self.trainable_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "state_dict" not in checkpoint:  # a sharded checkpoint: the strategy has loaded and checked the tensors
            return
        missing = sorted(self.trainable_keys() - set(checkpoint["state_dict"]))
        if missing:
            raise ModelError(
                f"The checkpoint lacks {len(missing)} trainable tensors of this model (first: {missing[0]}); "
                "it was written for a different model or adapter configuration."
            )
