"""Which checkpoint a resume uses: intact ones only, the furthest into training, and a config that may not silently differ.

Intact means `model.restore.checkpoint_problem` finds nothing wrong. A resume compares the run's
config with the one saved in the checkpoint: keys that change what is trained (model, adapter, quantization,
data, seed, batch geometry) are refused; the others apply from the resumed step on and are recorded.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason
from omegaconf import OmegaConf

from bamba_ft.config.schema import RunConfig, canonical_checkpointing, same_source
from bamba_ft.errors import ConfigError
from bamba_ft.jobs.lock import held_elsewhere
from bamba_ft.model.restore import checkpoint_problem, checkpoint_state, is_sharded, state_file
from bamba_ft.rundir import INTERRUPTED, LAST, RUN_CONFIG, RunDir

log = logging.getLogger("bamba_ft")

CONFIG_KEY = "bamba_ft_config"  # the run's RunConfig, as a dict, inside every checkpoint
WORLD_KEY = "bamba_ft_world_size"  # the number of ranks that wrote it
DATA_KEY = "bamba_ft_train_data"  # the training set's fingerprint (BambaDataModule.train_fingerprint)
BEFORE_KEY = "bamba_ft_before"  # the metrics of the model before training, which a resume does not measure again
# Written between two batches of one accumulated optimizer step (by a validation there, which counts batches): the
# gradient accumulated so far is not in it, so a resume from it would train that step on fewer batches.
MID_STEP_KEY = "bamba_ft_mid_step"
MID_STEP = ("written between the accumulated batches of an optimizer step (by a validation there): the gradient "
            "they had accumulated is not saved, so a resume would train that step on fewer batches")

# Keys whose change on resume applies from the resumed step on (recorded in the new run's run_config.yaml).
APPLIED = ("optim.", "trainer.max_steps", "trainer.max_epochs", "trainer.val_check_interval",
           "trainer.log_every_n_steps", "trainer.checkpoint_every_n_steps", "trainer.save_top_k",
           "trainer.gradient_clip_val", "trainer.limit_val_batches", "trainer.enable_progress_bar",
           "trainer.precision", "trainer.accelerator", "trainer.deterministic", "trainer.num_sanity_val_steps",
           "trainer.early_stopping_patience", "trainer.early_stopping_min_delta",
           "model.dtype", "model.attn_implementation", "model.mixer", "model.gradient_checkpointing",
           "model.activation_offload", "model.cuda_graphs", "model.scan_states", "data.num_proc", "data.num_workers",
           "data.max_val_examples", "eval.", "logger.")
# Keys that set how many ranks share a step and how many batches each accumulates: a resume may change them when
# ranks x accumulated batches (the batches of one optimizer step) stays the same (`resume_on_ranks` checks that).
RANKS = ("trainer.devices", "trainer.num_nodes", "trainer.accumulate_grad_batches")
# Keys that do not concern training at all.
IGNORED = ("task", "debug", "output_dir", "trainer.resume", "trainer.fast_dev_run", "export.", "bench.", "sweep.",
           "generate.", "preview.")


def newest_intact(run_dir: Path, key: str, prefer: tuple[str, ...] = (INTERRUPTED, LAST)) -> Path:
    """The intact checkpoint of `run_dir` furthest into training: the highest global_step; among equals the first
    of `prefer` by name, else the newest file. At one step the weights are the same, but a `best-*` is written
    from inside validation, so its loop state is older than the stop's or the periodic save's: a resume from it
    would repeat that validation and, at the end of an epoch, its bookkeeping. File times do not decide between
    steps: a copy, an rsync or a restore from backup changes them, the step stays. Says which checkpoints were
    skipped and why."""
    found = RunDir(run_dir).resumable_checkpoints()  # newest file first: the order among equal steps
    if not found:
        raise ConfigError(f"{key}: {run_dir}/checkpoints has no checkpoint (last.ckpt, interrupted.ckpt, best-*).")
    steps: dict[Path, int] = {}
    skipped = []
    mid_step = False
    for path in found:
        problem = checkpoint_problem(path)
        if problem is None:
            try:
                state = checkpoint_state(path)
                if state.get(MID_STEP_KEY):
                    problem, mid_step = "inside an optimizer step", True
                else:
                    steps[path] = int(state.get("global_step", -1))
            except Exception as e:  # an archive whose state does not unpickle
                problem = f"unreadable state ({type(e).__name__})"
        if problem is not None:
            skipped.append(f"{path.name} ({problem})")
    if not steps:
        raise ConfigError(f"{key}: no intact checkpoint in {run_dir}/checkpoints: {'; '.join(skipped)}.\n"
                          + (f"(Inside an optimizer step: {MID_STEP}.)\n" if mid_step else "")
                          + "Fix: start a new run, or resume from another run's directory.")
    best = max(steps, key=steps.get)  # the first of the highest: the newest file at that step
    named = [p for name in prefer for p in steps if p.name == name and steps[p] == steps[best]]
    best = named[0] if named else best
    if skipped:
        log.warning("%s: skipping %s; using %s (step %d), the intact checkpoint furthest into training.",
                    key, "; ".join(skipped), best.name, steps[best])
    return best


def resolve_resume(resume: str | None, run_dir: Path) -> Path | None:
    """trainer.resume: a .ckpt file, a run directory, or `latest` (newest run under outputs/ with a checkpoint)."""
    if not resume:
        return None
    key = f"trainer.resume={resume}"
    if resume == "latest":
        # a stopped run: a finished one (its metrics.json written) has nothing left to train
        found = {p.parent.parent for p in Path("outputs").glob("*/*/checkpoints/*.ckpt")}
        found = {r for r in found if r.resolve() != run_dir.resolve()}
        runs = sorted((r for r in found if not RunDir(r).metrics.exists()), key=lambda r: r.stat().st_mtime)
        if not runs:
            raise ConfigError("trainer.resume=latest: no stopped run under outputs/ (the default hydra.run.dir) has a "
                              "checkpoint; finished runs are not resumed.\nFix: name the run or checkpoint, "
                              "trainer.resume=<run dir or .ckpt> (needed for runs written with hydra.run.dir=...).")
        path = last_continuation(runs[-1], found)
        if path == runs[-1]:
            log.info("trainer.resume=latest: %s, the newest stopped run under outputs/", path)
        else:
            log.info("trainer.resume=latest: %s, the last run that continued %s, the newest stopped run under "
                     "outputs/", path, runs[-1])
    else:
        path = Path(resume).expanduser()
    if path.is_file() or is_sharded(path):
        problem = checkpoint_problem(path)
        if problem:
            run = path.parent.parent
            fix = (f"trainer.resume={run} resumes from the intact checkpoint of its run furthest into training"
                   if path.parent.name == "checkpoints" and (run / RUN_CONFIG).exists() else
                   "name a checkpoint (<run>/checkpoints/NAME.ckpt) or a run directory")
            raise ConfigError(f"{key}: {path} is {problem}.\nFix: {fix}.")
        return path
    if path.is_dir():
        remove_stale_temporaries(path)
        return newest_intact(path, key)
    raise ConfigError(f"{key}: no such checkpoint file or run directory.")


def resumed_from(run: Path) -> Path | None:
    """The run directory whose checkpoint `run` resumed from, as its run_config.yaml records it (train.run writes
    the checkpoint it found there, in place of `latest` or a run directory); None for a run that is no resume."""
    try:
        value = OmegaConf.select(OmegaConf.load(RunDir(run).run_config), "trainer.resume")
    except Exception:  # no run config, or one that does not parse: no record
        return None
    if not value or value == "latest":  # `latest`: written before the checkpoint it found was recorded
        return None
    path = Path(str(value)).expanduser()
    return path.parent.parent if path.parent.name == "checkpoints" else path


def last_continuation(run: Path, runs: set[Path]) -> Path:
    """`run`, or where one of `runs` resumed from it into another directory, the last run of that line (the newest
    at each step): a stopped run that was continued is not taken up again from its own step."""
    later: dict[Path, list[Path]] = {}
    for r in runs:
        if (source := resumed_from(r)) is not None and source.resolve() != r.resolve():
            later.setdefault(source.resolve(), []).append(r)
    seen = set()
    while run.resolve() in later and run.resolve() not in seen:
        seen.add(run.resolve())
        run = max(later[run.resolve()], key=lambda r: r.stat().st_mtime)
    return run


def refuse_earlier_run(run_dir: Path, ckpt_path: Path | None) -> None:
    """A training run into a directory that holds another run's results would replace its adapter and metrics and
    mix its checkpoints with the new ones: only a resume of that run may write there."""
    if ckpt_path is not None and run_dir.resolve() in ckpt_path.resolve().parents:
        return
    rd = RunDir(run_dir)
    found = rd.trained_outputs()
    if found and not rd.run_config.exists() and not rd.resumable_checkpoints():  # recipe=eval writes metrics.json too
        raise ConfigError(f"{run_dir} already holds results ({', '.join(found)}) and is no training run to resume: "
                          "a new run there would replace them.\nFix: train into another directory "
                          "(hydra.run.dir=...), or delete it first.", "the run directory")
    if found:
        shown = ", ".join(found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
        raise ConfigError(f"{run_dir} already holds a training run ({shown}); a new run there would replace its "
                          "results and mix its checkpoints with the new ones.\n"
                          f"Fix: continue that run with trainer.resume={run_dir}, train into another directory "
                          "(hydra.run.dir=...), or delete it first.", "the run directory")


def remove_stale_temporaries(run_dir: Path) -> list[Path]:
    """Delete what a killed writer left in a run that no process owns: `.name.partial` checkpoints and directories,
    `.name.tmp` files. Runs that another live process holds are left alone."""
    if held_elsewhere(run_dir):
        return []
    restore_replaced(run_dir / "checkpoints")
    stale = [p for pattern in (".*.partial", ".*.tmp", "checkpoints/.*.partial") for p in run_dir.glob(pattern)]
    for path in stale:
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=True)
    if stale:
        log.info("removed %d unfinished file(s) a stopped process left in %s: %s", len(stale), run_dir,
                 ", ".join(p.name for p in stale))
    return stale


def replace_path(tmp: Path, path: Path) -> None:
    """Rename `tmp` (a finished file or directory) onto `path`; a directory in the way is first renamed aside to
    `.NAME.old`, which `restore_replaced` puts back if a crash comes between the two renames."""
    if path.is_dir():
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        if path.exists():
            path.unlink()  # a checkpoint file of the same name (os.replace cannot put a directory over a file)
        os.replace(tmp, path)
    fsync_dir(path.parent)


def restore_replaced(directory: Path) -> None:
    """Undo a `replace_path` cut short: `.NAME.old` goes back to NAME when NAME is missing, else it is removed."""
    for old in directory.glob(".*.old"):
        name = directory / old.name[1 : -len(".old")]
        if name.exists():
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
        else:
            os.replace(old, name)
            log.warning("restored %s: a checkpoint save that was replacing it was killed midway", name)


# ----- the config a checkpoint was written with


@dataclass(frozen=True)
class SavedCheckpoint:
    """What bamba_ft reads of a checkpoint (file or sharded directory) besides its tensors, from one load."""

    path: Path
    step: int | None
    """The optimizer step it was written at."""
    config: dict[str, Any] | None
    """The RunConfig stored under CONFIG_KEY (None in checkpoints written before it was stored)."""
    version: tuple[int, int, int, int]
    """(device, inode, size, mtime ns) of the file read: every checkpoint write ends in a rename, so a rewrite
    changes it."""
    data: str | None = None
    """The fingerprint of the training set it trained on (None: streamed, or written before it was stored)."""
    before: dict[str, Any] | None = None
    """The metrics before training of the run that wrote it (None where not measured or not stored)."""
    early_stopped: bool = False
    """Early stopping (trainer.early_stopping_patience) had ended the fit: as many validations without improvement
    as its patience."""
    mid_step: bool = False
    """Written inside an accumulated optimizer step (MID_STEP)."""


def _version(ckpt: Path) -> tuple[int, int, int, int]:
    st = state_file(ckpt).stat()  # a sharded directory: its meta.pt
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def read_checkpoint(ckpt: Path) -> SavedCheckpoint:
    """The step and config of `ckpt` (a file or a sharded directory); memory-mapped, so its tensors are not read."""
    version = _version(ckpt)
    state = checkpoint_state(ckpt)
    step = state.get("global_step")
    stopped = any(name.startswith("PatientEarlyStopping") and isinstance(s, dict)
                  and s.get("stopping_reason") == EarlyStoppingReason.PATIENCE_EXHAUSTED.value
                  for name, s in (state.get("callbacks") or {}).items())
    return SavedCheckpoint(ckpt, None if step is None else int(step), state.get(CONFIG_KEY), version,
                           state.get(DATA_KEY), state.get(BEFORE_KEY), stopped, bool(state.get(MID_STEP_KEY)))


def refuse_mid_step(resumed: SavedCheckpoint, key: str) -> None:
    """A checkpoint named by trainer.resume that was written inside an accumulated step (a run directory's
    resume skips those: newest_intact)."""
    if resumed.mid_step:
        path = resumed.path
        raise ConfigError(f"{key}: {path} was {MID_STEP}.\nFix: resume from its run directory, "
                          f"trainer.resume={path.parent.parent}, which takes the checkpoint furthest into training "
                          "that ends a step (last.ckpt, interrupted.ckpt, another best-*); its weights serve "
                          f"recipe=eval and recipe=export as they are (eval.checkpoint={path}).")


def refuse_finished(resumed: SavedCheckpoint, max_steps: int | None, key: str) -> None:
    """A resume of a run that finished would train no step and write its results again: the adapter unchanged, and
    train figures (time, tokens, tokens/s) of a fit that did nothing in place of the real ones. A run stopped at its
    last step before it wrote its results (no metrics.json yet) may resume: that writes them."""
    if resumed.step is None or not (resumed.early_stopped or (max_steps and max_steps > 0 and resumed.step >= max_steps)):
        return
    run = RunDir.of_checkpoint(resumed.path) if resumed.path.parent.name == "checkpoints" else None
    if run is None or not run.metrics.exists():
        return
    if resumed.early_stopped:
        raise ConfigError(f"{key}: that run finished: early stopping ended it at step {resumed.step} (its checkpoint "
                          f"{resumed.path.name}), and its results are written ({run.metrics}); a resume restores the "
                          "early stopping's count, so it would stop again at its next validation.\nFix: evaluate or "
                          f"export it (recipe=eval eval.checkpoint={run.root}), or start a new run.")
    raise ConfigError(f"{key}: that run finished: its checkpoint {resumed.path.name} is at step {resumed.step} and "
                      f"trainer.max_steps={max_steps}, so nothing is left to train, and its results are written "
                      f"({run.metrics}).\nFix: raise trainer.max_steps (e.g. trainer.max_steps={2 * resumed.step}) "
                      f"to train on from step {resumed.step}, or evaluate it: recipe=eval eval.checkpoint={run.root}.")


def check_resume_data(resumed: SavedCheckpoint, now: str | None) -> None:
    """The rows a resume continues over must be the rows the checkpoint's position in the data counts."""
    if resumed.data is not None and now is not None and resumed.data != now:
        raise ConfigError(f"trainer.resume={resumed.path}: the training data changed since this checkpoint was "
                          f"written ({resumed.data} then, {now} now): the resumed position in the epoch would count "
                          "other rows, and the run would be neither the old data's nor the new's. (A file left "
                          "unchanged differs too when an earlier bamba_ft held more of its rows out for validation: "
                          "data.max_val_examples now bounds the hold-out.)\nFix: resume "
                          "with the data it trained on, or start a new run (without trainer.resume) on the new data.")


def saved_step(ckpt: Path, known: SavedCheckpoint | None = None) -> int | None:
    """The optimizer step `ckpt` was written at (None when there is no such file). `known` is an earlier reading:
    while the file is still the version it read, its step is used instead of loading the file again."""
    if not ckpt.exists():
        return None
    if known is not None and known.version == _version(ckpt):
        return known.step
    return read_checkpoint(ckpt).step


def saved_config(saved: SavedCheckpoint) -> dict[str, Any] | None:
    """The RunConfig (as a dict) stored in the checkpoint, else its run's run_config.yaml, else None."""
    if saved.config is not None:
        return saved.config
    run_config = RunDir.of_checkpoint(saved.path).run_config
    return OmegaConf.to_container(OmegaConf.load(run_config)) if run_config.exists() else None  # type: ignore[return-value]


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(data, dict):
        return {prefix.rstrip("."): data}
    flat: dict[str, Any] = {}
    for key, value in data.items():
        flat.update(_flatten(value, f"{prefix}{key}."))
    return flat


# Keys naming data sources: the same local file or directory spelt otherwise is no change.
PATHS = ("data.source", "data.val_source", "data.sources")


def _same_data(was: Any, now: Any) -> bool:
    """Whether two values of a key of PATHS name the same data: a source each (`same_source`), or lists of
    data.sources alike but for their sources' spelling."""
    if isinstance(was, str) and isinstance(now, str):
        return same_source(was, now)
    if isinstance(was, list) and isinstance(now, list) and len(was) == len(now):
        return all(isinstance(a, dict) and isinstance(b, dict) and {**a, "source": b.get("source")} == b
                   and _same_data(a.get("source"), b.get("source")) for a, b in zip(was, now))
    return False


def _matches(key: str, patterns: tuple[str, ...]) -> bool:
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in patterns)


def config_changes(old: dict[str, Any], new: RunConfig) -> tuple[list[str], list[str]]:
    """(applied, refused): 'key: old -> new' lines for every key that differs between a checkpoint's run and now."""
    before, after = _flatten(old), _flatten(asdict(new))
    defaults = _flatten(asdict(RunConfig()))
    applied, refused = [], []
    for key in sorted(set(before) | set(after)):
        if key not in after or _matches(key, IGNORED):  # keys of another bamba_ft version are dropped on load
            continue
        # A key added since the checkpoint's version was, in effect, at its default there.
        was, now = before.get(key, defaults.get(key, "(unset)")), after[key]
        if key == "model.gradient_checkpointing":  # saved as true/false before it named layers
            was = canonical_checkpointing(was)
        if was == now or (isinstance(was, (int, float)) and isinstance(now, (int, float)) and float(was) == float(now)):
            continue
        if key in PATHS and _same_data(was, now):  # the same file named by another path (./, absolute, a link)
            continue
        # A stream's validation rows are its head, so their number moves where training starts in the stream.
        fixed_by_stream = key == "data.max_val_examples" and new.data.streaming
        ok = (_matches(key, APPLIED) and not fixed_by_stream) or (_matches(key, RANKS) and not new.data.streaming)
        why = ""
        if not ok and _matches(key, RANKS):  # refused only because the data is streamed
            why = (" (data.streaming=true: a stream's position counts the batches of each window that each rank "
                   "trained, so a streamed run resumes on the ranks and accumulation that wrote it)")
        (applied if ok else refused).append(f"{key}: {was!r} -> {now!r}{why}")
    return applied, refused


def check_resume_config(saved: SavedCheckpoint, cfg: RunConfig) -> list[str]:
    """Refuse a resume whose config changes what is trained; return the applied changes (to log and record)."""
    ckpt, old = saved.path, saved_config(saved)
    if old is None:
        log.warning("%s holds no bamba_ft config and its run has no run_config.yaml: config changes cannot be "
                    "checked on this resume.", ckpt)
        return []
    applied, refused = config_changes(old, cfg)
    if refused:
        changes = "\n".join(refused)
        raise ConfigError(
            f"trainer.resume from {ckpt}: these settings differ from the checkpoint's run and change what is "
            f"trained, so the checkpoint cannot continue under them:\n{changes}\n"
            "Fix: drop these overrides to resume, or start a new run (without trainer.resume) to train with them."
        )
    return applied


def resume_on_ranks(checkpoint: dict[str, Any], world_size: int, accumulate: int) -> None:
    """Let a checkpoint written by N ranks continue on M: same optimizer steps, each from the same batches.

    Rank r trains on every N-th batch of the epoch plan, so N ranks accumulating A batches consume the plan in the
    order M ranks accumulating B do when N*A == M*B. The loop counters of a checkpoint count this rank's batches:
    the batches done are rescaled by N/M, keeping the one-batch lag that marks a save at a batch's end. The data
    module rescales its position the same way (BambaDataModule.load_state_dict).
    """
    saved = int(checkpoint.get(WORLD_KEY, world_size))
    if saved == world_size:
        return
    saved_accumulate = int(checkpoint.get(CONFIG_KEY, {}).get("trainer", {}).get("accumulate_grad_batches", 0))
    if saved * saved_accumulate != world_size * accumulate:
        fit = saved * saved_accumulate / world_size
        fix = (f"trainer.accumulate_grad_batches={int(fit)}" if fit == int(fit) and fit >= 1
               else f"a number of ranks that divides {saved * saved_accumulate}")
        raise ConfigError(
            f"trainer.resume: the checkpoint was written by {saved} ranks accumulating {saved_accumulate} batches "
            f"per step ({saved * saved_accumulate} batches a step); this run has {world_size} ranks accumulating "
            f"{accumulate} ({world_size * accumulate}), which would change the training.\nFix: {fix}."
        )
    progress = checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]
    # Written at an epoch's end, the epoch's batches are all done: a batch count that does not divide by the ranks
    # is the epoch's remainder, not a step split (the data module maps the position: BambaDataModule.load_state_dict).
    # The total over earlier epochs, whose remainders differ on other ranks, only schedules validations: rounded.
    ended = bool(progress.get("is_last_batch"))
    for part in ("total", "current"):
        counts = progress[part]
        done, rest = divmod(counts["processed"] * saved, world_size)
        if rest and part == "current" and not ended:
            raise ConfigError(f"trainer.resume: the checkpoint was written in the middle of an optimizer step's "
                              f"batches, which {world_size} ranks cannot split.\nFix: resume from last.ckpt or "
                              f"interrupted.ckpt (written at a step), or on {saved} ranks.")
        progress[part] = {k: done - (counts["processed"] - v) for k, v in counts.items()}


def config_for_checkpoint(cfg: RunConfig) -> dict[str, Any]:
    """What `CONFIG_KEY` holds: the config as plain data (no secrets live in RunConfig)."""
    return asdict(cfg)


def fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable (a crash right after it keeps the new name)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
