"""Reading raw rows: local JSON/JSONL/Parquet/CSV files, saved dataset directories, Hub datasets.

Every dataset returned carries its rows' 1-based positions in the source (column LINE or ROW), so that an
error after the train/validation shuffle still names the line a user can open in an editor.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import datasets
from huggingface_hub import constants, get_session

from bamba_ft.config.schema import DATA_SUFFIXES, looks_local, missing_path_problem
from bamba_ft.data.formats import FORMATS
from bamba_ft.errors import DataError, suggest

log = logging.getLogger("bamba_ft")

_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
LINE, ROW = "__line__", "__row__"  # file line (JSON, JSONL) | row number (CSV, Parquet, directories, Hub)
POSITIONS = (LINE, ROW)
# The fields of a row of any format: a JSON object holding one of them is a row, not rows listed under a key.
_ROW_FIELDS = {"conversations"} | {f for required, optional in FORMATS.values() for f in (*required, *optional)}


def locate(where: str, row: dict[str, Any]) -> str:
    """'data.source=x.jsonl, line 58' for a row read by `load_rows`."""
    return f"{where}, line {row[LINE]}" if LINE in row else f"{where}, row {row[ROW]}"


def number_rows(ds: datasets.Dataset) -> datasets.Dataset:
    return ds if ROW in ds.column_names else ds.add_column(ROW, list(range(1, len(ds) + 1)))


def _read_utf8(path: Path, where: str) -> str:
    """The file's text; a byte that is not UTF-8 is named by line and byte offset (datasets names neither)."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8").removeprefix("\ufeff")  # a byte order mark, as datasets' readers skip it
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - data.rfind(b"\n", 0, e.start)
        raise DataError(
            f"{where}, line {line}: not UTF-8 text: byte 0x{data[e.start]:02x} at byte offset {e.start} "
            f"(column {column}).\nFix: re-encode the file as UTF-8, e.g. "
            f"iconv -f latin1 -t utf-8 {path.name} > {path.stem}.utf8{path.suffix}"
        ) from None


def _array_lines(text: str, start: int = 0) -> list[int]:
    """The line on which each element of a (valid) JSON array starts: the first array from `start` on."""
    decoder, gap = json.JSONDecoder(), re.compile(r"[\s,]*")
    pos = text.index("[", start) + 1
    line, lines = 1 + text.count("\n", 0, pos), []
    while True:
        start = gap.match(text, pos).end()  # type: ignore[union-attr]  # the pattern matches the empty string
        if start >= len(text) or text[start] == "]":
            return lines
        line += text.count("\n", pos, start)
        lines.append(line)
        pos = decoder.raw_decode(text, start)[1]
        line += text.count("\n", start, pos)


def _member_start(text: str, name: str) -> int:
    """Where the value of key `name` starts in `text`, one (valid) JSON object: the last such key's, as json.loads
    keeps the last of a repeated key."""
    decoder, gap, colon = json.JSONDecoder(), re.compile(r"[\s,]*"), re.compile(r"\s*:\s*")
    pos, found = text.index("{") + 1, -1
    while True:
        pos = gap.match(text, pos).end()  # type: ignore[union-attr]  # the pattern matches the empty string
        if text[pos] == "}":
            return found
        member, pos = decoder.raw_decode(text, pos)
        pos = colon.match(text, pos).end()  # type: ignore[union-attr]
        if member == name:
            found = pos
        pos = decoder.raw_decode(text, pos)[1]


def _field_key(key: str) -> str:
    """The config key naming the field of the source that `key` names (data.field, data.val_field,
    data.sources[i].field)."""
    return "data.val_field" if key == "data.val_source" else f"{key.rpartition('.')[0]}.field"


def _kind(value: Any) -> str:
    return {dict: "a JSON object", list: "a JSON array", str: "a string", bool: "true or false",
            type(None): "null"}.get(type(value), "a number")


def _lists_of_rows(value: dict[str, Any]) -> dict[str, int]:
    """The keys of a JSON object whose value is a non-empty list of objects, with the list's length: where its rows
    are, when the object is not itself a row (it has no field of a row format)."""
    if _ROW_FIELDS & value.keys():
        return {}
    return {k: len(v) for k, v in value.items() if isinstance(v, list) and v and all(isinstance(r, dict) for r in v)}


def _to_jsonl(path: Path, name: str) -> str:
    """The command that writes the rows listed under key `name` of the JSON object in `path` as JSON Lines."""
    member = f".{name}" if re.fullmatch(r"[A-Za-z_]\w*", name, re.ASCII) else f".[{json.dumps(name)}]"
    return f"jq -c '{member}[]' {path.name} > {path.stem}.jsonl"


def _single_object(path: Path) -> Any:
    """The JSON object a file holds when it holds one, over many lines or alone on its only line; else None (JSON
    Lines, read no further than their second line; an array; no JSON)."""
    with path.open(encoding="utf-8-sig", errors="replace") as f:
        first = next((line for line in f if line.strip()), "")
        if not first.lstrip().startswith("{"):
            return None
        try:
            value = json.loads(first)
        except json.JSONDecodeError:
            first += f.read()
            try:
                return json.loads(first)
            except json.JSONDecodeError:
                return None  # the reader names the line that does not parse
        return None if any(line.strip() for line in f) else value


def _refuse_rows_under_a_key(path: Path, where: str, key: str) -> None:
    """A .json file holding one JSON object whose rows are listed under a key ({"version": 1, "data": [...]}) is
    named with the key and the fix; read as it is, it is one row whose fields fit no format, or not JSON Lines."""
    value = _single_object(path)
    lists = _lists_of_rows(value) if isinstance(value, dict) else {}
    if not lists:
        return
    keys = ", ".join(list(value)[:8]) + (", ..." if len(value) > 8 else "")
    name = max(lists, key=lists.__getitem__)
    if len(lists) == 1:
        held, which = f"its list of {lists[name]} rows is under key \"{name}\"", "them"
    else:
        held = "its lists of rows are under keys " + " and ".join(f'"{k}" ({n} rows)' for k, n in lists.items())
        which = f"those under \"{name}\" (or name another of these keys)"
    raise DataError(f"{where}: the file holds one JSON object (keys: {keys}) rather than rows: {held}.\nFix: set "
                    f"{_field_key(key)}={name} to read {which}, or convert the file to JSON Lines (one row a line): "
                    f"{_to_jsonl(path, name)}")


def _field_lines(path: Path, text: str, key: str, field: str) -> list[int]:
    """The line of each row of a .json file holding one JSON object whose list under key `field` holds its rows;
    a DataError naming the key (`_field_key`) and the fix where the file is not that."""
    given = f"{_field_key(key)}={field}"
    drop = f"Fix: drop {_field_key(key)}."
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":
            raise DataError(f"{given}: {path} holds more than one JSON value (the second at line {e.lineno}), as "
                            f"JSON Lines do, not one JSON object.\n{drop}") from None
        raise DataError(f"{key}: malformed JSON at {path}:{e.lineno}:{e.colno}: {e.msg}.\nFix the JSON there (the "
                        f"file is one JSON object, its rows the list under key \"{field}\").") from None
    if not isinstance(value, dict):
        raise DataError(f"{given}: {path} holds {_kind(value)}, not one JSON object whose rows are under a key.\n{drop}"
                        + (" A JSON array of rows is read as it is." if isinstance(value, list) else ""))
    if field not in value:
        lists = _lists_of_rows(value)
        hint = f" ({_field_key(key)}={max(lists, key=lists.__getitem__)})" if lists else ""
        raise DataError(f"{given}: {path} has no key \"{field}\"; its keys: {', '.join(value) or 'none'}."
                        f"{suggest(field, value)}\nFix: set {_field_key(key)} to the key of the list that holds the "
                        f"rows{hint}.")
    if not isinstance(value[field], list):
        raise DataError(f"{given}: the value under key \"{field}\" in {path} is {_kind(value[field])}, not a list of "
                        f"rows.\nFix: set {_field_key(key)} to the key of the list that holds the rows.")
    lines = _array_lines(text, _member_start(text, field))
    for n, row in zip(lines, value[field]):
        if not isinstance(row, dict):
            raise DataError(f"{key}: {path}:{n}: each element must be a JSON object, got {type(row).__name__}.")
    return lines


def _json_lines(path: Path, text: str, key: str, field: str | None = None) -> list[int]:
    """The line of each row; 'file:line: reason' for the first line (JSONL) or position (JSON) that does not parse.
    `field`: the key under which a .json file holding one JSON object lists its rows."""
    if field is not None:
        return _field_lines(path, text, key, field)
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{key}: malformed JSON at {path}:{e.lineno}:{e.colno}: {e.msg}.\nFix the JSON there "
                            "(the file is one JSON array of objects).") from None
        lines = _array_lines(text)
        for n, row in zip(lines, rows):
            if not isinstance(row, dict):
                raise DataError(f"{key}: {path}:{n}: each element must be a JSON object, got {type(row).__name__}.")
        return lines
    # split("\n") as the JSON reader does: splitlines() would also split at U+2028 inside strings.
    return list(_jsonl_row_lines(text.split("\n"), path, key))


def _jsonl_row_lines(lines: Iterable[str], path: Path, key: str) -> Iterator[int]:
    """The line number of each row of a JSONL file's `lines`; a DataError naming the first line that is not a JSON
    object."""
    fix = "Fix that line (each line one JSON object)."
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue  # datasets skips blank lines, so row i is the i-th non-blank line
        line = line.removesuffix("\n")  # a file read line by line keeps it: an error at the end would be column 1
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{key}: malformed JSON at {path}:{n}: {e.msg} (column {e.colno}).\n{fix}") from None
        if not isinstance(row, dict):
            raise DataError(f"{key}: malformed JSON at {path}:{n}: each line must be a JSON object, "
                            f"got {type(row).__name__}.\n{fix}")
        yield n


def _first_bad_json_line(path: Path, key: str) -> DataError | None:
    """The error for the first line of a JSONL file that is not a JSON object, read line by line (a streamed file
    may be larger than memory); None when every line parses."""
    with path.open(encoding="utf-8-sig", errors="replace", newline="\n") as f:
        try:
            for _ in _jsonl_row_lines(f, path, key):
                pass
        except DataError as e:
            return e
    return None


def stream_read_error(e: Exception, wheres: list[str]) -> DataError:
    """A reader error met while streaming sources (`wheres`: 'data.source=x.jsonl', ...). datasets' message names
    neither file nor line, so each local JSONL source is now read line by line for the first line that does not
    parse; otherwise the reader's message, with the sources named."""
    for where in wheres:
        key, _, source = where.partition("=")
        path = Path(source).expanduser()
        if path.is_file() and path.suffix.lower() == ".jsonl":
            found = _first_bad_json_line(path, key)
            if found is not None:
                return found
    return DataError(f"{', '.join(wheres)}: reading the stream failed: {type(e).__name__}: {_first_line(e)}\n"
                     "Fix: repair the row it names; data.streaming=false reads a file whole first and names the line "
                     "or row that does not parse.")


def _load_file(path: Path, source: str, key: str, field: str | None = None) -> datasets.Dataset:
    where = f"{key}={source}"
    builder = _BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise DataError(f"{where}: unsupported file type '{path.suffix}'. Use .jsonl, .json, .parquet or .csv.")
    empty = f"\nFix: point {key} at a file with {'validation' if key == 'data.val_source' else 'training'} rows."
    if path.stat().st_size == 0:
        raise DataError(f"{where}: the file is empty (0 bytes).{empty}")
    lines, text = None, None
    if builder in ("json", "csv"):
        text = _read_utf8(path, where)
        if not text.strip():
            raise DataError(f"{where}: the file is empty (only whitespace).{empty}")
        if builder == "json":
            if field is None and path.suffix.lower() == ".json":
                _refuse_rows_under_a_key(path, where, key)
            lines = _json_lines(path, text, key, field)
    if _no_rows(path, builder, text, lines):  # datasets' reader errors name no cause
        raise DataError(f"{where}: the file has no rows ({'a header only' if builder == 'csv' else 'no records'})."
                        f"{empty}")
    try:
        ds = datasets.load_dataset(builder, data_files=str(path), split="train", **_field_arg(field))
    except Exception as e:  # pyarrow/json errors surface as many exception types
        cause = e.__cause__ or e  # datasets wraps the reader's error in "An error occurred while generating ..."
        if builder == "csv" and (problem := _csv_problem(text or "", where, _first_line(cause))) is not None:
            raise problem from e
        raise DataError(f"{where}: could not read the file: {type(cause).__name__}: {_first_line(cause)}") from e
    if lines is not None and len(lines) == len(ds):
        return ds.add_column(LINE, lines)
    ds = number_rows(ds)
    if builder == "csv":
        _warn_line_breaks_in_fields(ds, where)
    return ds


_EXTRA_FIELDS_FIX = ('Fix: put each field that holds a comma in double quotes ("a, b"; a quote inside one is doubled: '
                     '""), or remove the extra fields from that line.')
_OPEN_QUOTE_FIX = 'Fix: close the quote; a quote inside a quoted field is doubled ("").'


def _csv_problem(text: str, where: str, message: str) -> DataError | None:
    """The CSV reader's (pandas') refusal of `text`, named by the file's line and with the fix: a line with more
    fields than the header (pandas counts records, so a quoted field over several lines moves its number off the
    file's), or a quote left open to the end of the file. None for other messages."""
    if more := re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", message):
        header: list[str] | None = None
        reader, start = csv.reader(io.StringIO(text, newline="")), 1
        for record in reader:
            if record and header is None:  # blank lines are skipped, as the reader does
                header, first = record, start
            elif header is not None and len(record) > len(header):
                columns = ", ".join(header[:8]) + (", ..." if len(header) > 8 else "")
                return DataError(f"{where}, line {start}: {len(record)} fields where the header (line {first}) has "
                                 f"{len(header)}: {columns}.\n{_EXTRA_FIELDS_FIX}")
            start = reader.line_num + 1
        expected, record_number, saw = more.groups()  # read otherwise than the reader did: its own count
        return DataError(f"{where}: record {record_number} (the header is record 1) has {saw} fields where the header "
                         f"has {expected}.\n{_EXTRA_FIELDS_FIX}")
    if "EOF inside string" in message:
        reader, start = csv.reader(io.StringIO(text, newline=""), strict=True), 1
        try:
            for _ in reader:
                start = reader.line_num + 1
        except csv.Error:
            return DataError(f"{where}, line {start}: the row that starts here opens a quoted field that is not closed "
                             f"before the end of the file.\n{_OPEN_QUOTE_FIX}")
        return DataError(f"{where}: a quoted field is not closed before the end of the file ({message}).\n"
                         f"{_OPEN_QUOTE_FIX}")
    return None


def _field_arg(field: str | None) -> dict[str, str]:
    """datasets' json loader reads the rows of a file holding one JSON object from the list under `field`."""
    return {} if field is None else {"field": field}


def _no_rows(path: Path, builder: str, text: str | None, lines: list[int] | None) -> bool:
    """Whether a readable file holds no rows: a JSON array `[]`, a CSV header alone, a Parquet file of 0 rows."""
    if builder == "json":
        return lines == []
    if builder == "csv":
        return len([line for line in (text or "").splitlines() if line.strip()]) <= 1
    try:
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows == 0
    except Exception:  # not Parquet after all: the reader names the problem
        return False


def _warn_line_breaks_in_fields(ds: datasets.Dataset, where: str) -> None:
    """A CSV quote left open swallows the following lines into one field, and the reader says nothing: name the
    rows whose text holds a line break (meant ones are fine, hence a warning)."""
    text = [c for c, f in ds.features.items() if getattr(f, "dtype", None) in ("string", "large_string")]
    rows = [r[ROW] for r in ds.select_columns([*text, ROW]) if any("\n" in (r[c] or "") for c in text)]
    if rows:
        log.warning("data warning: %s: %d row(s) hold a line break inside a quoted field (first: row %d). A quote "
                    "left open there takes the next lines into that field. Fix: close the quote; ignore this if the "
                    "line breaks are meant.", where, len(rows), rows[0])


def _saved(path: Path) -> bool:
    """A directory written by datasets' save_to_disk (read by load_from_disk, not load_dataset)."""
    return any((path / f).exists() for f in ("dataset_info.json", "state.json", "dataset_dict.json"))


def _config_key(key: str) -> str:
    """The config key naming the configuration of the source that `key` names (data.config, data.sources[i].config)."""
    return f"{key.rpartition('.')[0]}.config" if key.endswith(".source") else "data.config"


def local_cache_dir(path: Path) -> str:
    """A datasets cache directory of its own for the directory `path` as its files are now (names, sizes, times).

    datasets keys its cache of a directory whose README.md declares configurations on the directory's name and
    the configuration, not on the files: rows added to a file, or another directory of the same name, were read
    from the first load's cache without a word. Keyed on the files, an unchanged directory still loads from cache.
    """
    h = hashlib.sha256(str(path.resolve()).encode())
    for p in sorted(q for q in path.rglob("*") if q.is_file()):
        st = p.stat()
        h.update(f"\0{p.relative_to(path)}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return str(Path(datasets.config.HF_DATASETS_CACHE) / "bamba_ft_local" / h.hexdigest()[:16])


def load_repo(source: str, config: str | None, split: str, key: str,
              streaming: bool = False) -> datasets.Dataset | datasets.IterableDataset:
    """`datasets.load_dataset(source, config, split=, streaming=)`: how a Hub id is read, and a local dataset
    repository too (a directory of data files, its configurations declared in its README.md as on the Hub), so
    both take one code path. A missing or unknown configuration is named with the config key that picks one."""
    path = Path(source).expanduser()
    cache = {"cache_dir": local_cache_dir(path)} if path.is_dir() and not streaming else {}
    try:
        return datasets.load_dataset(source, config, split=split, streaming=streaming, **cache)
    except ValueError as e:
        if "config" not in str(e).lower():
            raise
        available = re.search(r"\[.*?\]", str(e))
        raise DataError(f"{key}={source}: {_first_line(e)} (configurations: {available.group(0) if available else '?'})"
                        f"\nFix: set {_config_key(key)} to one of its configurations.") from None


def _load_dir(path: Path, source: str, split: str, key: str, config: str | None) -> datasets.Dataset:
    where = f"{key}={source}"
    if not [p for p in path.iterdir() if not p.name.startswith(".")]:
        raise DataError(f"{where}: the directory is empty.\nFix: point {key} at a data file, or at a directory "
                        "of .jsonl/.json/.parquet/.csv files or one written by datasets' save_to_disk.")
    if _saved(path):
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise DataError(f"{where}: no split '{split}'; it has {', '.join(loaded)}.")
            loaded = loaded[split]
        return number_rows(loaded)
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in DATA_SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    kinds = sorted({p.suffix for p in files})
    if len(kinds) > 1:  # datasets reads the most common format of a directory and skips the others unannounced
        listed = ", ".join(f"{{source: {p}}}" for p in files[:4])
        raise DataError(f"{where}: the directory holds {' and '.join(kinds)} files; a directory is read as one "
                        "format, so the others would be left out without a word.\nFix: keep one format in it, or "
                        f"list the files in data.sources: 'data.sources=[{listed}{', ...' if len(files) > 4 else ''}]'.")
    try:
        return number_rows(load_repo(str(path), config, split, key))
    except DataError:
        raise
    except Exception as e:
        named = (f"\ndatasets names a directory's splits by its file names (train*, validation*/val*/dev*, test*), "
                 f"so its files here make no '{split}' split.") if "Unknown split" in str(e) else ""
        raise DataError(
            f"{where}: could not read the directory as a dataset ({type(e).__name__}: {_first_line(e)}).{named}\n"
            f"Fix: point {key} at one data file (and data.val_source at another), or keep only "
            ".jsonl/.json/.parquet/.csv files of the training data in the directory."
        ) from e


def _first_line(e: Exception) -> str:
    return str(e).splitlines()[0] if str(e) else ""


def _hub_unreachable() -> str | None:
    """Why the Hub cannot be reached, from one quick request; datasets itself retries for about 30 s."""
    try:
        get_session().head(constants.ENDPOINT, timeout=5)  # any HTTP answer, even an error status, will do
    except Exception as e:
        return f"{type(e).__name__}: {_first_line(e)}"
    return None


def _load_hub(source: str, split: str, key: str, config: str | None = None) -> datasets.Dataset:
    where = f"{key}={source}"
    offline = constants.HF_HUB_OFFLINE or datasets.config.HF_HUB_OFFLINE
    fix = "Fix: check the path; or download the dataset where the Hub is reachable and pass its local path."
    unreachable = None if offline else _hub_unreachable()
    if unreachable:
        raise DataError(
            f"{where}: not a local file or directory, and the Hugging Face Hub ({constants.ENDPOINT}) is "
            f"unreachable ({unreachable}).\n{fix}\n(HF_HUB_OFFLINE=1 reads a copy already in the datasets cache.)"
        )
    try:
        return number_rows(load_repo(source, config, split, key))
    except DataError:
        raise
    except ValueError as e:
        if "split" in str(e).lower():
            raise DataError(f"{where}: no split '{split}'. {e}") from e
        raise DataError(f"{where}: {e}") from e
    except Exception as e:
        state = ("HF_HUB_OFFLINE=1 is set and the datasets cache has no copy of it" if offline
                 else f"loading it from the Hugging Face Hub failed ({type(e).__name__}: {_first_line(e)})")
        raise DataError(f"{where}: not a local file or directory, and {state}.\n{fix}") from e


def column_names(rows: datasets.Dataset | datasets.IterableDataset) -> list[str]:
    """The columns of `rows`; a stream whose reader does not know them yet is asked for its first row."""
    if rows.column_names is not None:
        return list(rows.column_names)
    first = next(iter(rows.take(1)), None)
    return list(first) if first is not None else []


def rename_columns(rows: datasets.Dataset | datasets.IterableDataset, columns: dict[str, str],
                   key: str) -> datasets.Dataset | datasets.IterableDataset:
    """`columns` ({their: ours}) applied; a column the data lacks is named with the ones it has."""
    if not columns:
        return rows
    names = column_names(rows)
    missing = [c for c in columns if c not in names]
    if missing:
        have = ", ".join(c for c in names if c not in POSITIONS)
        raise DataError(f"{key}: no column {', '.join(missing)} to rename; the data has {have}.\n"
                        f"Fix: name existing columns in {key}.")
    clash = [ours for their, ours in columns.items() if ours in names and ours not in columns]
    if clash:
        raise DataError(f"{key}: renaming onto {', '.join(clash)}, which the data already has. "
                        f"Fix: rename that column too, or map another one.")
    return rows.rename_columns(dict(columns))


def mix_sources(parts: list[Any], weights: list[float | None], seed: int, stopping_strategy: str) -> Any:
    """Datasets (or streams) concatenated when no weights are given; else drawn by weight (seeded) until
    `stopping_strategy` (data.stopping_strategy) ends the mix."""
    if weights[0] is None:
        return datasets.concatenate_datasets(parts)
    total = sum(w or 0.0 for w in weights)
    return datasets.interleave_datasets(parts, probabilities=[(w or 0.0) / total for w in weights], seed=seed,
                                        stopping_strategy=stopping_strategy)


def load_rows(source: str, split: str, key: str, config: str | None = None,
              field: str | None = None) -> datasets.Dataset:
    """The rows of `source` (config key `key` names it in errors), numbered by their place in it. `field`: the key
    under which a .json file holding one JSON object lists its rows (data.field)."""
    path = Path(source).expanduser()
    if path.is_file() and key == "data.val_split":  # a file has one split: validation would be the training rows
        raise DataError(f"data.val_split={split}: data.source={source} is one file, which has no splits, so its "
                        "validation rows would be its training rows.\nFix: give the validation rows a file of their "
                        "own (data.val_source=...), or leave data.val_split unset to hold out data.val_fraction of "
                        "the file.")
    if path.is_file():
        return _load_file(path, source, key, field)
    if path.is_dir():
        return _load_dir(path, source, split, key, config)
    if looks_local(source):  # validate refuses it first; this is for callers that build their DataConfig
        raise DataError(missing_path_problem(key, source) or f"{key}={source}: not a readable file or directory.")
    return _load_hub(source, split, key, config)


def _number_stream(rows: datasets.IterableDataset) -> datasets.IterableDataset:
    """Each row's 1-based place in the stream (ROW); applied before any skip, so a resumed stream keeps them."""
    return rows.map(lambda row, i: {ROW: i + 1}, with_indices=True)


def load_stream(source: str, split: str, key: str, config: str | None = None,
                field: str | None = None) -> datasets.IterableDataset:
    """The rows of `source` read lazily (datasets' streaming mode), numbered by their place in it.

    A file is read by datasets' own reader, so a malformed line surfaces when the stream reaches it (with the
    reader's message); the eager checks of `load_rows` would read the whole file first. A .json file holding one
    JSON object is read whole, by datasets as by these checks: its rows under key `field` (data.field), or, without
    it, an error naming the key that holds them.
    """
    path = Path(source).expanduser()
    where = f"{key}={source}"
    if path.is_file():
        builder = _BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise DataError(f"{where}: unsupported file type '{path.suffix}'. Use .jsonl, .json, .parquet or .csv.")
        if path.stat().st_size == 0:
            raise DataError(f"{where}: the file is empty (0 bytes).\nFix: point {key} at a file with training rows.")
        if field is not None:
            _field_lines(path, _read_utf8(path, where), key, field)
        elif path.suffix.lower() == ".json":
            _refuse_rows_under_a_key(path, where, key)
        return _number_stream(datasets.load_dataset(builder, data_files=str(path), split="train", streaming=True,
                                                    **_field_arg(field)))
    if path.is_dir() and _saved(path):
        return _load_dir(path, source, split, key, config).to_iterable_dataset()  # numbered by _load_dir
    if path.is_dir():  # a dataset repository on disk: read as a Hub id is
        return _number_stream(load_repo(str(path), config, split, key, streaming=True))
    if looks_local(source):
        raise DataError(missing_path_problem(key, source) or f"{where}: not a readable file or directory.")
    offline = constants.HF_HUB_OFFLINE or datasets.config.HF_HUB_OFFLINE
    unreachable = None if offline else _hub_unreachable()
    if offline or unreachable:  # a stream reads the Hub as it goes; no cached copy can stand in for it
        why = "HF_HUB_OFFLINE=1 is set" if offline else f"the Hugging Face Hub is unreachable ({unreachable})"
        raise DataError(f"{where}: not a local file or directory, and {why}, so it cannot be streamed.\n"
                        "Fix: download the dataset where the Hub is reachable and pass its local path.")
    try:
        return _number_stream(load_repo(source, config, split, key, streaming=True))
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{where}: streaming it from the Hugging Face Hub failed ({type(e).__name__}: "
                        f"{_first_line(e)}).\nFix: check the id and data.split.") from e
