"""`task=train`: the one place that wires config -> model, data, Lightning Trainer, and writes the results."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import nn

from bamba_ft import quiet
from bamba_ft.config.overrides import in_sweep
from bamba_ft.config.schema import RunConfig, TrainerConfig
from bamba_ft.data.module import BambaDataModule
from bamba_ft.data.templates import ensure_chat_template, generation_config_for
from bamba_ft.errors import BambaFTError, ConfigError
from bamba_ft.faults import fault_point
from bamba_ft.jobs import lock
from bamba_ft.jobs.callbacks import (
    AtomicCheckpointIO,
    ConfigInCheckpoint,
    GracefulStop,
    PatientEarlyStopping,
    StepCheckpoint,
    StepLearningRateMonitor,
)
from bamba_ft.jobs.checkpoints import (
    check_resume_config,
    check_resume_data,
    read_checkpoint,
    refuse_earlier_run,
    refuse_finished,
    refuse_mid_step,
    remove_stale_temporaries,
    resolve_resume,
    saved_step,
)
from bamba_ft.jobs.evaluate import evaluate_model, format_metrics, validation_keys
from bamba_ft.jobs.fsdp import storage_dtype
from bamba_ft.jobs.report import atomic_write_json, plot_curves, publish_file, table
from bamba_ft.jobs.runtime import (
    autocast_dtype,
    autocast_for,
    choose_device,
    exit_as_a_failed_rank,
    resolve_precision,
    to_device,
)
from bamba_ft.lit_module import BambaLitModule, batch_tokens, training_mean_loss
from bamba_ft.model.build import build_model, load_tokenizer
from bamba_ft.model.families import family_of
from bamba_ft.model.lora import apply_peft, check_adapter_gradients, init_adapters_from
from bamba_ft.model.memory import out_of_memory_error
from bamba_ft.model.mixer import (
    graphs_installed,
    packing_safe,
    prepare_graphs,
    unsafe_attention,
    why_no_graphs,
)
from bamba_ft.model.restore import RANDOM_BASE, checkpoint_state, random_base_record, save_run_config
from bamba_ft.ops.loss import causal_lm
from bamba_ft.rundir import INTERRUPTED, RunDir

log = logging.getLogger("bamba_ft")


def _strategy(cfg: RunConfig) -> Any:
    if cfg.trainer.strategy != "fsdp":
        return cfg.trainer.strategy
    from bamba_ft.jobs.fsdp import ShardedStrategy

    return ShardedStrategy()


def _sharded(cfg: RunConfig) -> bool:
    return cfg.trainer.strategy == "fsdp"


def _processes(t: TrainerConfig) -> int:
    """How many processes train (trainer.devices on each of trainer.num_nodes)."""
    if isinstance(t.devices, (list, tuple)):
        per_node = len(t.devices)
    elif str(t.devices) in ("auto", "-1"):
        per_node = max(torch.cuda.device_count(), 1)
    else:
        per_node = int(t.devices)
    return per_node * t.num_nodes


def _loggers(cfg: RunConfig, run_dir: Path) -> list[Logger]:
    loggers: list[Logger] = []
    if cfg.logger.csv:
        loggers.append(CSVLogger(RunDir(run_dir).logs, name="csv"))
    if cfg.logger.tensorboard:
        loggers.append(TensorBoardLogger(RunDir(run_dir).logs, name="tensorboard", default_hp_metric=False))
    if cfg.logger.wandb:
        try:
            from lightning.pytorch.loggers import WandbLogger

            wandb = WandbLogger(project=cfg.logger.wandb_project, save_dir=str(RunDir(run_dir).logs))
        except (ImportError, ModuleNotFoundError) as e:
            raise ConfigError(f"logger.wandb=true needs the wandb package ({e}). Fix: pip install 'bamba_ft[wandb]'.") from e
        if lock.launching_process():  # start its run now, before the model loads, not inside the fit
            try:
                wandb.experiment  # noqa: B018 - the property logs in and creates the run
            except Exception as e:
                raise ConfigError(
                    f"logger.wandb=true: Weights & Biases could not start a run ({type(e).__name__}: "
                    f"{str(e).splitlines()[0] if str(e) else ''}).\nFix: `wandb login` or set WANDB_API_KEY; without "
                    "network, WANDB_MODE=offline (upload later with `wandb sync`); or logger=default.",
                    "the logger") from None
        loggers.append(wandb)
    return loggers


def save_trained(model: nn.Module, tokenizer: Any, cfg: RunConfig, run_dir: Path) -> Path:
    """Adapter (peft format) or full weights, with the tokenizer, written under a temp name and renamed."""
    final = RunDir(run_dir).weights(cfg.peft.method)
    tmp = run_dir / f".{final.name}.partial"
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        generation_config_for(causal_lm(model), tokenizer).save_pretrained(tmp)  # generation stops at end of turn
        if (run_dir / RANDOM_BASE).exists():  # the adapter alone names its random base
            shutil.copyfile(run_dir / RANDOM_BASE, tmp / RANDOM_BASE)
        adapter_config = tmp / "adapter_config.json"
        if adapter_config.exists():  # name the base as the user did (a Hub id or builtin:), not a resolved local path
            data = json.loads(adapter_config.read_text())
            data["base_model_name_or_path"] = cfg.model.name_or_path
            adapter_config.write_text(json.dumps(data, indent=2))
        fault_point("adapter.before_rename")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise BambaFTError(
            f"saving the trained weights to {final} failed: {e.strerror or e} ({e.filename or tmp}).\n"
            f"Training itself finished: its final state is in {RunDir(run_dir).last_ckpt}. Once the cause "
            f"is fixed (e.g. free disk space), write them with: python -m bamba_ft recipe=export "
            f"export.checkpoint={run_dir} export.adapter_only=true"
        ) from e
    return final


def _prepare(cfg: RunConfig, device: torch.device) -> tuple[nn.Module, Any, BambaDataModule]:
    """Tokenizer, model with adapters, data; refuses packing on a leaking path and bypassed adapters.

    Every rank runs this on its own device (the ranks Lightning or torchrun starts run the whole job), so the
    packing checks and the gradient probe run on each rank's device. Under FSDP the model is built without
    weights and the probe waits until it is sharded and loaded (`_shard_and_load`, inside the fit).
    """
    tokenizer = load_tokenizer(cfg.model)
    ensure_chat_template(tokenizer, cfg.data.chat_template)
    sharded = _sharded(cfg)
    dtype = storage_dtype(cfg.model.dtype, resolve_precision(cfg.trainer.precision, device), device) if sharded else None
    no_graphs = why_no_graphs(device, cfg.data.packing, cfg.data.max_tokens_per_batch,
                              cfg.model.gradient_checkpointing, cfg.model.activation_offload, _processes(cfg.trainer),
                              cfg.quant.method)
    if cfg.model.cuda_graphs == "auto" and no_graphs and device.type == "cuda":
        log.info("model.cuda_graphs=auto: the conv+scan runs without CUDA graphs (%s)", no_graphs)
    model = apply_peft(build_model(cfg.model, cfg.quant, device, empty=sharded, dtype=dtype,
                                   graphs_auto=no_graphs is None, seed=cfg.trainer.seed), cfg.peft)
    if cfg.peft.init_from and not cfg.trainer.resume:  # a resume's checkpoint holds the adapters it trained on to
        if sharded:
            raise ConfigError("peft.init_from with trainer.strategy=fsdp: the adapters are built sharded, without "
                              "weights, so there is nothing to load the saved ones into yet.\nFix: "
                              "trainer.strategy=ddp (LoRA's adapters are small enough to replicate).")
        init_adapters_from(model, cfg.peft, cfg.model.name_or_path)
    if cfg.data.packing and (attn := unsafe_attention(model)) is not None:
        raise ConfigError(
            f"data.packing=true: model.attn_implementation={attn} lets packed sequences attend to each other in "
            f"{family_of(model).model_type} models (their decoder builds the attention mask without packed "
            "positions).\nFix: set model.attn_implementation=auto (varlen, or flash_attention_2 when installed), "
            "or data.packing=false."
        )
    if cfg.data.packing and not packing_safe(model):
        raise ConfigError(
            "data.packing=true: the active mixer path (model.mixer=hf, transformers' own) leaks state across "
            "packed sequences.\nFix: set data.packing=false, or use model.mixer=auto (bamba_ft's exact mixer)."
        )
    dm = BambaDataModule(cfg.data, tokenizer, seed=cfg.trainer.seed)
    dm.prepare()
    if cfg.data.packing and graphs_installed(model):
        _capture_graphs(cfg, model, device)
    if not sharded:
        offload = cfg.model.activation_offload
        _probe(cfg, model, dm, device, lambda m, b: training_mean_loss(m, b, offload))
    return model, tokenizer, dm


def _capture_graphs(cfg: RunConfig, model: nn.Module, device: torch.device) -> None:
    """Every length bucket a packed batch can reach (data.max_tokens_per_batch), captured before the first step."""
    dtype = autocast_dtype(resolve_precision(cfg.trainer.precision, device)) or next(causal_lm(model).parameters()).dtype
    start = time.perf_counter()
    with _explain_oom(cfg, lambda: "capturing the conv+scan's CUDA graphs before the first step", lambda: None, model):
        captured = prepare_graphs(model, cfg.data.max_tokens_per_batch, dtype)
    log.info("CUDA graphs: %d captured for rows up to %d tokens in %.1f s", captured, cfg.data.max_tokens_per_batch,
             time.perf_counter() - start)


def _probe(cfg: RunConfig, model: nn.Module, dm: BambaDataModule, device: torch.device, loss_fn: Callable,
           autocast: contextlib.AbstractContextManager | None = None) -> None:
    """Every adapter must receive gradient before hours are spent training it (under `autocast`, by default the
    one the model's dtype implies)."""
    probe = to_device(dm.first_batch(), device)
    where = "the gradient probe (the first forward and backward, on the first training batch)"
    with (_explain_oom(cfg, lambda: where, lambda: batch_tokens(probe), model),
          autocast or autocast_for(causal_lm(model), device)):
        norms = check_adapter_gradients(model, probe, loss_fn)
    log.info("gradient check: all %d trainable tensors receive gradient", len(norms))


def _shard_and_load(cfg: RunConfig, dm: BambaDataModule, device: torch.device, lit: BambaLitModule) -> None:
    """Under FSDP, inside the fit on every rank: shard the empty model, stream its weights in, run the probe."""
    import torch.distributed as dist

    from bamba_ft.model import shard

    rank0 = dist.get_rank() == 0
    initial = shard.initial_values(lit.model) if rank0 else {}
    precision = resolve_precision(cfg.trainer.precision, device)
    policy = shard.mixed_precision(precision, device)
    units = shard.shard_model(lit, lit.model, lit.trainer.strategy.shard_mesh, policy)
    dtype = next(lit.model.parameters()).dtype
    if cfg.model.init == "random":
        reader = functools.partial(shard.random_reader, cfg.model, dtype, device)
    else:
        reader = functools.partial(shard.safetensors_reader, cfg.model)
    shard.load_sharded(lit.model, reader if rank0 else None, initial)
    held, full = (sum(x) for x in zip(*((h, f) for _, h, f in shard.storage_bytes(lit.model))))
    log.info("FSDP: %d units over %d ranks; this rank holds %s of %s parameters (%s)", units,
             dist.get_world_size(), f"{held:,}", f"{full:,}", str(dtype).removeprefix("torch."), extra=quiet.EVERY_RANK)
    # as Lightning runs the steps: bf16 autocast under bf16-mixed, whatever dtype the shards are kept in
    mixed = autocast_dtype(precision) if device.type == "cuda" else None  # fsdp takes auto, 32-true or bf16-mixed
    autocast = torch.autocast("cuda", dtype=mixed) if mixed is not None else contextlib.nullcontext()
    _probe(cfg, lit.model, dm, device, lambda m, b: lit.mean_loss(b), autocast)


@contextlib.contextmanager
def _explain_oom(cfg: RunConfig, where: Callable[[], str], batch: Callable[[], tuple[int, int] | None],
                 model: nn.Module | None = None) -> Iterator[None]:
    """A device out-of-memory error becomes a BambaFTError (exit status 2) naming the batch, the mode and the fixes
    (turning `model`'s conv+scan graphs off among them, where it has them)."""
    try:
        yield
    except torch.OutOfMemoryError as e:
        raise out_of_memory_error(cfg, where(), batch(), e, model is not None and graphs_installed(model)) from e


def _step_name(trainer: L.Trainer) -> str:
    return "the first training step" if trainer.global_step == 0 else f"training step {trainer.global_step + 1}"


def _callbacks(cfg: RunConfig, dm: BambaDataModule, ckpt_dir: Path, stopper: GracefulStop,
               with_loggers: bool, saved_with: ConfigInCheckpoint) -> list[L.Callback]:
    callbacks: list[L.Callback] = [saved_with]
    if with_loggers:
        callbacks.append(StepLearningRateMonitor())
    if cfg.trainer.enable_progress_bar:
        callbacks.append(TQDMProgressBar(refresh_rate=10))  # step-based runs have no epoch total for rich's bar
    # last.ckpt every N steps and at the end of a full run: what resume uses, with interrupted.ckpt.
    # Written as a rolling top-1 rather than with save_last, which also saves when training ends early; after a
    # Ctrl-C stop that end-of-training save would record the interrupted epoch as finished.
    # checkpoint_every_n_steps=0 saves at the end only: at max_steps, or (epoch-bound, max_steps=-1) by run() after the
    # fit; Lightning's every_n_train_steps=0 never fires.
    every = cfg.trainer.checkpoint_every_n_steps or max(0, cfg.trainer.max_steps)
    if cfg.trainer.max_steps > 0:
        every = min(every, cfg.trainer.max_steps)
    # Lightning runs checkpoint callbacks after the others, in this order: after a validation, best-* first, then
    # last.ckpt and interrupted.ckpt, which hold its ranking as well as early stopping's count
    if dm.val_set is not None and cfg.trainer.save_top_k > 0:
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, filename="best-step{step:06d}", auto_insert_metric_name=False,
                                         monitor="val/loss", mode="min", save_top_k=cfg.trainer.save_top_k))
    callbacks.append(StepCheckpoint(dirpath=ckpt_dir, filename="last", every_n_train_steps=every, save_top_k=1,
                                    save_last=False, enable_version_counter=False))
    if cfg.trainer.early_stopping_patience > 0:
        if dm.val_set is None:
            raise ConfigError(f"trainer.early_stopping_patience={cfg.trainer.early_stopping_patience} stops on the "
                              "validation loss, and this data has no validation split.\nFix: give validation data "
                              "(data.val_fraction > 0 or data.val_source), or set trainer.early_stopping_patience=0.")
        # its state (the best loss, validations without improvement) is in the checkpoints: a resume goes on counting
        callbacks.append(PatientEarlyStopping(monitor="val/loss", mode="min", patience=cfg.trainer.early_stopping_patience,
                                              min_delta=cfg.trainer.early_stopping_min_delta,
                                              check_on_train_epoch_end=False, strict=True))
    return [*callbacks, stopper]


def _best_checkpoints(trainer: L.Trainer) -> ModelCheckpoint | None:
    """The callback keeping the best-* checkpoints by val/loss (None without validation or trainer.save_top_k)."""
    return next((c for c in trainer.checkpoint_callbacks if getattr(c, "monitor", None) == "val/loss"), None)


def early_stop(trainer: L.Trainer) -> dict | None:
    """How early stopping ended the fit (the step, the best val/loss and the checkpoint holding it), or None."""
    stopper = next((c for c in trainer.callbacks if isinstance(c, EarlyStopping)), None)
    if stopper is None or stopper.stopping_reason != EarlyStoppingReason.PATIENCE_EXHAUSTED:
        return None  # a non-finite val/loss also stops it: reported as a divergence
    best = _best_checkpoints(trainer)
    kept = float(best.best_model_score) if best is not None and best.best_model_path and \
        best.best_model_score is not None else None
    lowest = getattr(stopper, "lowest", None)
    lowest = kept if lowest is None else lowest
    # best_val_loss: the loss the patience counted against (the last that improved by more than min_delta);
    # lowest_val_loss: the lowest of all, and best_checkpoint the best-* that holds it (none with save_top_k=0, or
    # when the lowest came before a resume into another directory, whose best-* stayed there)
    return {"step": trainer.global_step, "patience": stopper.patience, "best_val_loss": float(stopper.best_score),
            "lowest_val_loss": lowest,
            "best_checkpoint": best.best_model_path if kept is not None and kept <= lowest else None}


def _trainer(cfg: RunConfig, dm: BambaDataModule, run_dir: Path, device: torch.device, strategy: Any,
             loggers: list[Logger], stopper: GracefulStop, saved_with: ConfigInCheckpoint) -> L.Trainer:
    t = cfg.trainer
    exit_as_a_failed_rank()
    return L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=strategy,
        precision=resolve_precision(t.precision, device),
        max_steps=t.max_steps,
        max_epochs=t.max_epochs if t.max_epochs is not None else -1,
        accumulate_grad_batches=t.accumulate_grad_batches,
        gradient_clip_val=t.gradient_clip_val,
        val_check_interval=min(t.val_check_interval, t.max_steps * t.accumulate_grad_batches) if t.max_steps > 0 else t.val_check_interval,
        check_val_every_n_epoch=None,
        limit_val_batches=t.limit_val_batches if dm.val_set is not None else 0,
        log_every_n_steps=t.log_every_n_steps,
        num_sanity_val_steps=t.num_sanity_val_steps,
        enable_progress_bar=t.enable_progress_bar,
        enable_model_summary=False,
        fast_dev_run=t.fast_dev_run,
        deterministic=t.deterministic or None,
        use_distributed_sampler=False,  # BambaDataModule shards its batch plan by rank itself
        default_root_dir=run_dir,
        logger=loggers or False,
        callbacks=_callbacks(cfg, dm, RunDir(run_dir).checkpoints, stopper, bool(loggers), saved_with),
        plugins=[AtomicCheckpointIO()],
    )


def run(cfg: RunConfig) -> dict:
    t_start = time.perf_counter()
    run_dir = Path(cfg.output_dir)
    lock.acquire(run_dir)  # the CLI took it before Hydra wrote here; this covers runs started from Python
    remove_stale_temporaries(run_dir)
    ckpt_path = resolve_resume(cfg.trainer.resume, run_dir)
    if lock.launching_process():  # ranks > 0 start after rank 0 has written here
        refuse_earlier_run(run_dir, ckpt_path)
    # Read once: its config is checked now; its step spares loading it again at the end when it is also this run's
    # last.ckpt (a resume into the same directory, as sweep.resume does) and the fit did not rewrite it.
    resumed = read_checkpoint(ckpt_path) if ckpt_path else None
    if resumed is not None:
        refuse_finished(resumed, cfg.trainer.max_steps, f"trainer.resume={cfg.trainer.resume}")
        refuse_mid_step(resumed, f"trainer.resume={cfg.trainer.resume}")
        changed = check_resume_config(resumed, cfg)
        # run_config.yaml records the checkpoint found, not `latest`: a later `latest` then sees this run continued it
        cfg = dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, resume=str(ckpt_path.absolute())))
        log.info("resuming from %s%s", ckpt_path, "".join(f"\n  changed, applied from the resumed step on: {c}" for c in changed))
        if run_dir.resolve() not in ckpt_path.resolve().parents:
            log.info("resuming into another directory: the best-* checkpoints kept here start anew (those of %s "
                     "stay there)", ckpt_path.parent.parent if ckpt_path.parent.name == "checkpoints" else ckpt_path)
    L.seed_everything(cfg.trainer.seed, workers=True, verbose=False)
    device = choose_device(cfg.trainer.accelerator, cfg.trainer.devices, cfg.trainer.strategy)
    resolve_precision(cfg.trainer.precision, device)  # one the device cannot run is refused before the model loads
    strategy = _strategy(cfg)
    loggers = _loggers(cfg, run_dir) if not cfg.trainer.fast_dev_run else []  # a logger that cannot start, first
    model, tokenizer, dm = _prepare(cfg, device)
    data_fingerprint = dm.train_fingerprint()  # once: the resume checks it, every checkpoint stores it
    if resumed is not None:
        check_resume_data(resumed, data_fingerprint)
    save_run_config(cfg, run_dir)
    if (record := random_base_record(cfg, causal_lm(model), device)) is not None and lock.launching_process():
        atomic_write_json(run_dir / RANDOM_BASE, record)  # what eval and export rebuild the base from

    before: dict = {}
    if cfg.eval.before_training and lock.launching_process() and not cfg.trainer.fast_dev_run and not cfg.trainer.resume:
        if _sharded(cfg):  # the weights arrive inside the fit, sharded
            log.info("eval.before_training: skipped under trainer.strategy=fsdp; val/loss is logged during training")
        else:
            before, _ = evaluate_model(model, tokenizer, dm, cfg.eval, device)
            log.info("before training: %s", format_metrics(before))
    elif resumed is not None:  # the stopped run's, carried in its checkpoints
        before = resumed.before or {}

    stopper = GracefulStop(RunDir(run_dir).checkpoints)
    saved_with = ConfigInCheckpoint(cfg, data_fingerprint, before)
    trainer = _trainer(cfg, dm, run_dir, device, strategy, loggers, stopper, saved_with)
    configure = functools.partial(_shard_and_load, cfg, dm, device) if _sharded(cfg) else None
    d = cfg.data  # a micro-batch's token budget: its summed loss over it is at most the mean loss
    unit = d.max_tokens_per_batch if d.packing else d.batch_size * d.max_seq_len
    lit = BambaLitModule(model, cfg.optim, cfg.model.activation_offload, configure=configure, loss_unit=unit)
    t_fit = time.perf_counter()
    with stopper.installed(), _explain_oom(cfg, lambda: _step_name(trainer), lambda: lit.last_batch, model):
        try:
            trainer.fit(lit, datamodule=dm, ckpt_path=str(ckpt_path) if ckpt_path else None)
        except SIGTERMException:
            # Lightning ends the fit at its next check after SIGTERM; GracefulStop saved the step it reached. If it
            # could not (a stop before the first step), say so instead of exiting 0 as SIGTERMException would.
            if stopper.stopped_at is None:
                print(f"\nstopped by SIGTERM before an optimizer step could be saved; nothing new since "
                      f"{RunDir(run_dir).checkpoints}.", file=sys.stderr)
                return {"stopped_at": None, "signal": "SIGTERM"}
    fit_seconds = time.perf_counter() - t_fit
    last = RunDir(run_dir).last_ckpt
    # the final state, whatever N was, unless the periodic save just wrote it (a second copy would briefly double the
    # space); every rank calls this (it is collective under DDP/FSDP). After an early stop it is written again: the
    # periodic save of the stop step ran before that step's validation, so it does not know the fit ended, and a
    # resume (which takes last.ckpt) would train on instead of being refused.
    if stopper.stopped_at is None and not cfg.trainer.fast_dev_run and (
            saved_step(last, resumed) != trainer.global_step or early_stop(trainer) is not None):
        trainer.save_checkpoint(last, weights_only=False)
    if stopper.stopped_at is None and not cfg.trainer.fast_dev_run and trainer.is_global_zero:
        _tidy_checkpoints(trainer, run_dir)
    if _sharded(cfg) and stopper.stopped_at is None and not cfg.trainer.fast_dev_run:
        model = _gathered_model(cfg, lit, device)  # collective; the full model on rank 0 only
    if not trainer.is_global_zero:
        return {}
    if stopper.stopped_at is not None:
        print(f"\nstopped at step {stopper.stopped_at}; checkpoint: {stopper.ckpt_path}"
              # in a sweep, the sweep is resumed (sweep.resume=true), and it says how
              + ("" if in_sweep() else f"\nresume with the same command plus: trainer.resume={run_dir}"))
        return {"stopped_at": stopper.stopped_at, "signal": stopper.requested or "SIGTERM"}
    start = resumed.step if resumed is not None else None
    return _finish(cfg, model, tokenizer, dm, trainer, before, run_dir, device, fit_seconds, t_start, start)


def _tidy_checkpoints(trainer: L.Trainer, run_dir: Path) -> None:
    """A finished run's checkpoints/ holds last.ckpt and its save_top_k best-* by validation loss. A resumed run
    also found the stopped run's interrupted.ckpt (older than last.ckpt) and, when the stop came between two
    validations, a best-* from the validation Lightning runs as it stops, written after interrupted.ckpt and so
    unknown to the resumed checkpoint callback: it is ranked by the score it recorded for itself."""
    ckpts = RunDir(run_dir).checkpoints
    stale = [ckpts / INTERRUPTED] if (ckpts / INTERRUPTED).exists() else []
    best = _best_checkpoints(trainer)
    if best is not None and best.save_top_k > 0:
        scores = {Path(p).name: float(v) for p, v in best.best_k_models.items()}
        for path in ckpts.glob("best*.ckpt"):
            if path.name not in scores and (score := _own_score(path)) is not None:
                scores[path.name] = score
        ranked = sorted(scores, key=scores.__getitem__, reverse=best.mode == "max")
        stale += [ckpts / name for name in ranked[best.save_top_k:] if (ckpts / name).exists()]
    for path in stale:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    if stale:
        log.info("removed checkpoints the finished run supersedes: %s", ", ".join(p.name for p in stale))


def _own_score(path: Path) -> float | None:
    """The monitored score a best-* checkpoint recorded for itself (its callback's best_k_models entry), if any."""
    try:
        callbacks = checkpoint_state(path).get("callbacks", {})
    except Exception:  # unreadable: left alone
        return None
    for state in callbacks.values():
        for saved, score in (state.get("best_k_models") or {}).items() if isinstance(state, dict) else ():
            if Path(saved).name == path.name:
                return float(score)
    return None


def _gathered_model(cfg: RunConfig, lit: BambaLitModule, device: torch.device) -> nn.Module | None:
    """Rank 0: the trained model as one process would hold it (on the CPU, in the dtype model.dtype gives on
    `device`), rebuilt from every rank's shards gathered once, so that saving and evaluating run as without FSDP."""
    import torch.distributed as dist

    from bamba_ft.model.shard import full_state

    state = full_state(lit.model)
    if dist.get_rank() != 0:
        return None
    model = apply_peft(build_model(cfg.model, cfg.quant, device, empty=True), cfg.peft)
    dtypes = {n: t.dtype for n, t in model.state_dict(keep_vars=True).items()}
    model.load_state_dict({n: t.to(dtypes[n]) for n, t in state.items()}, strict=True, assign=True)
    if causal_lm(model).config.tie_word_embeddings:
        causal_lm(model).tie_weights()
    return model


def _finish(cfg: RunConfig, model: nn.Module, tokenizer: Any, dm: BambaDataModule, trainer: L.Trainer,
            before: dict, run_dir: Path, device: torch.device, fit_seconds: float, t_start: float,
            resumed_at: int | None = None) -> dict:
    """Save the adapter, evaluate again, write metrics.json and print the closing summary. `resumed_at`: the step
    of the checkpoint this run resumed from."""
    if cfg.trainer.fast_dev_run:
        print("fast_dev_run finished: one training and one validation batch ran; nothing was saved.")
        return {}
    saved = save_trained(model, tokenizer, cfg, run_dir)
    model.to(device)
    after, rows = evaluate_model(model, tokenizer, dm, cfg.eval, device)
    steps = trainer.global_step
    logged = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    metrics = {
        "before": before,
        "after": after,
        "train": {
            "steps": steps,
            "resumed_at_step": resumed_at,
            "fit_seconds": round(fit_seconds, 2),
            "final_train_loss": logged.get("train/loss"),
            "last_val_loss": logged.get("val/loss"),  # from the training loop (reduced over ranks)
            # real tokens over the whole fit (validation and checkpoints included) and its wall time; the rate
            # of the last training window between two logged steps, without them, beside it
            "tokens": trainer.lightning_module.fit_tokens,
            "tokens_per_sec": trainer.lightning_module.fit_tokens / fit_seconds if fit_seconds > 0 else None,
            "window_tokens_per_sec": logged.get("train/tokens_per_sec"),
        },
        "data": {name: vars(st) for name, st in dm.stats.items()}
        | ({"train_stream": dm.stream_report()} if dm.stream else {})
        | ({"hold_out_rows": dm.hold_out_rows} if dm.hold_out_rows else {}),
        "packing_efficiency": dm.packing_efficiency(),
        "outputs": {"run": str(run_dir), saved.name: str(saved)},
    }
    if (stopped := early_stop(trainer)) is not None:
        metrics["train"]["early_stopped"] = stopped
    if (diverged := _diverged(model, metrics)) is not None:
        metrics["diverged"] = diverged
    rd = RunDir(run_dir)
    publish_file(rd.metrics, json.dumps(_finite_or_null(metrics), indent=2, default=str) + "\n")
    if rows:
        publish_file(rd.predictions, "".join(json.dumps(r) + "\n" for r in rows))
    has_curves = plot_curves(run_dir, rd.curves)
    # without validation data an evaluation has nothing to score: the next step names the keys that give it some
    eval_data = "" if dm.val_set is not None else "".join(f" {k}" for k in validation_keys(cfg.data))
    _print_summary(metrics, run_dir, saved, has_curves, time.perf_counter() - t_start, eval_data)
    return metrics


def _diverged(model: nn.Module, metrics: dict) -> str | None:
    """What shows that training diverged (a non-finite loss or trained weight), or None."""
    a, tr = metrics["after"], metrics["train"]
    for name, value in (("val loss", a.get("val_loss")), ("train loss", tr.get("final_train_loss"))):
        if value is not None and not math.isfinite(value):
            return f"{name} is {value}"
    bad = [n for n, p in model.named_parameters() if p.requires_grad and not bool(torch.isfinite(p).all())]
    return f"{len(bad)} trained tensors hold non-finite values (first: {bad[0]})" if bad else None


def _finite_or_null(value: Any) -> Any:
    """metrics.json as strict JSON: NaN and infinities (which json.dumps writes bare) become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_or_null(v) for v in value]
    return value


def _fmt(m: dict, key: str, pct: bool = False) -> str:
    if key not in m:
        return "-"
    return f"{100 * m[key]:.1f}%" if pct else f"{m[key]:.4f}"


def _trained(tr: dict) -> str:
    """'trained 400 steps', or for a resumed run the steps this run trained (a resume of a run that had already
    reached trainer.max_steps trains none, and says so)."""
    steps, start = tr["steps"], tr.get("resumed_at_step")
    if start is None:
        return f"trained {steps} steps"
    if steps <= start:
        return (f"nothing left to train: the resumed run was already at step {start} (raise trainer.max_steps to "
                "train on); evaluated and saved again")
    return f"trained steps {start + 1}-{steps} ({steps - start} in this run, resumed at step {start})"


def _print_summary(metrics: dict, run_dir: Path, saved: Path, has_curves: bool, wall: float,
                   eval_data: str = "") -> None:
    """The closing summary; `eval_data`: keys the suggested evaluation needs for data to score (the run had none)."""
    rd = RunDir(run_dir)
    b, a, tr = metrics["before"], metrics["after"], metrics["train"]
    rows = [["val loss", _fmt(b, "val_loss"), _fmt(a, "val_loss")],
            ["val perplexity", _fmt(b, "val_ppl"), _fmt(a, "val_ppl")]]
    if "exact_match" in a:
        rows.append([f"exact match ({int(a['num_generated'])} held-out)", _fmt(b, "exact_match", True),
                     _fmt(a, "exact_match", True)])
    tps = f", {tr['tokens_per_sec']:,.0f} tokens/s" if tr.get("tokens_per_sec") else ""
    eff = metrics.get("packing_efficiency")
    lines = [
        "",
        f"bamba_ft: {_trained(tr)} in {tr['fit_seconds']:.1f} s{tps}"
        + (f", packing efficiency {100 * eff:.1f}%" if eff else "") + f" (total {wall:.1f} s)",
        table(rows, ["metric", "before", "after"]),
    ]
    if stopped := tr.get("early_stopped"):
        lines.append(f"stopped early at step {stopped['step']}: {stopped['patience']} validations in a row without a val "
                     f"loss below {stopped['best_val_loss']:.4f} by more than trainer.early_stopping_min_delta; the "
                     "adapter holds the last step's weights"
                     + (f", those of the lowest val loss ({stopped['lowest_val_loss']:.4f}) are in "
                        f"{stopped['best_checkpoint']}" if stopped["best_checkpoint"] else ""))
    lines += [
        "outputs:",
        f"  {saved.name + '/':<13}{saved}",
        f"  checkpoints/ {rd.checkpoints}",
    ]
    written = [name for name in ("csv", "tensorboard") if (rd.logs / name).exists()]  # none with logger=none
    if written:
        lines.append(f"  logs/        {rd.logs} ({', '.join(written)})")
    lines.append(f"  metrics      {rd.metrics}")
    if has_curves:
        lines.append(f"  curves       {rd.curves}")
    if "diverged" in metrics:  # the run exits 3 (bamba_ft/__main__.py): nothing here is worth evaluating
        lines.append(f"diverged: {metrics['diverged']}; the saved weights are not usable.\nFix: lower optim.lr (or raise "
                     "optim.warmup_steps) and train again; the checkpoints hold the diverged state.")
    else:
        lines += [
            "next:",
            f"  python -m bamba_ft recipe=eval eval.checkpoint={run_dir}{eval_data}",
            f"  python -m bamba_ft recipe=generate generate.checkpoint={run_dir}",
            f"  python -m bamba_ft recipe=export export.checkpoint={run_dir}",
        ]
    print("\n".join(lines))
