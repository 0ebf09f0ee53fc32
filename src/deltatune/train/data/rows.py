"""One record read from a data file, and which split of a folder a reader takes: shared by the text
readers (files.py) and the table readers (columnar.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ...errors import DataError


@dataclass
class Row:
    """One record from a data file and where it came from."""

    data: dict
    file: str
    line: int  # the line a text file's row starts on; the 0-based row index (`ds[i]`) in a table
    unit: str = "line"  # "line" or "row"

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}" if self.unit == "line" else f"{self.file}:row {self.line}"


def pick_split(splits: list[str], wanted: str | None, preferred: tuple[str, ...], folder: Path) -> str:
    """The split to read from a folder that holds several: `wanted` (data.split), else the first of
    `preferred` that exists, else the only split.

    Raises:
        DataError: `wanted` is not a split, or the choice is ambiguous (the message lists the splits).
    """
    if wanted is not None:
        if wanted not in splits:
            raise DataError(f"{folder}: data.split={wanted!r} is not a split here; the splits are {splits}")
        return wanted
    for name in preferred:
        if name in splits:
            return name
    if len(splits) == 1:
        return splits[0]
    raise DataError(
        f"{folder}: holds the splits {splits}; set data.split to one of them "
        "(or name one split's files or folder directly)"
    )
