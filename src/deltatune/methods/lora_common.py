"""What the LoRA autograd paths share (lora_ops.py, lora_triton.py): the dropout keep probability and mask
seeds, replaying the forward's autocast state in backward, and the scaled up-projection added into the base
output. Shapes: base_out (..., out), hidden (N, r), B (out, r)."""

from __future__ import annotations

import torch

KEEP_LEVELS = 2**16  # a mask entry is a 16-bit uniform compared with a threshold


def keep_threshold(dropout: float) -> int:
    """Entries whose 16-bit uniform is below this are kept; P(keep) = threshold / 2^16."""
    return max(1, round((1 - dropout) * KEEP_LEVELS))


def keep_probability(dropout: float) -> float:
    """P(keep) of a mask drawn by lora_ops.draw_keep_mask or lora_triton: kept inputs are divided by it."""
    return keep_threshold(dropout) / KEEP_LEVELS


def new_mask_seed() -> int:
    """A seed for one dropout mask from the global CPU generator (torch.manual_seed, checkpoints replay it)."""
    return int(torch.randint(0, 2**62, (), dtype=torch.int64))


def autocast_state(x: torch.Tensor) -> tuple:
    """The forward's autocast state: backward may run outside the autocast block (HF Trainer), so it replays it."""
    device = x.device.type
    return device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)


def replay_autocast(state: tuple):
    device, enabled, dtype = state
    return torch.autocast(device, dtype=dtype, enabled=enabled)


class ReplaysAutocast(torch.autograd.Function):
    """Backward runs `_backward` under the autocast state forward kept in `ctx.autocast`."""

    @classmethod
    def backward(cls, ctx, grad_out):
        with replay_autocast(ctx.autocast):
            return cls._backward(ctx, grad_out)


def add_up_projection(base_out: torch.Tensor, hidden: torch.Tensor, lora_b: torch.Tensor, scaling: float,
                      inplace: bool) -> torch.Tensor:
    """base_out + scaling * hidden @ B^T shaped as base_out; into base_out itself when `inplace` (in_place)."""
    flat = base_out.reshape(-1, base_out.shape[-1])
    if inplace:
        flat.addmm_(hidden, lora_b.t(), alpha=scaling)
        return base_out
    return torch.addmm(flat, hidden, lora_b.t(), alpha=scaling).view(base_out.shape)
