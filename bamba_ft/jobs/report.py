"""Writing results: atomic files, the training-curve plot, the closing summary table."""

from __future__ import annotations

import csv
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from bamba_ft.rundir import RunDir


def output_path_problem(path: Path, what: str, directory: bool) -> str | None:
    """None when a command can write `path` (a directory if `directory`, else a file) as far as the paths go, else
    the problem: it exists as the other kind, or a directory on the way to it is a file. `what` names it (the key and
    its value). Checked before the work, which otherwise ended in a traceback from mkdir or the final rename."""
    path = path.expanduser()
    if path.exists():
        if directory and not path.is_dir():
            return f"{what} is a file.\nFix: name a directory."
        if not directory and path.is_dir():
            return f"{what} is a directory.\nFix: name a file (in that directory: {path / 'NAME'})."
        return None
    for parent in path.absolute().parents:
        if parent.exists():
            return None if parent.is_dir() else (f"{what}: {parent} is a file, so nothing can be written under it.\n"
                                                 f"Fix: name a path whose parent directories are directories.")
    return None


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temporary file beside `path`, then rename: readers never see a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def current_umask() -> int:
    """The process umask, read without changing it where Linux reports it (os.umask alone must set a new one)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink inside `path` durable (a no-op where directories cannot be opened, as on Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish_file(path: Path, data: str | bytes) -> None:
    """Write `path` atomically and durably, readable by others as the umask allows (mkstemp's files are 0600).

    A kill leaves either the old file or the new one, plus at worst a hidden `.<name>.*.tmp` beside it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            if hasattr(os, "fchmod"):  # not on Windows, where the default mode is readable anyway
                os.fchmod(f.fileno(), 0o666 & ~current_umask())
            os.fsync(f.fileno())  # data on disk before the rename, or a power cut can leave an empty file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def _version(path: Path) -> int:
    """N of a CSV log's `version_N` directory (Lightning numbers each process's log in the run directory)."""
    suffix = path.parent.name.removeprefix("version_")
    return int(suffix) if suffix.isdigit() else -1


def _csv_logs(run_dir: Path) -> list[Path]:
    """The CSV logs of `run_dir` in order, after those of the runs it continues in other directories."""
    # imported here: checkpoints imports lock, which imports this module
    from bamba_ft.jobs.checkpoints import resumed_from

    runs, seen = [run_dir], {run_dir.resolve()}
    while (source := resumed_from(runs[0])) is not None and source.is_dir() and source.resolve() not in seen:
        seen.add(source.resolve())
        runs.insert(0, source)
    return [path for run in runs for path in sorted(RunDir(run).csv_logs.glob("version_*/metrics.csv"), key=_version)]


def read_metrics_csv(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """{metric: [(step, value), ...]} from a run's CSV logs, in step order.

    A run resumed in its own directory logs into a new `version_N` beside the stopped process's; their steps go on
    where the checkpoint was, so the logs are read in turn, each replacing the points of the earlier ones from its
    first logged step on (the steps a resume from an older checkpoint trains again). A run resumed into a directory
    of its own is read after the run it resumed from (its run_config.yaml's trainer.resume), and that one after its
    own, so its curves start at step 0 as the uninterrupted run's would."""
    series: dict[str, list[tuple[int, float]]] = {}
    for path in _csv_logs(run_dir):
        with path.open() as f:
            rows = [(int(float(row.get("step") or 0)), row) for row in csv.DictReader(f)]
        if not rows:
            continue
        first = min(step for step, _ in rows)
        series = {key: [(s, v) for s, v in points if s < first] for key, points in series.items()}
        for step, row in rows:
            for key, value in row.items():
                if key in ("step", "epoch") or value in ("", None):
                    continue
                series.setdefault(key, []).append((step, float(value)))
    return {key: points for key, points in series.items() if points}


def plot_curves(run_dir: Path, out: Path) -> bool:
    """Loss (and learning rate) against step as a PNG; False when the run has no CSV log."""
    series = read_metrics_csv(run_dir)
    if "train/loss" not in series and "val/loss" not in series:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 if "lr-AdamW" in series else 1, figsize=(10 if "lr-AdamW" in series else 6, 4))
    ax = axes[0] if hasattr(axes, "__len__") else axes
    for key, style in (("train/loss", "-"), ("val/loss", "o-")):
        if key in series:
            steps, values = zip(*series[key])
            ax.plot(steps, values, style, label=key, markersize=4)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(run_dir.name)
    ax.grid(alpha=0.3)
    ax.legend()
    if hasattr(axes, "__len__"):
        steps, values = zip(*series["lr-AdamW"])
        axes[1].plot(steps, values)
        axes[1].set_xlabel("step")
        axes[1].set_ylabel("learning rate")
        axes[1].grid(alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out)
    return True


def table(rows: list[list[str]], header: list[str]) -> str:
    """A plain-text table with aligned columns."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*map(str, r)) for r in rows]
    return "\n".join(lines)
