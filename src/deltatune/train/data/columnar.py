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

from ...errors import DataError
from .rows import Row, pick_split

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
