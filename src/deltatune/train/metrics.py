"""The metrics log (`metrics.jsonl`, one JSON object per line) and the loss curve (`loss.png`).

A run killed while appending leaves a torn last line; reading skips lines that do not parse (a resumed
run rewrites the file without them), so a torn line never blocks `--resume` or the plot."""

from __future__ import annotations

import json
import os
import resource
import sys
import warnings
from pathlib import Path

import torch

from ..io.atomic import atomic_write, write_error, write_text


PREDICTIONS = "predictions.jsonl"  # the final evaluation's answers, next to metrics.jsonl
EVAL_PREDICTIONS = "eval_predictions.jsonl"  # `deltatune eval`'s answers, next to its eval_metrics.json
EVAL_METRICS = "eval_metrics.json"


def peak_memory_mb() -> float:
    """Peak accelerator memory when training on CUDA, else the process's peak resident set size."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


class MetricsLog:
    """Appends records to `path`; on resume, drops records past the checkpoint's step."""

    def __init__(self, path: str | os.PathLike, resume_step: int | None = None) -> None:
        self.path = Path(path)
        if resume_step is None:
            self.path.unlink(missing_ok=True)
        elif self.path.exists():
            kept = [r for r in self.records() if r.get("step", 0) <= resume_step]
            text = "".join(json.dumps(r) + "\n" for r in kept)
            atomic_write(self.path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))

    def write(self, record: dict) -> None:
        try:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
        except OSError as err:
            raise write_error(self.path, err) from err

    def records(self) -> list[dict]:
        """Every record that parses, in order (a torn line from a killed run is skipped)."""
        if not self.path.exists():
            return []
        found = []
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                found.append(record)
        return found


def write_predictions(path: str | os.PathLike, rows: list[dict]) -> Path:
    """Write generated answers as JSON lines (evaluate.prediction_rows), replacing the file whole."""
    write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return Path(path)


def plot_loss(records: list[dict], path: str | os.PathLike) -> bool:
    """Draw training and eval loss against step; returns False (with a warning) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("matplotlib is not installed, so no loss.png: pip install matplotlib", stacklevel=2)
        return False
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    values = [v for _, v in train + evals]
    if values and min(values) > 0 and max(values) / min(values) > 20:
        ax.set_yscale("log")  # fine-tuning losses often fall by orders of magnitude
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean per token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return True
