"""The LoRA-family formulas in plain torch: the readable definitions every fast kernel is held to.

LoRA (Hu et al. 2021, arXiv:2106.09685):    out = base_out + op(dropout(x), s B A)
mixed batch:                                 row i goes through adapter index[i] alone (-1: the base model)
DoRA (Liu et al. 2024, arXiv:2402.09353):   out = base_out - op(x~, W) + m * op(x~, W + s B A) / ||W + s B A||_c
                                             x~ = dropout(x); the norm per output channel, a constant in
                                             backprop (paper section 4.3)

`op(input, weight)` is the base layer's operation without its bias on an out-first weight (F.linear, a
convolution with the base's stride/padding/dilation/padding mode, an embedding lookup of weight.T), so s B A is the
update in the same layout. DoRA keeps the base's bias as dora.py does: base_out - op(x~, W) is the bias
when nothing is dropped (out = b + m (W + s B A) x / n), and the part of the base output the dropped
input does not explain when something is (peft's formula). Dropout is an explicit keep-mask (0/1, the
input's shape) and the probability of keeping, so a test hands the reference the very mask a kernel drew.

Nothing here is fast or memory-lean; lora_ops.py, lora_triton.py, dora.py and lora.py are, and FAST_PATHS names each of
their implementations (tests/test_fast_paths.py must list a case for every name).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Op = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

FAST_PATHS = {  # name -> the formula here it implements, and where
    "lora_autograd": "lora: lora_ops.LoraLinearFunction (mask redrawn from its seed in backward)",
    "lora_autograd_in_place": "lora: LoraLinearFunction adding into the base output it was handed",
    "lora_no_grad": "lora: lora_ops.lora_linear without autograd",
    "lora_triton": "lora: lora_triton.LoraTritonFunction (dropout drawn inside the Triton down-projection)",
    "lora_no_grad_in_place": "lora: lora_ops.lora_linear without autograd, into the base output",
    "lora_module": "lora: LoraAdapter's module path (conv, embedding)",
    "mixed_gather": "mixed_lora: lora_ops.mixed_lora_linear, gathered factors and bmm",
    "mixed_dense": "mixed_lora: lora_ops.mixed_lora_linear, every adapter side by side, masked",
    "dora_autograd": "dora: dora.DoraLinearFunction (hand-written backward)",
    "dora_no_grad": "dora: dora.dora_linear without autograd or dropout (peft's order of operations)",
    "dora_module": "dora: LoraAdapter's module path (conv, embedding, (in, out) or trainable weight)",
}


def dropout(x: torch.Tensor, keep: torch.Tensor | None, p_keep: float = 1.0) -> torch.Tensor:
    """x * keep / p_keep (inverted dropout with the given mask); x itself when keep is None."""
    return x if keep is None else x * keep.to(x.dtype) / p_keep


def lora(x: torch.Tensor, base_out: torch.Tensor, op: Op, delta: torch.Tensor, keep: torch.Tensor | None = None,
         p_keep: float = 1.0) -> torch.Tensor:
    """base_out + op(dropout(x), delta), delta = s B A out-first (LoraAdapter._delta_out_first)."""
    return base_out + op(dropout(x, keep, p_keep), delta)


def mixed_lora(x: torch.Tensor, base_out: torch.Tensor, index: torch.Tensor, op: Op,
               deltas: list[torch.Tensor | None]) -> torch.Tensor:
    """Each row of the batch through its own adapter: row i gets deltas[index[i]]; -1 or None: base_out."""
    rows = []
    for row, slot in enumerate(index.tolist()):
        delta = deltas[slot] if slot >= 0 else None
        rows.append(base_out[row] if delta is None else lora(x[row:row + 1], base_out[row:row + 1], op, delta)[0])
    return torch.stack(rows)


def dora(x: torch.Tensor, base_out: torch.Tensor, op: Op, weight: torch.Tensor, delta: torch.Tensor,
         magnitude: torch.Tensor, keep: torch.Tensor | None = None, p_keep: float = 1.0,
         channel_dim: int = -1) -> torch.Tensor:
    """base_out - op(x~, W) + (m / n) op(x~, W + delta), n = ||W + delta|| per output channel (detached);
    `weight` W out-first, (out, ...); `channel_dim` the output-channel axis of base_out (1 for a conv)."""
    dropped = dropout(x, keep, p_keep)
    combined = weight + delta
    norm = combined.flatten(1).norm(dim=1).detach()
    shape = [1] * base_out.dim()
    shape[channel_dim] = -1
    scale = (magnitude.reshape(-1) / norm).view(shape)
    return base_out - op(dropped, weight) + scale * op(dropped, combined)
