"""Stopping a run whose loss or gradient stops being a finite number.

A diverged step leaves NaN in the adapter, and every step after it trains on NaN; saving that as the
run's adapter (exit 0) is the failure this guards against. The check costs no extra device sync: the
loop already reads the step's loss back to the host for its log, and the gradient norm travels in the
same read (the clipping result when clipping is on, else one fused norm over the gradients).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ...errors import DivergenceError  # noqa: F401  (re-exported)
from .checkpoint import list_checkpoints


def gradient_norm(params: list[torch.Tensor], clipped: torch.Tensor | None) -> torch.Tensor:
    """The total gradient 2-norm as a 0-d tensor on the parameters' device (no host sync): the value
    clipping returned, else computed here. NaN or inf in any gradient makes it NaN or inf."""
    if clipped is not None:
        return clipped.detach()
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.nn.utils.get_total_norm(grads).detach()


def check_step(step: int, loss: float, grad_norm: float, skipped: bool, output_dir: Path, lr: float) -> None:
    """Raise DivergenceError when optimizer step `step` (1-based) had a non-finite loss or gradient.

    `skipped`: the fp16 loss scaler skipped this step for an overflow (its own recovery, not divergence).
    Nothing of the diverged step is written: the caller raises before logging, checkpointing or saving.
    """
    bad_loss = not math.isfinite(loss)
    bad_grad = not skipped and not math.isfinite(grad_norm)
    if not (bad_loss or bad_grad):
        return
    what = f"the loss is {loss}" if bad_loss else f"the gradient norm is {grad_norm} (loss {loss:.4g})"
    found = list_checkpoints(output_dir)
    kept = (
        f"the newest checkpoint, {found[-1]}, is kept: continue from it with --resume and a lower training.lr"
        if found
        else "no checkpoint was saved yet: start again with a lower training.lr"
    )
    raise DivergenceError(
        f"training diverged at step {step}: {what}; nothing from this step was saved and no adapter was "
        f"written; {kept} (now {lr:g})"
    )
