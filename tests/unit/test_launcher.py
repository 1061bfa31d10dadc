"""A rank above 0 that ends with an error status: the launching process ends with that status, not SIGKILL's 137."""

from __future__ import annotations

import os
import signal

import pytest

from bamba_ft.jobs import runtime


class FakeChild:
    def __init__(self, returncode: int | None, pid: int) -> None:
        self.returncode, self.pid, self.signals = returncode, pid, []

    def poll(self) -> int | None:
        return self.returncode

    def send_signal(self, sig: int) -> None:
        self.signals.append(sig)


@pytest.mark.parametrize(("returncode", "status"), [(2, 2), (130, 130), (-9, 137)])
def test_the_launching_process_ends_with_the_failed_ranks_status(monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture,
                                                                 returncode: int, status: int) -> None:
    from lightning.fabric.strategies.launchers.subprocess_script import _ChildProcessObserver

    runtime.exit_as_a_failed_rank()
    runtime.exit_as_a_failed_rank()  # installed once
    killed: list[tuple[int, int]] = []
    monkeypatch.setattr(os, "kill", lambda pid, sig: killed.append((pid, sig)))

    def exit_(code: int) -> None:
        raise SystemExit(code)

    monkeypatch.setattr(os, "_exit", exit_)
    failed, running = FakeChild(returncode, 101), FakeChild(None, 102)
    observer = _ChildProcessObserver(main_pid=os.getpid(), child_processes=[failed, running])
    with pytest.raises(SystemExit) as stop:
        observer._run()
    assert stop.value.code == status and killed == []  # not SIGKILL: the launching process exits with the status
    assert running.signals == [signal.SIGKILL] and failed.signals == []  # the ranks still running are stopped
    assert f"pid 101) ended with status {status}" in capsys.readouterr().err


@pytest.mark.parametrize("world,read", [("4", 4), ("1", 1), (None, None), ("", None), ("two", None)])
def test_world_size_is_read_in_one_place_by_every_rank_count(monkeypatch: pytest.MonkeyPatch, world: str | None,
                                                             read: int | None) -> None:
    """torchrun's WORLD_SIZE had three readers: the eval/export refusal, the trainer.devices check and the
    benchmark's ranks, which failed on a WORLD_SIZE that is no number where the other two read it as unset."""
    from bamba_ft.config.schema import RunConfig, launched_ranks_problem, torchrun_world_size
    from bamba_ft.jobs import bench_ranks

    for var in ("WORLD_SIZE", "SLURM_STEP_NUM_TASKS", "RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(var, raising=False)
    if world is not None:
        monkeypatch.setenv("WORLD_SIZE", world)
    env = dict(os.environ)
    assert torchrun_world_size(env) == torchrun_world_size() == read
    assert runtime.launched_ranks(env) == (read or 1) and bench_ranks.world_size() == (read or 1)
    cfg = RunConfig()
    cfg.trainer.accelerator, cfg.trainer.devices = "cpu", 2  # two ranks: a refusal wherever another count is read
    assert (launched_ranks_problem(cfg, env) is None) == (read in (None, 2))
