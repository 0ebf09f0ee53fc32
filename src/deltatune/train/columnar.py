"""Parquet files, Arrow files and `save_to_disk` folders, read through the `datasets` library.

Only `datasets`' own file builders (`parquet`, `arrow`) and `load_from_disk` are called, with explicit
file paths: a user's path is never passed where `datasets` would look for a loading script, so no code
from a data folder runs, and the library is held offline while it reads (nothing is downloaded).
Rows come back numbered by their index in the file (`ds[i]`), which error messages show as `row i`.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .files import DataError, Row

BUILDERS = {"parquet": "parquet", "arrow": "arrow"}  # our file kind -> datasets' packaged builder


@contextmanager
def offline_datasets():
    """`datasets` with network access off (HF_DATASETS_OFFLINE=1 and its already-read config flag)."""
    import datasets

    saved_env, saved_flag = os.environ.get("HF_DATASETS_OFFLINE"), datasets.config.HF_HUB_OFFLINE
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    datasets.config.HF_HUB_OFFLINE = True  # read once at import time, so the variable alone is not enough
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # a bar per file read would bury our own log lines
    try:
        yield datasets
    finally:
        if bars:
            datasets.enable_progress_bars()
        datasets.config.HF_HUB_OFFLINE = saved_flag
        if saved_env is None:
            os.environ.pop("HF_DATASETS_OFFLINE", None)
        else:
            os.environ["HF_DATASETS_OFFLINE"] = saved_env


def _rows(dataset, name: str) -> list[Row]:
    return [Row(record, name, index, unit="row") for index, record in enumerate(dataset.to_list())]


def read_table_rows(path: Path, kind: str) -> list[Row]:
    """Every row of one Parquet or Arrow (IPC stream or file) file.

    The builder's cache goes to a temporary folder and the table is kept in memory, so reading a
    file leaves nothing behind in the user's `datasets` cache.

    Raises:
        DataError: naming the file when `datasets` cannot read it.
    """
    with offline_datasets() as datasets, tempfile.TemporaryDirectory(prefix="deltatune-data-") as cache:
        try:
            dataset = datasets.load_dataset(
                BUILDERS[kind], data_files=[str(path)], split="train", cache_dir=cache, keep_in_memory=True
            )
        except Exception as err:  # pyarrow and datasets raise many kinds; all mean "cannot read this file"
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise DataError(f"{path}: not a readable {kind} file ({reason})") from None
        return _rows(dataset, str(path))


def pick_split(splits: list[str], wanted: str | None, preferred: tuple[str, ...], folder: Path) -> str:
    """The split of a saved DatasetDict to read: `wanted` (data.split), else the first of `preferred`
    that exists, else the only split.

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
        f"{folder}: a DatasetDict with splits {splits}; set data.split to one of them "
        f"(or point at the split's own folder, e.g. {folder / splits[0]})"
    )


def read_saved_rows(folder: Path, split: str | None, preferred: tuple[str, ...]) -> list[Row]:
    """Every row of a folder written by `save_to_disk`; a DatasetDict gives one split (pick_split).

    Raises:
        DataError: naming the folder when it cannot be read or the split cannot be chosen.
    """
    with offline_datasets() as datasets:
        try:
            loaded = datasets.load_from_disk(str(folder))
        except Exception as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise DataError(f"{folder}: not a readable datasets folder ({reason})") from None
        if isinstance(loaded, datasets.DatasetDict):
            name = pick_split(list(loaded), split, preferred, folder)
            return _rows(loaded[name], str(folder / name))
        return _rows(loaded, str(folder))
