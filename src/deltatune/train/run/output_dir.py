"""The output folder of a training run: checked before the model loads, locked while a run writes in it.

- A new run refuses a folder that already holds files, naming them, unless it continues the earlier
  run (`resume`) or replaces it (`overwrite`: the earlier run's files go, any other file stays).
- One run per folder: the main process holds an OS lock (`flock`) on `OUTPUT_DIR/.deltatune.lock`
  for the whole run. The OS drops the lock when the process ends, however it ends, so a run killed
  with SIGKILL never blocks the `--resume` that follows it.
- The folder must be writable: probed by writing the lock file, before any long work.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ...core.config import DeltaConfigError
from ...io.atomic import remove_stale_temporaries
from .checkpoint import CHECKPOINTS, checkpoint_folders, list_checkpoints, remove_checkpoint_temporaries

LOCK_NAME = ".deltatune.lock"
# what a run writes at the top of its folder; `overwrite` removes exactly these
RUN_FILES = (
    "adapter_config.json",
    "adapter_model.safetensors",
    "metrics.jsonl",
    "predictions.jsonl",
    "eval_metrics.json",  # from `deltatune eval` on an earlier adapter here
    "eval_predictions.jsonl",
    "loss.png",
    "run_config.yaml",
    "chat_template.jinja",  # written when data.chat_template chose the template
    "deltatune_prompt.json",  # the template and shared system prompt generate uses (run_generate.py)
    CHECKPOINTS,
    "tensorboard",  # training.report_to's local files (trackers.py)
    "mlruns",
    "wandb",
)


def is_main_rank() -> bool:
    """Rank 0 under torchrun / accelerate launch (both set RANK), or a single process."""
    return int(os.environ.get("RANK", "0")) == 0


@contextmanager
def claim_output_dir(path: str | os.PathLike, resume: bool, overwrite: bool) -> Iterator[Path]:
    """Check `path` can take this run and hold its lock until the block ends.

    Raises:
        DeltaConfigError: `path` is a file, is not writable, is in use by another run, or already holds
            files while neither `resume` nor `overwrite` is set (the message lists them).
    """
    out = Path(path)
    if resume and overwrite:
        raise DeltaConfigError("--resume continues the run in output_dir and --overwrite replaces it; "
                               "pass one")
    if out.exists() and not out.is_dir():
        raise DeltaConfigError(f"output_dir={out}: is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        handle = open(out / LOCK_NAME, "a+", encoding="utf-8")
        probe_fd, probe = tempfile.mkstemp(prefix=".write-probe.", dir=out)  # the folder itself takes files
        os.close(probe_fd)
        os.unlink(probe)
    except OSError as err:
        raise DeltaConfigError(f"output_dir={out}: not writable ({err.strerror or err})") from None
    windows_lock = None
    try:
        windows_lock = _lock(handle, out)
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        present = sorted(p.name for p in out.iterdir() if p.name != LOCK_NAME)
        if present and not (resume or overwrite):
            raise DeltaConfigError(
                f"output_dir={out} is not empty: it holds {describe(out, present)}; pass --resume to "
                "continue that run, --overwrite to replace it, or choose another output_dir"
            )
        # an earlier run killed while writing leaves temporaries; safe to remove now that we hold the lock
        remove_stale_temporaries(out)
        remove_checkpoint_temporaries(out)
        yield out
    finally:
        handle.close()  # closing the file releases the lock
        if windows_lock is not None:
            windows_lock.release()


def clear_previous_run(out: Path) -> None:
    """Remove the files an earlier run wrote in `out` (its adapter, metrics, plot and checkpoints)."""
    for name in RUN_FILES:
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


def describe(out: Path, names: list[str]) -> str:
    """A short account of what a folder holds, e.g. 'a trained adapter, 2 checkpoints, metrics.jsonl'."""
    parts = []
    if "adapter_model.safetensors" in names:
        parts.append("a trained adapter (adapter_model.safetensors)")
    if (out / CHECKPOINTS).is_dir():  # counted as --resume counts them: complete ones only
        complete, folders = list_checkpoints(out), checkpoint_folders(out)
        newest = f" (newest {complete[-1].name})" if complete else ""
        broken = len(folders) - len(complete)
        parts.append(f"{len(complete)} checkpoint(s) in {CHECKPOINTS}/{newest}"
                     + (f" and {broken} incomplete one(s)" if broken else ""))
    shown = [n for n in names if n not in ("adapter_model.safetensors", CHECKPOINTS)]
    parts.extend(shown[:5])
    if len(shown) > 5:
        parts.append(f"{len(shown) - 5} more")
    return ", ".join(parts)


def _lock(handle, out: Path):
    """Take the run lock on `handle`; returns a lock to release on platforms without flock, else None."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock; filelock (a Transformers dependency) locks a sibling file
        from filelock import FileLock, Timeout

        lock = FileLock(str(out / (LOCK_NAME + ".win")))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            raise DeltaConfigError(f"output_dir={out}: another run is writing in it") from None
        return lock
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip()
        raise DeltaConfigError(
            f"output_dir={out}: another run{f' (pid {holder})' if holder else ''} is writing in it; wait for "
            "it to end or choose another output_dir"
        ) from None
    return None
