"""Integration fixtures: the CLI as a subprocess or its config run in this process, and one short real SFT run
shared by the tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def cli(args: list[str], cwd: Path, check: bool = True, timeout: int = 300,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `python -m bamba_ft ARGS` offline (unless `env` says otherwise); raise with its output on failure."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "bamba_ft", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}")
    return proc


def run_in_process(args: list[str], run_dir: Path) -> dict:
    """What `python -m bamba_ft ARGS hydra.run.dir=RUN_DIR` runs, in this process: the same composed config, checked
    against the same Hydra choices and overrides, and its task, without the several seconds a fresh interpreter
    spends importing torch, transformers and Lightning. For tests of what a task does: exit statuses, console
    logging, signals and Hydra's own files need `cli`."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from bamba_ft.__main__ import run_config
    from bamba_ft.config.store import config_dirs, register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(config_dirs()[0]), version_base="1.3"):
        cfg = compose("train", overrides=[*args, f"output_dir={run_dir}"], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # as Hydra's run_job does: the checks of a missing `???` read it
    with open_dict(cfg):
        del cfg["hydra"]
    try:
        return run_config(cfg)
    finally:
        HydraConfig.instance().cfg = None  # a later in-process compose must not see this run's choices


@pytest.fixture(scope="session")
def sft_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A short real SFT run (8 steps) whose outputs the eval and export recipes use. Tests that write into it
    work on a copy. (CLI training runs are checked by the token, signal, kill and DDP tests.)"""
    run = tmp_path_factory.mktemp("sft") / "run"
    run_in_process(["recipe=sft", "trainer=cpu", "trainer.max_steps=8", "trainer.val_check_interval=4",
                    "data.builtin_train_examples=200", "data.builtin_val_examples=24", "eval.num_generate=8",
                    "eval.max_new_tokens=6"], run)
    return run




def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every integration test runs real training or the CLI in a subprocess: all are `slow`, so
    `pytest -m "not slow"` is the quick inner loop (unit tests only)."""
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.slow)
