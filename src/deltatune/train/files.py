"""Reading data files: JSON lines, JSON (a list of objects) and CSV, each row with its line number.

A path `deltatune:NAME` names a file bundled with the package (src/deltatune/data/NAME).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

BUNDLED_PREFIX = "deltatune:"
BUNDLED_DIR = Path(__file__).resolve().parent.parent / "data"
SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv"}


class DataError(ValueError):
    """A data file or row is wrong; the message starts with `file:line:`."""


@dataclass
class Row:
    """One record from a data file and where it came from."""

    data: dict
    file: str
    line: int

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


def resolve_data_path(path: str | Path) -> Path:
    """The file a data path names (bundled files by `deltatune:NAME`); a clear error if it is missing."""
    text = str(path)
    resolved = BUNDLED_DIR / text[len(BUNDLED_PREFIX) :] if text.startswith(BUNDLED_PREFIX) else Path(text)
    if not resolved.is_file():
        raise DataError(f"{text}: data file not found")
    return resolved


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


def read_rows(path: str | Path) -> list[Row]:
    """All records of a data file, in order.

    Args:
        path: a `.jsonl`/`.ndjson`, `.json` (an array of objects) or `.csv` file, or `deltatune:NAME`.

    Raises:
        DataError: the file is missing, unreadable, has an unknown suffix, holds a row that is not an
            object, or holds no rows at all.
    """
    resolved = resolve_data_path(path)
    kind = SUFFIXES.get(resolved.suffix.lower())
    if kind is None:
        raise DataError(f"{path}: unknown data file type {resolved.suffix!r}; use one of {sorted(SUFFIXES)}")
    try:
        text = resolved.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    rows = {"jsonl": _jsonl_rows, "json": _json_rows, "csv": _csv_rows}[kind](resolved, text)
    for row in rows:
        if not isinstance(row.data, dict):
            raise DataError(
                f"{row.where}: expected an object with named fields, got {type(row.data).__name__}"
            )
    if not rows:
        raise DataError(f"{path}: the data file has no rows")
    return rows
