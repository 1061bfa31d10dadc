"""Keeps library import chatter off the console; bamba_ft reports the facts that matter itself."""

from __future__ import annotations

import logging
import os
import warnings


class _DropMessages(logging.Filter):
    def __init__(self, *fragments: str) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(f in str(record.msg) for f in self.fragments)


def silence_import_noise() -> None:
    # torchao tries to load CUDA extensions it cannot use on this machine and logs each failure;
    # torch's pytree logs a deprecation for every Enum torchao registers. Neither affects results.
    logging.getLogger("torchao").setLevel(logging.ERROR)
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    # transformers announces its torch fallbacks for the mixer kernels; bamba_ft's mixer replaces that path and
    # reports its own backend (`mixer backend: ...`), so the notice would only mislead.
    logging.getLogger("transformers.integrations.hub_kernels").setLevel(logging.ERROR)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per Hub request
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*is deprecated.*")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # per-file bars of weight loading/saving (transformers reads this through huggingface_hub)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    # Lightning suggests more dataloader workers; packed batches are built from memory and need none.
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*litlogger.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    # a resume into another directory: train.run says in its own words that best-* checkpoints start anew there
    warnings.filterwarnings("ignore", message=r"The dirpath has changed from .* won't be reloaded.*")
    # A resume with another trainer.max_steps or trainer.checkpoint_every_n_steps gives last.ckpt's callback another
    # save interval, which is part of a ModelCheckpoint's state key, so Lightning finds the stopped run's entry for it
    # unclaimed and asks for the old callback. That callback's state is only the path of last.ckpt, which every save
    # writes anew; the state that matters (the best-* callback's scores and top k, early stopping's count) is keyed
    # by the monitored metric and is restored (test_resume). A list naming any other callback still warns.
    warnings.filterwarnings("ignore", message=r"Be aware that when using `ckpt_path`, callbacks used to create the "
                            r".*Please add the following callbacks: \[(\"ModelCheckpoint\{'monitor': None, [^\"]*\}\""
                            r"(, )?)+\]\.$")
    # peft's save looks up the base's config on the Hub to see whether its vocabulary changed; the built-in model
    # (builtin:tiny) is no Hub id, and bamba_ft trains no embeddings under LoRA
    warnings.filterwarnings("ignore", message=r".*Could not find a config file in builtin:.*")
    # Lightning cannot see that the data module resumes mid-epoch itself (the epoch's batch plan is rebuilt from
    # seed + epoch and the trained batches skipped; streams record their position), so it warns on every resume
    # that the results may be unreliable; the resumed run trains what the uninterrupted run would (test_resume).
    warnings.filterwarnings("ignore", message=r".*resuming from a checkpoint that ended before the epoch ended.*")
    # Lightning compares an epoch's batches with trainer.log_every_n_steps, but logs by global step: a run of
    # trainer.max_steps over epochs of fewer batches than that logs every N steps all the same.
    warnings.filterwarnings("ignore", message=r".*is smaller than the logging interval.*")
    # val/loss is summed over ranks explicitly before logging (lit_module.on_validation_epoch_end)
    warnings.filterwarnings("ignore", message=r".*sync_dist=True.*when logging on epoch level.*")
    # datasets' file readers log a read error before raising it; bamba_ft's DataError names the file, the line
    # where it can, and the reader's message, so the log lines would only say it twice more.
    for reader in ("parquet.parquet", "json.json", "csv.csv"):
        logging.getLogger(f"datasets.packaged_modules.{reader}").addFilter(
            _DropMessages("Failed to read", "Failed to load JSON"))
    # A rank above 0 that ends with an error: runtime.exit_as_a_failed_rank says so, and with the rank's status.
    logging.getLogger("lightning.fabric.strategies.launchers.subprocess_script").addFilter(
        _DropMessages("Forcefully terminating"))
    # Lightning advertises a hosted logging service at every Trainer start; it is not a fact about the run.
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropMessages("litlogger"))


def lightning_through_root() -> None:
    """Lightning's loggers print through console handlers they add at import ("INFO: ..."), and the same records
    reach the root's handlers (Hydra's console and the run's log file): each line came twice on the console. Where
    the root has handlers, Lightning's own are dropped and its records go to the root's."""
    if not logging.getLogger().handlers:
        return
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        for handler in [h for h in logger.handlers if type(h) is logging.StreamHandler]:
            logger.removeHandler(handler)
        logger.propagate = True


EVERY_RANK = {"every_rank": True}
"""`log.info(..., extra=EVERY_RANK)`: a line that differs between ranks, printed by every rank (`ranks_above_zero`)."""


class _ThisRankOnly(logging.Filter):
    """Lets through errors and the lines marked EVERY_RANK, each labelled with the rank that wrote it."""

    def __init__(self, label: str) -> None:
        super().__init__()
        self.label = label

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR and not getattr(record, "every_rank", False):
            return False
        if not getattr(record, "rank_labelled", False):  # one record reaches several handlers
            record.msg, record.rank_labelled = f"[{self.label}] {record.msg}", True
        return True


def rank_label(environ: dict[str, str] | None = None) -> str:
    """'rank 3', or 'local rank 1 (of node 2)' where the launcher sets no global rank (Lightning's own launcher)."""
    env = os.environ if environ is None else environ
    if "RANK" in env:
        return f"rank {env['RANK']}"
    return f"local rank {env.get('LOCAL_RANK', '0')}" + (
        f" of node {env['NODE_RANK']}" if env.get("NODE_RANK", "0") != "0" else "")


def ranks_above_zero(environ: dict[str, str] | None = None) -> None:
    """In a process a distributed launcher started for a rank above 0, the console and the run's log keep only
    errors and the lines marked EVERY_RANK: every rank builds the same model and data and would print each of
    rank 0's lines again, interleaved with them."""
    label = rank_label(environ)
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _ThisRankOnly) for f in handler.filters):
            handler.addFilter(_ThisRankOnly(label))
