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
