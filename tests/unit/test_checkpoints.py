"""Checkpoint integrity, the choice of checkpoint on resume, the run-directory lock, config changes on resume."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from bamba_ft.config.schema import RunConfig, SourceConfig
from bamba_ft.errors import ConfigError, ModelError
from bamba_ft.jobs import lock
from bamba_ft.jobs.checkpoints import (
    check_resume_config,
    config_changes,
    newest_intact,
    read_checkpoint,
    refuse_earlier_run,
    remove_stale_temporaries,
    resolve_resume,
    saved_step,
)
from bamba_ft.model.restore import checkpoint_problem, require_intact


def _ckpt(path: Path, step: int, age: float = 0.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"global_step": step, "state_dict": {"w": torch.arange(4096.0)}}, path)
    stamp = time.time() - age
    os.utime(path, (stamp, stamp))
    return path


def test_checkpoint_problem_tells_empty_truncated_corrupt_and_intact(tmp_path: Path) -> None:
    good = _ckpt(tmp_path / "good.ckpt", 1)
    assert checkpoint_problem(good) is None
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    assert "empty" in checkpoint_problem(empty)
    data = good.read_bytes()
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(data[: len(data) // 2])
    assert "truncated" in checkpoint_problem(cut)
    flipped = bytearray(data)
    offset = data.index(torch.arange(4096.0).numpy().tobytes()[:64]) + 100  # inside the tensor's bytes
    flipped[offset] ^= 0xFF
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(bytes(flipped))
    assert "CRC" in checkpoint_problem(bad)
    with pytest.raises(ModelError, match=r"cut\.ckpt is truncated"):
        require_intact(cut, "checkpoint")


def test_resume_falls_back_to_the_newest_intact_checkpoint(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    run = tmp_path / "run"
    _ckpt(run / "checkpoints" / "best-step000002.ckpt", 2, age=30)
    _ckpt(run / "checkpoints" / "last.ckpt", 4, age=20)
    newest = _ckpt(run / "checkpoints" / "interrupted.ckpt", 5, age=10)
    newest.write_bytes(newest.read_bytes()[:100])  # cut short, as by a crash or a full disk
    with caplog.at_level(logging.WARNING, logger="bamba_ft"):
        chosen = resolve_resume(str(run), tmp_path / "new")
    assert chosen == run / "checkpoints" / "last.ckpt"
    assert "interrupted.ckpt (truncated" in caplog.text and "using last.ckpt" in caplog.text
    (run / "checkpoints" / "last.ckpt").write_bytes(b"")
    assert newest_intact(run, "k").name == "best-step000002.ckpt"
    (run / "checkpoints" / "best-step000002.ckpt").write_bytes(b"PK")
    with pytest.raises(ConfigError, match="no intact checkpoint") as error:
        newest_intact(run, "trainer.resume")
    for named in ("interrupted.ckpt (truncated", "last.ckpt (empty", "best-step000002.ckpt (truncated"):
        assert named in str(error.value)


def test_resume_takes_the_furthest_step_not_the_newest_file(tmp_path: Path) -> None:
    """A copy or a restore from backup reorders file times: the best checkpoint of step 200 touched after the
    last one of step 250 must not lose the 50 steps. Among equal steps the newest file wins."""
    run = tmp_path / "run"
    _ckpt(run / "checkpoints" / "last.ckpt", 250, age=30)
    _ckpt(run / "checkpoints" / "best-step000200.ckpt", 200, age=10)
    assert resolve_resume(str(run), tmp_path / "new").name == "last.ckpt"
    _ckpt(run / "checkpoints" / "interrupted.ckpt", 250, age=5)
    assert newest_intact(run, "k").name == "interrupted.ckpt"


def test_resume_prefers_the_stops_save_to_a_newer_best_at_the_same_step(tmp_path: Path) -> None:
    """A best-* written by the validation at the step where training stopped has the same weights, but an older
    loop state: a resume takes interrupted.ckpt, then last.ckpt, whatever the files' times."""
    run = tmp_path / "run"
    _ckpt(run / "checkpoints" / "last.ckpt", 250, age=30)
    _ckpt(run / "checkpoints" / "interrupted.ckpt", 250, age=20)
    _ckpt(run / "checkpoints" / "best-step000250.ckpt", 250, age=10)
    assert resolve_resume(str(run), tmp_path / "new").name == "interrupted.ckpt"
    (run / "checkpoints" / "interrupted.ckpt").unlink()
    assert resolve_resume(str(run), tmp_path / "new").name == "last.ckpt"
    (run / "checkpoints" / "last.ckpt").unlink()
    assert resolve_resume(str(run), tmp_path / "new").name == "best-step000250.ckpt"


def test_training_into_a_directory_with_another_runs_results_is_refused(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / ".hydra").mkdir()  # what Hydra writes before every job
    refuse_earlier_run(run, None)
    _ckpt(run / "checkpoints" / "last.ckpt", 4)
    (run / "metrics.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"(?s)holds a training run \(metrics.json, checkpoints/last.ckpt\).*"
                                          r"Fix: continue that run with trainer.resume="):
        refuse_earlier_run(run, None)
    refuse_earlier_run(run, run / "checkpoints" / "last.ckpt")  # its own resume may write there
    evaluation = tmp_path / "eval"
    evaluation.mkdir()
    (evaluation / "metrics.json").write_text("{}")  # what recipe=eval leaves: nothing a resume could continue
    with pytest.raises(ConfigError, match=r"(?s)holds results \(metrics.json\) and is no training run to resume.*"
                                          r"Fix: train into another directory") as refused:
        refuse_earlier_run(evaluation, None)
    assert "trainer.resume" not in str(refused.value)
    other = _ckpt(tmp_path / "other" / "checkpoints" / "last.ckpt", 2)
    with pytest.raises(ConfigError, match="holds a training run"):
        refuse_earlier_run(run, other)


def test_a_named_broken_checkpoint_file_is_refused_with_its_name(tmp_path: Path) -> None:
    broken = tmp_path / "run" / "checkpoints" / "last.ckpt"
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"")
    (tmp_path / "run" / "run_config.yaml").write_text("{}")
    with pytest.raises(ConfigError, match=r"(?s)last\.ckpt is empty.*Fix: trainer\.resume=.*run resumes"):
        resolve_resume(str(broken), tmp_path / "new")
    # a file of no run (a data file given by mistake): no run directory to suggest, least of all its grandparent
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "chat.jsonl").write_text("{}\n")
    with pytest.raises(ConfigError, match=r"(?s)chat\.jsonl is truncated or not a checkpoint.*Fix: name a checkpoint"):
        resolve_resume(str(tmp_path / "data" / "chat.jsonl"), tmp_path / "new")


def test_config_changes_apply_optim_and_refuse_shape_keys() -> None:
    old = asdict(RunConfig())
    new = RunConfig()
    new.optim.lr = 1e-3
    new.trainer.max_steps = 900
    new.peft.r = 8
    new.data.max_tokens_per_batch = 1024
    new.output_dir = "elsewhere"  # never compared
    new.trainer.resume = "x"
    applied, refused = config_changes(old, new)
    assert applied == ["optim.lr: 0.0002 -> 0.001", "trainer.max_steps: 300 -> 900"]
    assert refused == ["data.max_tokens_per_batch: 4096 -> 1024", "peft.r: 16 -> 8"]


def test_keys_added_since_a_checkpoint_count_as_their_default() -> None:
    old = asdict(RunConfig())
    del old["data"]["overlong_stride"], old["data"]["sources"]  # a run of a version without these keys
    assert config_changes(old, RunConfig()) == ([], [])
    new = RunConfig()
    new.data.overlong_stride = 8
    assert config_changes(old, new) == ([], ["data.overlong_stride: 0 -> 8"])


@pytest.mark.parametrize("spelling", ["./train.jsonl", "train.jsonl", "../{name}/train.jsonl", "link.jsonl"])
def test_the_same_data_file_named_by_another_path_is_no_change(spelling: str, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A run trained on data.source=/abs/train.jsonl, resumed with ./train.jsonl from the file's directory, was
    refused as a data.source change; another file still is."""
    monkeypatch.chdir(tmp_path)
    for name in ("train.jsonl", "val.jsonl", "other.jsonl"):
        (tmp_path / name).write_text("{}\n")
    (tmp_path / "link.jsonl").symlink_to(tmp_path / "train.jsonl")
    given = spelling.format(name=tmp_path.name)
    old = RunConfig()
    old.data.source, old.data.val_source = str(tmp_path / "train.jsonl"), str(tmp_path / "val.jsonl")
    new = RunConfig()
    new.data.source, new.data.val_source = given, "./val.jsonl"
    assert config_changes(asdict(old), new) == ([], [])
    old.data.source, old.data.sources = "builtin", [SourceConfig(source=str(tmp_path / "train.jsonl"), weight=1.0)]
    new.data.source, new.data.sources = "builtin", [SourceConfig(source=given, weight=1.0)]
    assert config_changes(asdict(old), new) == ([], [])
    new.data.sources = [SourceConfig(source=given, weight=2.0)]  # the same file, another weight: a change
    assert config_changes(asdict(old), new)[1] == [f"data.sources: {asdict(old)['data']['sources']!r} -> "
                                                   f"{asdict(new)['data']['sources']!r}"]
    old.data.sources, new.data.sources = [], []
    old.data.source, new.data.source = str(tmp_path / "train.jsonl"), "./other.jsonl"
    assert config_changes(asdict(old), new) == ([], [f"data.source: {str(tmp_path / 'train.jsonl')!r} -> "
                                                     "'./other.jsonl'"])


def test_check_resume_config_reads_the_checkpoint_and_refuses(tmp_path: Path) -> None:
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"global_step": 3, "bamba_ft_config": asdict(RunConfig())}, ckpt)
    cfg = RunConfig()
    cfg.peft.r = 8
    with pytest.raises(ConfigError, match=r"(?s)peft\.r: 16 -> 8.*Fix: drop these overrides"):
        check_resume_config(read_checkpoint(ckpt), cfg)
    cfg.peft.r = 16
    cfg.optim.lr = 5e-4
    assert check_resume_config(read_checkpoint(ckpt), cfg) == ["optim.lr: 0.0002 -> 0.0005"]


def test_saved_step_reuses_a_reading_until_the_file_is_rewritten(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = _ckpt(tmp_path / "checkpoints" / "last.ckpt", 4)
    resumed = read_checkpoint(ckpt)
    assert (resumed.step, resumed.config) == (4, None)
    loads = []
    load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a[0]) or load(*a, **k))
    assert saved_step(ckpt, resumed) == 4 and loads == []
    assert saved_step(tmp_path / "missing.ckpt", resumed) is None and loads == []
    rewritten = _ckpt(tmp_path / "next.ckpt", 9)
    os.replace(rewritten, ckpt)  # as every checkpoint write ends
    assert saved_step(ckpt, resumed) == 9 and loads == [ckpt]
    assert saved_step(ckpt) == 9 and len(loads) == 2


_HOLD = """
import sys, time
from pathlib import Path
from bamba_ft.jobs import lock
lock.acquire(Path(sys.argv[1]))
print("locked", flush=True)
time.sleep(60)
"""


def test_lock_refuses_a_second_process_and_frees_on_death(tmp_path: Path) -> None:
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(run)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert lock.held_elsewhere(run)
        stale = run / "checkpoints" / ".last.ckpt.partial"
        stale.parent.mkdir()
        stale.write_bytes(b"half")
        assert remove_stale_temporaries(run) == [] and stale.exists()  # a live run's temporaries are its own
        with pytest.raises(ConfigError, match=rf"in use by a live bamba_ft run \(pid {holder.pid} on"):
            lock.acquire(run)
    finally:
        holder.kill()  # SIGKILL: no cleanup runs, the kernel drops the lock
        holder.wait()
    assert not lock.held_elsewhere(run)
    assert remove_stale_temporaries(run) == [stale] and not stale.exists()
    lock.acquire(run)
    lock.release(run)


def test_resume_latest_takes_the_newest_stopped_run_under_outputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    stopped = tmp_path / "outputs" / "2026-12-01" / "10-00-00"
    finished = tmp_path / "outputs" / "2026-12-01" / "11-00-00"
    _ckpt(stopped / "checkpoints" / "interrupted.ckpt", 3)
    _ckpt(finished / "checkpoints" / "last.ckpt", 10)
    (finished / "metrics.json").write_text("{}")
    os.utime(stopped, (time.time() - 60, time.time() - 60))  # the finished run is the newer one
    assert resolve_resume("latest", tmp_path / "new") == Path("outputs/2026-12-01/10-00-00/checkpoints/interrupted.ckpt")
    (stopped / "metrics.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"(?s)no stopped run under outputs/.*Fix: name the run or checkpoint"):
        resolve_resume("latest", tmp_path / "new")


def test_resume_latest_takes_a_stopped_runs_continuation_not_the_run_again(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A stopped run continued by `latest` into a new directory stayed the newest stopped run, so the next `latest`
    resumed it again from its own step instead of the continuation's. The continuation's run_config.yaml records
    the checkpoint it resumed from; the last run of that line is taken, stopped or finished."""
    monkeypatch.chdir(tmp_path)
    day = tmp_path / "outputs" / "2026-12-01"
    stopped, first, second = day / "10-00-00", day / "11-00-00", day / "12-00-00"
    _ckpt(stopped / "checkpoints" / "interrupted.ckpt", 18, age=300)
    os.utime(stopped, (time.time() - 300, time.time() - 300))
    _ckpt(first / "checkpoints" / "last.ckpt", 70, age=200)
    (first / "run_config.yaml").write_text(f"trainer:\n  resume: {stopped / 'checkpoints' / 'interrupted.ckpt'}\n")
    (first / "metrics.json").write_text("{}")  # finished: trainer.max_steps=70
    os.utime(first, (time.time() - 200, time.time() - 200))
    assert resolve_resume("latest", tmp_path / "new") == Path("outputs/2026-12-01/11-00-00/checkpoints/last.ckpt")
    # continued again and stopped there: the last of the line
    _ckpt(second / "checkpoints" / "interrupted.ckpt", 72, age=100)
    (second / "run_config.yaml").write_text("trainer:\n  resume: outputs/2026-12-01/11-00-00/checkpoints/last.ckpt\n")
    os.utime(second, (time.time() - 100, time.time() - 100))
    os.utime(stopped, (time.time(), time.time()))  # whatever the times say
    assert resolve_resume("latest", tmp_path / "new") == Path("outputs/2026-12-01/12-00-00/checkpoints/interrupted.ckpt")
    # a run recorded as `latest` (before the checkpoint found was recorded) and a resume in its own directory
    # name no other run: the newest stopped run is taken as it is
    for run, resume in ((first, "latest"), (second, str(second / "checkpoints" / "last.ckpt"))):
        (run / "run_config.yaml").write_text(f"trainer:\n  resume: {resume}\n")
    (second / "metrics.json").write_text("{}")
    assert resolve_resume("latest", tmp_path / "new") == Path("outputs/2026-12-01/10-00-00/checkpoints/interrupted.ckpt")


def test_ranks_writing_run_config_at_once_all_succeed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every rank that torchrun or srun starts writes run_config.yaml at about the same moment. Through one fixed
    temporary name, the rank that renamed it first left the other nothing to rename (FileNotFoundError ended that
    rank, and the run), or a half-written file of the other's under the final name."""
    from bamba_ft.model.restore import save_run_config
    from bamba_ft.rundir import RUN_CONFIG

    cfg = RunConfig()
    replace, other = os.replace, []

    def the_other_rank_first(src, dst) -> None:  # noqa: ANN001
        if not other:
            other.append(src)
            save_run_config(cfg, tmp_path)  # the other rank writes and renames before this one renames
        replace(src, dst)

    monkeypatch.setattr(os, "replace", the_other_rank_first)
    save_run_config(cfg, tmp_path)
    assert RunConfig().trainer.seed == int((tmp_path / RUN_CONFIG).read_text().split("seed: ")[1].split()[0])
    assert [p.name for p in tmp_path.iterdir()] == [RUN_CONFIG]  # no temporary left behind
