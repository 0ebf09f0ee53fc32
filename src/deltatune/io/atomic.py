"""Every file deltatune writes goes to a temporary file in the same folder first and is then renamed
over the target, so a crash never leaves a half-written file where a good one was. A write that fails
raises WriteError naming the file, and says so when the disk is full.

mkstemp / mkdtemp create their files 0600 and folders 0700 (private while being written); what is renamed
into place gets the mode a plain open() / mkdir() would have given it (0666 / 0777 less the umask), so a
serving process under another user reads adapters and merged models as it reads any other file."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors.torch import save

from ..errors import WriteError  # noqa: F401  (re-exported)

# what atomic_write leaves behind when killed: .NAME.XXXXXXXX.tmp (mkstemp's 8 random characters)
TEMPORARY = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")
# how a full disk shows: errno, or the text torch (inline_container.cc) and safetensors (Rust) give
FULL_DISK_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
FULL_DISK_TEXTS = ("No space left", "StorageFull", "Disk quota exceeded", "unexpected pos")


def is_disk_full(err: BaseException) -> bool:
    return getattr(err, "errno", None) in FULL_DISK_ERRNOS or any(t in str(err) for t in FULL_DISK_TEXTS)


def write_error(path: str | os.PathLike, err: BaseException) -> WriteError:
    """The WriteError to raise for `err` while writing `path`."""
    detail = getattr(err, "strerror", None) or str(err).strip().splitlines()[0]
    why = f"the disk is full ({detail})" if is_disk_full(err) else detail
    error = WriteError(f"{path}: could not write it: {why}")
    error.errno = getattr(err, "errno", None) or (errno.ENOSPC if is_disk_full(err) else None)
    return error


def is_write_failure(err: BaseException) -> bool:
    """An OSError, or another library's error that wraps an I/O failure (a full disk)."""
    return isinstance(err, OSError) or is_disk_full(err)


def current_umask() -> int:
    """The process's umask, read without changing it where the OS shows it (Linux /proc/self/status);
    elsewhere set and restored at once, the only portable way."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def give_default_mode(path: str | os.PathLike) -> None:
    """Give a temporary file, or a temporary folder and everything in it, the modes open() / mkdir() give
    new ones: 0666 / 0777 less the umask. mkstemp makes files 0600, mkdtemp folders 0700, and other
    writers do the same (Transformers 5 writes model.safetensors 0600). Call it before the rename."""
    mask = current_umask()
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~mask)
    if os.path.isdir(path):
        for folder, dirs, files in os.walk(path):
            for name in dirs:
                os.chmod(os.path.join(folder, name), 0o777 & ~mask)
            for name in files:
                os.chmod(os.path.join(folder, name), 0o666 & ~mask)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call `write(tmp_path)`, fsync, then rename tmp_path to `path`.

    Raises:
        WriteError: the folder or the disk refused the write (nothing at `path` changed).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise write_error(path, err) from err
    os.close(fd)
    try:
        write(tmp)
        give_default_mode(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(err, Exception) and not isinstance(err, WriteError) and is_write_failure(err):
            raise write_error(path, err) from err
        raise


@contextlib.contextmanager
def atomic_folder(target: str | os.PathLike) -> Iterator[Path]:
    """Write a whole folder under a temporary name next to `target`, then rename it into place.

    Yields the new, empty temporary folder. When the block ends, its contents get the modes open() / mkdir()
    give (give_default_mode), what is at `target` (an earlier, incomplete attempt or an empty folder) is
    discarded, and the folder is renamed to `target`. On any error the temporary folder is deleted and
    `target` is left as it was, so a reader never trusts a half-written folder.

    Raises:
        WriteError: the folder or the disk refused the write (naming `target`).
    """
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    except OSError as err:
        raise write_error(target, err) from err
    try:
        yield tmp
        give_default_mode(tmp)  # mkdtemp's 0700 and other writers' 0600 would hide it from other users
        if target.exists():
            discard_folder(target)
        os.replace(tmp, target)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, Exception) and not isinstance(err, WriteError) and is_write_failure(err):
            raise write_error(target, err) from err
        raise


def discard_folder(path: str | os.PathLike) -> None:
    """Delete a folder; renamed to a hidden name first, so an interrupted delete leaves a temporary, never a
    half-deleted folder under its real name."""
    path = Path(path)
    doomed = path.with_name(f".{path.name}.deleting")
    shutil.rmtree(doomed, ignore_errors=True)
    path.rename(doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files an atomic_write killed part way left in `folder`; returns them.
    Call it only while no other process writes in `folder` (a training run holds its lock)."""
    removed = [p for p in Path(folder).iterdir() if p.is_file() and TEMPORARY.match(p.name)]
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


def json_text(data: dict) -> str:
    """The exact text write_json writes (sorted keys, so the same data gives the same bytes)."""
    return json.dumps(data, indent=2, sort_keys=True, default=str) + "\n"


def write_text(path: str | os.PathLike, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)

    atomic_write(path, write)


def write_json(path: str | os.PathLike, data: dict) -> None:
    write_text(path, json_text(data))


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            handle.write(data)

    atomic_write(path, write)


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """The safetensors file for `tensors`, in memory. Without `metadata` one header key, so the same tensors
    always give the same bytes (safetensors does not order several metadata keys); a format that needs its
    own header keys (diffusers' lora_adapter_metadata) passes them."""
    # clone: safetensors refuses tensors that share storage (tied weights, views)
    owned = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    return save(owned, metadata={"format": "pt", **(metadata or {})})
