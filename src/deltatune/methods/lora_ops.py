"""The LoRA linear branch as one autograd function: out = base_out + s * dropout(x) @ A^T @ B^T.

Why not plain modules: nn.Dropout keeps a float copy of the dropped input (4 bytes an element) for A's
gradient in every adapted layer. This keeps the input x itself (already alive for the other layers
that read it) plus a 1-byte keep-mask, and only rank-sized intermediates; the scaled up-projection is
folded into one addmm on the base output.

Shapes: x (..., in), base_out (..., out), A (r, in), B (out, r); N = prod(...) tokens.
"""

from __future__ import annotations

import torch


class LoraLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, base_out, lora_a, lora_b, scaling: float, dropout: float):
        flat = x.reshape(-1, x.shape[-1])  # (N, in)
        keep = torch.empty_like(flat, dtype=torch.bool).bernoulli_(1 - dropout) if dropout > 0 else None
        rescale = 1 / (1 - dropout)  # inverted dropout's factor, applied in rank space (N, r), not (N, in)
        hidden = (torch.where(keep, flat, 0) if keep is not None else flat) @ lora_a.t()  # (N, r)
        if keep is not None:
            hidden.mul_(rescale)
        out = torch.addmm(base_out.reshape(-1, base_out.shape[-1]), hidden, lora_b.t(), alpha=scaling)
        ctx.save_for_backward(x, keep, hidden, lora_a, lora_b)
        ctx.scaling, ctx.rescale = scaling, rescale
        # backward may run outside the autocast block (Hugging Face Trainer does): replay its state
        device = x.device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        return out.view(base_out.shape)

    @staticmethod
    def backward(ctx, grad_out):
        device, enabled, dtype = ctx.autocast
        with torch.autocast(device, dtype=dtype, enabled=enabled):
            return LoraLinearFunction._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out):
        x, keep, hidden, lora_a, lora_b = ctx.saved_tensors
        grad_flat = grad_out.reshape(-1, grad_out.shape[-1])  # (N, out)
        grad_b = (grad_flat.t() @ hidden).mul_(ctx.scaling)  # (out, r)
        # gradient w.r.t. the dropped, un-rescaled input's projection: s * (1/(1-p)) * g @ B, (N, r)
        grad_hidden = (grad_flat @ lora_b).mul_(ctx.scaling * (ctx.rescale if keep is not None else 1.0))
        flat = x.reshape(-1, x.shape[-1])
        grad_a = grad_hidden.t() @ (torch.where(keep, flat, 0) if keep is not None else flat)  # (r, in)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_hidden @ lora_a  # (N, in)
            if keep is not None:
                grad_x = torch.where(keep, grad_x, 0)
            grad_x = grad_x.view(x.shape)
        return grad_x, grad_out, grad_a, grad_b, None, None


def lora_linear(x: torch.Tensor, base_out: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                scaling: float, dropout: float) -> torch.Tensor:
    """base_out + scaling * dropout(x) @ lora_a.T @ lora_b.T, in the activation dtype."""
    lora_a, lora_b = lora_a.to(x.dtype), lora_b.to(x.dtype)
    return LoraLinearFunction.apply(x, base_out.to(x.dtype), lora_a, lora_b, scaling, dropout).to(base_out.dtype)


def mixed_lora_linear(factors: list, x: torch.Tensor, base_out: torch.Tensor,
                      index: torch.Tensor) -> torch.Tensor:
    """One LoRA per sample: `factors[slot]` is (A, B, scaling) or None, `index` (batch,) a slot per sample
    (-1: the base model). Factors are stacked (ranks zero-padded, scaling folded into B) and gathered per
    sample, so the whole batch takes two bmm calls and no loop over samples."""
    present = [f for f in factors if f is not None]
    ref = present[0][0]
    r_max = max(a.shape[0] for a, _, _ in present)
    in_f, out_f = ref.shape[1], present[0][1].shape[0]
    a_stack = ref.new_zeros(len(factors) + 1, r_max, in_f)  # last slot: base model (zeros)
    b_stack = ref.new_zeros(len(factors) + 1, out_f, r_max)
    for slot, found in enumerate(factors):
        if found is not None:
            a, b, scaling = found
            a_stack[slot, : a.shape[0]] = a
            b_stack[slot, :, : a.shape[0]] = b * scaling
    slots = torch.where(index < 0, len(factors), index)
    flat = x.reshape(x.shape[0], -1, in_f).to(ref.dtype)  # (batch, tokens, in)
    hidden = torch.bmm(flat, a_stack[slots].transpose(1, 2))  # (batch, tokens, r_max)
    delta = torch.bmm(hidden, b_stack[slots].transpose(1, 2))  # (batch, tokens, out)
    return base_out + delta.reshape(base_out.shape).to(base_out.dtype)
