"""Reading data files: JSON lines, JSON (a list of objects) and CSV, each row with its line number;
Parquet, Arrow and `datasets` directories (`save_to_disk`) through the `datasets` library (columnar.py),
each row with its index.

A data path is one file, a list of paths, a glob (`data/*.parquet`), a folder (every data file under
it, by name) or a folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`. A path
`deltatune:NAME` names a file bundled with the package (src/deltatune/data/NAME).
JSON and CSV keep our own readers: they report the line a bad row is on, which `datasets` cannot.
"""

from __future__ import annotations

import csv
import glob
import json
from pathlib import Path

from ...errors import DataError  # noqa: F401  (re-exported)
from .columnar import read_saved_rows, read_table_rows
from .rows import Row, pick_split  # noqa: F401  (Row re-exported: every reader's record)

BUNDLED_PREFIX = "deltatune:"
BUNDLED_DIR = Path(__file__).resolve().parents[2] / "data"  # src/deltatune/data
SUFFIXES = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".arrow": "arrow",
}
# files `save_to_disk` writes: a Dataset folder holds state.json, a DatasetDict folder dataset_dict.json
SAVED_MARKERS = ("state.json", "dataset_dict.json")


def is_saved_dataset(path: Path) -> bool:
    """True for a folder written by `datasets`' `save_to_disk` (a Dataset or a DatasetDict)."""
    return path.is_dir() and any((path / marker).is_file() for marker in SAVED_MARKERS)


def resolve_data_path(path: str | Path) -> Path:
    """The file or folder a data path names (bundled files by `deltatune:NAME`); a clear error if it
    is missing."""
    text = str(path)
    resolved = BUNDLED_DIR / text[len(BUNDLED_PREFIX) :] if text.startswith(BUNDLED_PREFIX) else Path(text)
    if not (resolved.is_file() or resolved.is_dir()):
        raise DataError(f"{text}: data file not found")
    return resolved


def _folder_files(folder: Path) -> list[Path]:
    """Data files under `folder` by path; a `save_to_disk` folder inside counts as one entry (its
    state.json and shards are not data files of their own); hidden files and folders are skipped."""
    found = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if is_saved_dataset(entry):
            found.append(entry)
        elif entry.is_dir():
            found += _folder_files(entry)
        elif entry.suffix.lower() in SUFFIXES:
            found.append(entry)
    return found


def _split_files(folder: Path, split: str | None, splits: tuple[str, ...]) -> list[Path] | None:
    """The files of one split when a folder's file names follow the hub's split conventions
    (`data/train-00000-of-00001.parquet`, `test.jsonl`, `validation/` ...), as `datasets` infers them;
    None when they do not (every file is then read)."""
    from datasets.data_files import DataFilesDict, get_data_patterns

    try:
        patterns = {str(name): value for name, value in get_data_patterns(str(folder)).items()}
    except Exception:  # datasets' EmptyDatasetError and the like: no split layout to follow
        return None
    if list(patterns.values()) == [["**"]]:  # datasets' catch-all: no split names in the file names
        return None
    name = pick_split(list(patterns), split, splits, folder)
    files = DataFilesDict.from_patterns({name: patterns[name]}, base_path=str(folder))[name]
    return [Path(file) for file in files if Path(file).suffix.lower() in SUFFIXES]


def _folder_entries(folder: Path, split: str | None, splits: tuple[str, ...]) -> list[Path]:
    found = _split_files(folder, split, splits)
    if found is None:
        found = _folder_files(folder)
    if not found:
        raise DataError(f"{folder}: the folder holds no data files ({', '.join(sorted(SUFFIXES))})")
    return found


def data_paths(spec: str | Path | list, split: str | None = None, splits: tuple[str, ...] = ("train",)
               ) -> list[Path]:
    """Every file (or saved `datasets` folder) a data path names, in reading order.

    Args:
        spec: a path, a glob, a folder, `deltatune:NAME`, or a list of these.
        split, splits: which split a folder laid out in splits gives (see read_rows).

    Raises:
        DataError: a path that names nothing, a glob that matches nothing, an empty folder or list.
    """
    items = list(spec) if isinstance(spec, (list, tuple)) else [spec]
    if not items:
        raise DataError("the list of data files is empty")
    out: list[Path] = []
    for item in items:
        text = str(item)
        if any(c in text for c in "*?[") and not text.startswith(BUNDLED_PREFIX):
            matches = sorted(Path(p) for p in glob.glob(text, recursive=True))
            if not matches:
                where = Path(text).parent.absolute()
                raise DataError(f"{text}: no file matches this pattern (looked in {where})")
            for match in matches:
                plain_folder = match.is_dir() and not is_saved_dataset(match)
                out += _folder_entries(match, split, splits) if plain_folder else [match]
            continue
        resolved = resolve_data_path(text)
        if resolved.is_dir() and not is_saved_dataset(resolved):
            out += _folder_entries(resolved, split, splits)
        else:
            out.append(resolved)
    return out


def _jsonl_rows(path: Path, text: str) -> list[Row]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{number}: not valid JSON ({err.msg} at column {err.colno})") from None
        rows.append(Row(data, str(path), number))
    return rows


def _json_rows(path: Path, text: str) -> list[Row]:
    """Decode a JSON array element by element, so each row knows the line it starts on."""
    decoder = json.JSONDecoder()
    pos = len(text) - len(text.lstrip())
    if not text[pos : pos + 1] == "[":
        raise DataError(f"{path}:1: expected a JSON array of objects (or use .jsonl for JSON lines)")
    pos += 1
    rows = []
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text):
            raise DataError(f"{path}:{text.count(chr(10), 0, pos) + 1}: the JSON array is not closed")
        if text[pos] == "]":
            return rows
        line = text.count("\n", 0, pos) + 1
        try:
            data, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            raise DataError(
                f"{path}:{err.lineno}: not valid JSON ({err.msg} at column {err.colno})"
            ) from None
        rows.append(Row(data, str(path), line))


def _csv_rows(path: Path, text: str) -> list[Row]:
    reader = csv.DictReader(text.splitlines(keepends=True))
    if not reader.fieldnames:
        raise DataError(f"{path}:1: the CSV file has no header row")
    rows, start = [], 2
    for record in reader:
        if None in record:
            raise DataError(f"{path}:{start}: more values than the {len(reader.fieldnames)} header columns")
        missing = [k for k, v in record.items() if v is None]
        if missing:
            raise DataError(f"{path}:{start}: fewer values than header columns (missing {missing})")
        rows.append(Row(dict(record), str(path), start))
        start = reader.line_num + 1
    return rows


def _file_rows(resolved: Path, split: str | None, splits: tuple[str, ...]) -> list[Row]:
    if resolved.is_dir():  # a save_to_disk folder (data_paths passes no other folder)
        return read_saved_rows(resolved, split, splits)
    kind = SUFFIXES.get(resolved.suffix.lower())
    if kind is None:
        raise DataError(
            f"{resolved}: unknown data file type {resolved.suffix!r}; use one of {sorted(SUFFIXES)} "
            "or a folder written by save_to_disk"
        )
    if kind in ("parquet", "arrow"):
        return read_table_rows(resolved, kind)
    try:
        text = resolved.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"{resolved}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    return {"jsonl": _jsonl_rows, "json": _json_rows, "csv": _csv_rows}[kind](resolved, text)


def read_rows(
    path: str | Path | list, split: str | None = None, splits: tuple[str, ...] = ("train",)
) -> list[Row]:
    """All records of the data a path names, file after file, in order.

    Args:
        path: a `.jsonl`/`.ndjson`, `.json` (an array of objects), `.csv`, `.parquet` or `.arrow`
            file, a folder, a glob, a `save_to_disk` folder, `deltatune:NAME`, or a list of these.
        split: the split to read from a saved DatasetDict or a folder whose file names carry split
            names (`train-00000-of-00001.parquet`, `test.jsonl` ...): `data.split`.
        splits: the splits tried, in order, when `split` is None and there are several.

    Raises:
        DataError: a path names nothing, a file is unreadable or of an unknown type, a row is not an
            object, a DatasetDict's split is ambiguous or missing, or there are no rows at all.
    """
    rows = []
    for resolved in data_paths(path, split, splits):
        rows += _file_rows(resolved, split, splits)
    for row in rows:
        if not isinstance(row.data, dict):
            raise DataError(
                f"{row.where}: expected an object with named fields, got {type(row.data).__name__}"
            )
    if not rows:
        name = path if not isinstance(path, (list, tuple)) else ", ".join(map(str, path))
        raise DataError(f"{name}: the data file has no rows")
    return rows
