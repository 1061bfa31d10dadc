"""Keeps library import chatter off the console; bamba_ft reports the facts that matter itself."""

from __future__ import annotations

import logging
import os
import warnings


def silence_import_noise() -> None:
    # torchao tries to load CUDA extensions it cannot use on this machine and logs each failure;
    # torch's pytree logs a deprecation for every Enum torchao registers. Neither affects results.
    logging.getLogger("torchao").setLevel(logging.ERROR)
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    # Lightning suggests more dataloader workers; packed batches are built from memory and need none.
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*litlogger.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
