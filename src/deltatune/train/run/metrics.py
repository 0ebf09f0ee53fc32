"""The metrics log (`metrics.jsonl`, one JSON object per line); plot.py draws it as `loss.png`.

A run killed while appending leaves a torn last line; reading skips lines that do not parse (a resumed
run rewrites the file without them), so a torn line never blocks `--resume` or the plot."""

from __future__ import annotations

import json
import os
import resource
import sys
from pathlib import Path

import torch

from ...io.atomic import atomic_write, write_error, write_text

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


def shown(metrics: dict) -> str:
    """Metrics as one line: `eval_loss 1.234, exact_match 50`."""
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
