"""Learning-rate schedules: linear warmup, then cosine, linear or constant."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """The multiplier on the base learning rate for optimizer step `step` (0-based).

    Warmup rises linearly from 1/(warmup+1) to 1; cosine and linear then decay to 0 at `total_steps`.
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"training.schedule={schedule!r}: must be cosine, linear or constant")


def make_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, schedule: str,
    method_factor: Callable[[int], float] | None = None,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR whose state (the step count) goes into checkpoints; `method_factor` (a method's own
    learning-rate shape, such as ReLoRA's re-warmup after each reset) multiplies the schedule."""
    def factor(step: int) -> float:
        shaped = lr_factor(step, total_steps, warmup_steps, schedule)
        return shaped * method_factor(step) if method_factor else shaped

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
