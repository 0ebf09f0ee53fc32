"""The LoRA down-projection with its dropout fused in, as Triton kernels: hidden = dropout(x) @ A^T.

Why: the plain path draws a keep-mask (N, in) in memory, multiplies x by it into another (N, in) tensor,
then projects; backward draws the mask again (lora_ops.py). Here each tile of x is masked in registers as
it is loaded for the projection, the mask drawn by Triton's counter-based generator from (seed, element
offset), so neither the mask nor the masked input ever exists in memory, in forward or backward:

    forward   hidden = rescale * (x * keep) @ A^T                       (N, r)
    backward  grad_x = rescale * (grad_hidden @ A) * keep               (N, in)
              grad_A = rescale * grad_hidden^T @ (x * keep)             (r, in)

keep[i, j] = rand(seed, i * in + j) < P(keep), rescale = 1 / P(keep) (lora_common.keep_probability), so layers
handed one seed for one input (q/k/v, gate/up: call.share_dropout) draw one mask, as lora_ops shares them.
The formula is lora_reference.lora; `keep_mask` rebuilds a kernel's mask so tests hand the reference the
very mask (tests/test_fast_paths.py, on CPU through TRITON_INTERPRET=1).

Used by lora_ops.lora_linear ("lora_triton") on CUDA, with dropout, under autograd, when triton imports;
TRITON_INTERPRET=1 runs it on CPU tensors too (slow: for tests). The kernels live in lora_triton_kernels.py,
imported on first use, so importing this file needs no triton. Shapes: x (N, in), A (r, in), grad_hidden (N, r).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import weakref

import torch

from ..core.call import CallContext
from .lora_common import ReplaysAutocast, add_up_projection, autocast_state, keep_probability, new_mask_seed

BLOCK_ROWS, BLOCK_COLS = 64, 64


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def usable(x: torch.Tensor) -> bool:
    """Whether the fused kernels can run on x: triton installed and x on CUDA (or the interpreter is on)."""
    return (x.is_cuda or interpreting()) and importlib.util.find_spec("triton") is not None


@functools.cache
def kernels() -> dict:
    """The jitted kernels (methods/lora_triton_kernels.py), imported on first use: TRITON_INTERPRET is read when
    triton is first imported, so the mode is fixed for the process (tests/interpreted.py)."""
    from . import lora_triton_kernels

    return lora_triton_kernels.KERNELS


def _launch(name: str, grid: tuple, *args, rank: int) -> None:
    block_rank = max(16, 1 << (rank - 1).bit_length())  # tl.dot wants every side >= 16, a power of two
    kernels()[name][grid](*args, BM=BLOCK_ROWS, BK=BLOCK_COLS, BR=block_rank)


def _blocks(size: int, block: int) -> int:
    return -(-size // block)


def keep_mask(shape: tuple[int, int], dropout: float, seed: int, device: torch.device) -> torch.Tensor:
    """The uint8 0/1 keep-mask (N, in) the kernels draw from `seed` (tests hand it to the reference)."""
    out = torch.empty(shape, dtype=torch.uint8, device=device)
    grid = (_blocks(shape[0], BLOCK_ROWS), _blocks(shape[1], BLOCK_COLS))
    kernels()["mask"][grid](out, shape[0], shape[1], seed, keep_probability(dropout), BM=BLOCK_ROWS, BK=BLOCK_COLS)
    return out


def dropout_down(flat: torch.Tensor, lora_a: torch.Tensor, dropout: float, seed: int) -> torch.Tensor:
    """hidden = dropout(flat) @ lora_a^T, (N, r), the mask drawn from `seed` in the kernel."""
    flat, lora_a = flat.contiguous(), lora_a.contiguous()
    (rows, cols), rank = flat.shape, lora_a.shape[0]
    hidden = flat.new_empty(rows, rank)
    _launch("down", (_blocks(rows, BLOCK_ROWS),), flat, lora_a, hidden, rows, cols, rank, seed,
            keep_probability(dropout), 1 / keep_probability(dropout), rank=rank)
    return hidden


def dropout_down_backward(grad_hidden: torch.Tensor, flat: torch.Tensor, lora_a: torch.Tensor, dropout: float,
                          seed: int, need_x: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(grad_x (N, in) or None, grad_A (r, in)) of `dropout_down` for grad_hidden (N, r), the mask redrawn."""
    flat, lora_a = flat.contiguous(), lora_a.contiguous()
    grad_hidden = grad_hidden.to(flat.dtype).contiguous()  # autocast may have made it bf16; tl.dot wants one dtype
    (rows, cols), rank = flat.shape, lora_a.shape[0]
    p_keep = keep_probability(dropout)
    grad_a = torch.empty_like(lora_a)
    _launch("grad_a", (_blocks(cols, BLOCK_COLS),), grad_hidden, flat, grad_a, rows, cols, rank, seed, p_keep,
            1 / p_keep, rank=rank)
    grad_x = None
    if need_x:
        grad_x = torch.empty_like(flat)
        _launch("grad_x", (_blocks(rows, BLOCK_ROWS), _blocks(cols, BLOCK_COLS)), grad_hidden, lora_a, grad_x,
                rows, cols, rank, seed, p_keep, 1 / p_keep, rank=rank)
    return grad_x, grad_a


def shared_seed(x: torch.Tensor, dropout: float, call: CallContext) -> int:
    """The mask seed for input `x` in this call: one per input tensor when sibling layers share masks (as
    lora_ops.DropoutMasks does, by identity), a new one per layer otherwise."""
    if not call.share_dropout:
        return new_mask_seed()
    entry = call.memo.get("lora_triton_seed")
    if entry is not None and entry[0]() is x and entry[1] == dropout:
        return entry[2]
    seed = new_mask_seed()
    call.memo["lora_triton_seed"] = (weakref.ref(x), dropout, seed)
    return seed


class LoraTritonFunction(ReplaysAutocast):
    """out = base_out + scaling * dropout(x) @ A^T @ B^T with the fused down-projection; saves x, hidden, A, B
    and the seed (no mask, no masked input)."""

    @staticmethod
    def forward(ctx, base_out, x, lora_a, lora_b, scaling: float, dropout: float, seed: int):
        flat = x.reshape(-1, x.shape[-1])
        hidden = dropout_down(flat, lora_a, dropout, seed)
        out = add_up_projection(base_out, hidden, lora_b, scaling, False)
        ctx.save_for_backward(x, hidden, lora_a, lora_b)
        ctx.scaling, ctx.dropout, ctx.seed = scaling, dropout, seed
        ctx.autocast = autocast_state(x)
        return out

    @staticmethod
    def _backward(ctx, grad_out):
        x, hidden, lora_a, lora_b = ctx.saved_tensors
        grad_flat = grad_out.reshape(-1, grad_out.shape[-1])  # (N, out)
        grad_b = (grad_flat.t() @ hidden).mul_(ctx.scaling)  # (out, r)
        grad_hidden = (grad_flat @ lora_b).mul_(ctx.scaling)  # (N, r)
        grad_x, grad_a = dropout_down_backward(grad_hidden, x.reshape(-1, x.shape[-1]), lora_a, ctx.dropout,
                                               ctx.seed, ctx.needs_input_grad[1])
        return grad_out, None if grad_x is None else grad_x.view(x.shape), grad_a, grad_b, None, None, None


def fused_lora_linear(base_out: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                      scaling: float, dropout: float, call: CallContext) -> torch.Tensor:
    """lora_ops.lora_linear's "lora_triton" path (factors in x's dtype): LoraTritonFunction, the mask seed
    shared by the layers that read x in this call."""
    out = LoraTritonFunction.apply(base_out.to(x.dtype), x, lora_a, lora_b, scaling, dropout,
                                   shared_seed(x, dropout, call))
    return out.to(base_out.dtype)
