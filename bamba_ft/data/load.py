"""Reading raw rows: local JSON/JSONL/Parquet/CSV files, saved dataset directories, Hub datasets."""

from __future__ import annotations

import json
from pathlib import Path

import datasets

from bamba_ft.errors import DataError

_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def _find_bad_json(path: Path) -> str | None:
    """'file:line: reason' for the first line (JSONL) or position (JSON) that does not parse."""
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            json.loads(text)
        except json.JSONDecodeError as e:
            return f"{path}:{e.lineno}:{e.colno}: {e.msg}"
        return None
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            return f"{path}:{n}: {e.msg} (column {e.colno})"
        if not isinstance(row, dict):
            return f"{path}:{n}: each line must be a JSON object, got {type(row).__name__}"
    return None


def load_rows(source: str, split: str, key: str) -> datasets.Dataset:
    """The rows of `source` (config key `key` names it in errors)."""
    path = Path(source).expanduser()
    if path.is_file():
        builder = _BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise DataError(
                f"{key}={source}: unsupported file type '{path.suffix}'. Use .jsonl, .json, .parquet or .csv."
            )
        if builder == "json":
            bad = _find_bad_json(path)  # datasets' own parser error does not name the line
            if bad:
                raise DataError(f"{key}: malformed JSON at {bad}.\nFix that line (each line one JSON object).")
        try:
            return datasets.load_dataset(builder, data_files=str(path), split="train")
        except Exception as e:  # pyarrow/json errors surface as many exception types
            raise DataError(f"{key}={source}: could not read the file: {e}") from e
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "state.json").exists() or (path / "dataset_dict.json").exists():
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise DataError(f"{key}={source}: no split '{split}'; it has {', '.join(loaded)}.")
                return loaded[split]
            return loaded
        return _load_hub_or_dir(str(path), split, key)
    if source.startswith((".", "/", "~")) or source.endswith(tuple(_BUILDERS)):
        raise DataError(f"{key}={source}: no such file or directory.")
    return _load_hub_or_dir(source, split, key)


def _load_hub_or_dir(source: str, split: str, key: str) -> datasets.Dataset:
    try:
        return datasets.load_dataset(source, split=split)
    except ValueError as e:
        if "split" in str(e).lower():
            raise DataError(f"{key}={source}: no split '{split}'. {e}") from e
        raise DataError(f"{key}={source}: {e}") from e
    except Exception as e:
        raise DataError(
            f"{key}={source}: not a local file or directory, and loading it from the Hugging Face Hub failed "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}).\n"
            "Fix: check the path, or download the dataset where the Hub is reachable and pass its local path."
        ) from e
