"""Exports killed at each step (SIGKILL through BAMBA_FT_FAULT, and SIGTERM) leave no finished-looking directory,
and the next export removes what they left and succeeds."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bamba_ft.errors import ConfigError
from bamba_ft.jobs.export import OWNER_FILE
from tests.integration.conftest import ROOT, cli, run_in_process

# The first and the last point before the rename, in the order an export reaches them: the export never reaches
# the target, whatever else it wrote. The points between them (export.before_verify, export.after_verify) hold the
# first point's temporary directory plus the tokenizer and generation config (and, with verify=false, nothing
# more); the cleanup removes such a directory whole whatever it holds, and only the rename after the last point
# creates the target. One after another into the same parent, so the second export also removes the first's.
BEFORE_RENAME = ["export.after_save", "export.before_rename"]


def export_overrides(run: Path, *extra: str) -> list[str]:
    return ["recipe=export", f"export.checkpoint={run}", "export.dtype=float32", *extra]


def export_args(run: Path, log: str, *extra: str) -> list[str]:
    return [*export_overrides(run, *extra), f"hydra.run.dir={log}"]


def killed_export(run: Path, cwd: Path, point: str, *extra: str) -> subprocess.CompletedProcess:
    # verify=false for the runs that are killed anyway: the reload check is a second process (~10 s on CPU)
    proc = cli(export_args(run, f"log-{point}", "export.verify=false", *extra), cwd=cwd, check=False,
               env={"BAMBA_FT_FAULT": point})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert "BAMBA_FT_FAULT: killing process" in proc.stderr and f"at {point}\n" in proc.stderr  # not an earlier crash
    return proc


def in_process_export(run: Path, cwd: Path, log: str, *extra: str) -> dict:
    """An export that is not killed: its config in this process (the killed ones need a process of their own)."""
    return run_in_process(export_overrides(run, *extra), cwd / log)


def leftovers(parent: Path, name: str = "export") -> list[str]:
    return sorted(p.name.split("-")[0] for p in parent.iterdir() if p.name.startswith(f".{name}."))


def assert_verified_export(target: Path) -> None:
    report = json.loads((target / "export_report.json").read_text())
    assert report["verify"]["max_rel_logit_diff"] <= 1e-5 and report["verify"]["greedy_generation_identical"]
    assert (target / "model.safetensors").exists() and not (target / OWNER_FILE).exists()


def assert_nothing_looks_finished(target: Path) -> None:
    """The target is either absent or a complete export; nothing else in its parent carries the target's name."""
    assert not target.exists() or (target / "export_report.json").exists()


@pytest.fixture
def run_copy(sft_run: Path, tmp_path: Path) -> Path:
    """The shared run without its exports, so the target directory starts absent."""
    run = tmp_path / "run"
    shutil.copytree(sft_run, run, ignore=shutil.ignore_patterns("export*", ".export*"))
    return run


def test_export_killed_before_rename_is_cleaned_by_next_export(run_copy: Path, tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    target = run_copy / "export"
    for i, point in enumerate(BEFORE_RENAME):
        proc = killed_export(run_copy, tmp_path, point)
        assert_nothing_looks_finished(target)
        assert not target.exists()
        # Each killed export leaves its temporary directory, weights included, and removed the one before it.
        partials = [p for p in run_copy.iterdir() if p.name.startswith(".export")]
        assert [p.name.split("-")[0] for p in partials] == [".export.partial"], point
        assert (partials[0] / OWNER_FILE).exists() and (partials[0] / "model.safetensors").exists()
        assert proc.stdout.count("left by an export that was killed") == min(i, 1), proc.stdout
    assert (partials[0] / "export_report.json").exists()  # complete but for the rename: still not at the target

    # Temporary directories the next export must keep: a live export's (this test process) and another host's.
    live = run_copy / ".export.partial-live"
    live.mkdir()
    (live / OWNER_FILE).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                               "start": _start(os.getpid())}))
    remote = run_copy / ".export.partial-remote"
    remote.mkdir()
    (remote / OWNER_FILE).write_text(json.dumps({"pid": 1, "host": socket.gethostname() + "-elsewhere"}))

    # verify=false: the target was absent, so a complete one is this export's; the reload check of an export made
    # after a cleanup is the next test's last export
    with caplog.at_level(logging.WARNING, logger="bamba_ft"):
        in_process_export(run_copy, tmp_path, "log-next", "export.verify=false")
    assert caplog.text.count("left by an export that was killed") == 1, caplog.text
    assert (target / "export_report.json").exists() and (target / "model.safetensors").exists()
    assert not (target / OWNER_FILE).exists()
    assert sorted(p.name for p in run_copy.iterdir() if p.name.startswith(".export")) == [
        ".export.partial-live", ".export.partial-remote"]
    # Readable by other users, as the umask allows (mkdtemp alone gives 0700, mkstemp 0600).
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o777 & ~umask
    for f in target.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, f


def _start(pid: int) -> str | None:
    from bamba_ft.jobs.export import _process_start

    return _process_start(pid)


@pytest.mark.slow
def test_export_killed_while_replacing_keeps_one_complete_export(run_copy: Path, tmp_path: Path) -> None:
    target = run_copy / "export"
    in_process_export(run_copy, tmp_path, "log-first", "export.verify=false")
    first = (target / "model.safetensors").read_bytes()

    # Killed between moving the old export aside and moving the new one in: the target is briefly absent.
    killed_export(run_copy, tmp_path, "export.mid_replace", "export.overwrite=true")
    assert not target.exists() and leftovers(run_copy) == [".export.old", ".export.partial"]
    # The next export puts the old one back first, so without overwrite it refuses, as it did before the kill.
    with pytest.raises(ConfigError, match="exists. Fix:"):
        in_process_export(run_copy, tmp_path, "log-refused")
    assert (target / "model.safetensors").read_bytes() == first and leftovers(run_copy) == []

    # Killed after the rename: the new export is complete; the old one and the owner file are what is left.
    killed_export(run_copy, tmp_path, "export.after_rename", "export.overwrite=true")
    assert_nothing_looks_finished(target)
    assert (target / OWNER_FILE).exists() and leftovers(run_copy) == [".export.old"]
    in_process_export(run_copy, tmp_path, "log-last", "export.overwrite=true")
    assert_verified_export(target)
    assert leftovers(run_copy) == []


def test_export_sigterm_removes_its_temporary_directory(run_copy: Path, tmp_path: Path) -> None:
    """SIGTERM (docker stop, a scheduler's preemption) during the reload check: exit 143, nothing left."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "bamba_ft", *export_args(run_copy, "log-term")], cwd=tmp_path,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    # config.json is stripped of the attention choice right after the weights are saved; the check follows.
    while not any((p / "tokenizer.json").exists() for p in run_copy.glob(".export.partial-*")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err[-2000:]
    assert "export interrupted (SystemExit)" in err and "Traceback" not in err
    assert leftovers(run_copy) == [] and not (run_copy / "export").exists()


def test_eval_killed_before_metrics_leaves_no_metrics_json(sft_run: Path, tmp_path: Path) -> None:
    """metrics.json marks a complete evaluation: a kill before it leaves none, not last time's beside new outputs."""
    out = tmp_path / "eval"
    out.mkdir()
    (out / "metrics.json").write_text('{"from": "an earlier evaluation"}\n')
    args = ["recipe=eval", f"eval.checkpoint={sft_run}", f"eval.output_dir={out}", "eval.num_generate=2",
            "eval.max_new_tokens=2"]
    proc = cli([*args, "hydra.run.dir=log-killed"], cwd=tmp_path, check=False, env={"BAMBA_FT_FAULT": "eval.before_metrics"})
    assert proc.returncode == -signal.SIGKILL and "at eval.before_metrics\n" in proc.stderr, proc.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["curves.png", "predictions.jsonl"]
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 2

    run_in_process(args, tmp_path / "log-again")
    assert json.loads((out / "metrics.json").read_text())["metrics"]["num_generated"] == 2
    assert sorted(p.name for p in out.iterdir()) == ["curves.png", "metrics.json", "predictions.jsonl"]
    umask = os.umask(0o022)
    os.umask(umask)
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {0o666 & ~umask}
