"""DoRA: Weight-Decomposed Low-Rank Adaptation (Liu et al. 2024, arXiv:2402.09353).

Update rule: W' = m * (W + s*B@A) / ||W + s*B@A||_c, the norm taken per output channel and treated as a
constant in backprop (paper section 4.3). Init rule: m = ||W||_c, so W' = W at start (B = 0).

Used by LoRA when `use_dora=True`. Weights here are "out-first": (out, ...) for linear and conv,
(embedding_dim, num_embeddings) for an embedding; LoraAdapter converts to and from the base's layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..core.call import CallContext
from .lora_ops import DropoutMasks, ReplaysAutocast, autocast_state, dropout_masks, dropped_projection


def channel_norm(weight: torch.Tensor) -> torch.Tensor:
    """L2 norm of each output channel of an out-first weight: (out,)."""
    return weight.flatten(1).norm(p=2, dim=1)


def magnitude_scale(magnitude: torch.Tensor, weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """m / ||W + delta||_c per output channel, (out,); the norm carries no gradient."""
    norm = channel_norm(weight + delta.detach()).detach()
    return magnitude.reshape(-1) / norm


def broadcast_channels(scale: torch.Tensor, out: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """Reshape (out,) so it multiplies the output-channel axis of `out`."""
    shape = [1] * out.dim()
    shape[channel_dim] = -1
    return scale.view(shape)


def base_without_bias(base: nn.Module, weight: torch.Tensor, base_out: torch.Tensor,
                      dropped: torch.Tensor | None, channel_dim: int) -> torch.Tensor:
    """W x without the bias: the base output minus its bias, or, when dropout changed the input, the
    base op recomputed on the dropped input (`weight` is out-first)."""
    if dropped is None:
        bias = getattr(base, "bias", None)
        return base_out if bias is None else base_out - broadcast_channels(bias, base_out, channel_dim)
    if weight.dim() > 2:  # the module's own conv: its padding mode (reflect, circular ...) too
        return base._conv_forward(dropped, weight, None)
    return F.linear(dropped, weight)


def dora_output(base_out: torch.Tensor, base_result: torch.Tensor, lora_result: torch.Tensor,
                scale: torch.Tensor, channel_dim: int, scaling: float,
                embedding: bool = False) -> torch.Tensor:
    """base_out + ((m/n - 1) * (W x) + (m/n) * BAx * s), where base_result = W x without the bias and
    lora_result = BAx unscaled; an embedding (no bias): (m/n) * base_out + (m/n) * BAx * s.

    Equivalent to the merged weight applied to x (plus the unchanged bias). The operations run in peft's
    order (peft/tuners/lora/dora.py, variants.py), so a file either library wrote gives the same float32
    outputs in both: float32 rounding of a differently ordered sum moves SmolLM2's logits (~30) by 5e-5."""
    scale = broadcast_channels(scale.to(base_out.dtype), base_out, channel_dim)
    lora_part = scale * lora_result * scaling
    if embedding:
        return scale * base_out + lora_part
    return base_out + ((scale - 1) * base_result + lora_part)


def module_output(adapter: nn.Module, base: nn.Module, base_out: torch.Tensor, lora_result: torch.Tensor,
                  dropped: torch.Tensor | None) -> torch.Tensor:
    """DoRA on the module path of a LoraAdapter (conv, embedding, an (in, out) or trainable weight):
    `lora_result` = B A x~ unscaled, `dropped` = x~ when dropout changed the input, else None."""
    weight = adapter._out_first(base.read_weight(copy=False))
    scale = magnitude_scale(adapter.lora_magnitude_vector, weight, adapter._delta_out_first())
    channel_dim = 1 if adapter.kind == "conv" else -1
    base_result = base_without_bias(base, weight, base_out, dropped, channel_dim)
    return dora_output(base_out, base_result, lora_result, scale, channel_dim, adapter.scaling,
                       embedding=adapter.kind == "embedding")


def merged(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor,
           plain: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The merged out-first weight (m/n) (W + delta), n = ||plain + delta||_c, and the norm n (needed to
    unmerge exactly). `plain` is the unmerged base weight the forward takes the norm of; it differs from
    `weight` when other adapters on the layer merged first (their update is rescaled, not renormed)."""
    combined = weight + delta
    norm = channel_norm(combined if plain is None else plain + delta)
    scale = (magnitude.reshape(-1).float() / norm).view(-1, *[1] * (weight.dim() - 1))
    return combined * scale, norm


def merged_bias(bias: torch.Tensor, plain_bias: torch.Tensor, magnitude: torch.Tensor,
                norm: torch.Tensor) -> torch.Tensor:
    """b0 + (m/n) (b - b0): the forward rescales the output so far minus the base bias b0, so what
    earlier adapters added to the bias (BitFit, IA3) is rescaled too."""
    return plain_bias + (magnitude.reshape(-1).float() / norm) * (bias - plain_bias)


def unmerged_bias(bias: torch.Tensor, plain_bias: torch.Tensor, magnitude: torch.Tensor,
                  norm: torch.Tensor) -> torch.Tensor:
    """Inverse of `merged_bias`."""
    return plain_bias + (norm / magnitude.reshape(-1).float()) * (bias - plain_bias)


def unmerged(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor,
             norm: torch.Tensor) -> torch.Tensor:
    """Inverse of `merged` given the norm it returned."""
    scale = (norm / magnitude.reshape(-1).float()).view(-1, *[1] * (weight.dim() - 1))
    return weight * scale - delta


@torch.no_grad()
def merged_adapter_weight(adapter: nn.Module, base: nn.Module, weight: torch.Tensor, reference: dict) -> torch.Tensor:
    """One DoRA adapter's (a LoraAdapter) merge on a layer where other adapters may have merged before
    it, as the forward composes: out = b0 + (m/n) (y - b0 + delta x), y the output so far,
    n = ||W0 + delta||_c of the plain base weight W0 = reference["weight"], b0 = reference["bias"]. So
    the weight so far becomes (m/n) (W + delta) and, when earlier adapters moved the bias (BitFit, IA3),
    the bias b becomes b0 + (m/n) (b - b0), written here. The norm (and b0) are kept for the unmerge.
    Weights are in the base's layout."""
    delta, magnitude = adapter._delta_out_first().float(), adapter.lora_magnitude_vector
    new, norm = merged(adapter._out_first(weight), delta, magnitude, adapter._out_first(reference["weight"]))
    bias, plain_bias = getattr(base, "bias", None), reference.get("bias")
    if bias is None or plain_bias is None or torch.equal(bias.detach().float(), plain_bias):
        plain_bias = None  # the bias is untouched
    else:
        bias.copy_(merged_bias(bias.detach().float(), plain_bias, magnitude, norm).to(bias.dtype))
    adapter._merge_state = (norm, plain_bias)
    return adapter._from_out_first(new)


@torch.no_grad()
def unmerged_adapter_weight(adapter: nn.Module, base: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """Inverse of `merged_adapter_weight` (restores the bias in place); the weight before the merge."""
    (norm, plain_bias), magnitude = adapter._merge_state, adapter.lora_magnitude_vector
    if plain_bias is not None:
        base.bias.copy_(unmerged_bias(base.bias.detach().float(), plain_bias, magnitude, norm).to(base.bias.dtype))
    delta = adapter._delta_out_first().float()
    return adapter._from_out_first(unmerged(adapter._out_first(weight), delta, magnitude, norm))


class DoraLinearFunction(ReplaysAutocast):
    """The linear DoRA branch as one autograd function, the same formula as `dora_output`:

        out = base_out + (m/n - 1) * W x~ + (m/n) * s B A x~,  x~ = dropout(x),  n = ||W + s B A||_c

    (W x~ is base_out minus its bias when nothing is dropped). It keeps x, the seed of the keep-mask it
    shares with sibling layers (lora_ops; backward draws the mask again), the (N, r) projection and one
    (N, out) tensor for m's gradient, where the module path keeps a float copy of the dropped input and
    two (N, out) tensors."""

    @staticmethod
    def forward(ctx, x, base_out, weight, bias, lora_a, lora_b, magnitude, scaling: float, dropout: float,
                masks: DropoutMasks):
        out_f = base_out.shape[-1]
        seed, dropped, rescale, hidden = dropped_projection(x, lora_a, dropout, masks)
        norm = channel_norm(weight + scaling * (lora_b.to(weight.dtype) @ lora_a.to(weight.dtype)))
        scale = magnitude.reshape(-1) / norm
        base_flat = base_out.reshape(-1, out_f)
        # out = base_out + (m/n - 1) W x~ + (m/n) s B A x~ = rest + (m/n) * combined, where
        # combined = W x~ + s B A x~ and rest = base_out - W x~ (the bias when nothing is dropped)
        if seed is not None:
            base_result = (dropped @ weight.t().to(dropped.dtype)).mul_(rescale)  # W x~
            rest = base_flat - base_result
        else:
            base_result, rest = (base_flat - bias, bias) if bias is not None else (base_flat, None)
        if base_result.dtype == hidden.dtype:
            combined = torch.addmm(base_result, hidden, lora_b.t(), alpha=scaling)
        else:  # autocast: keep the base part in its own precision
            combined = base_result + (hidden @ lora_b.t()).mul_(scaling)
        scale_out = scale.to(combined.dtype)
        out = combined * scale_out if rest is None else torch.addcmul(rest, combined, scale_out)
        ctx.save_for_backward(x, hidden, lora_a, lora_b, weight, norm, scale_out, combined)
        ctx.scaling, ctx.rescale, ctx.magnitude = scaling, rescale, (magnitude.shape, magnitude.dtype)
        ctx.mask, ctx.masks = (seed, dropout), masks
        ctx.autocast = autocast_state(x)
        return out.view(base_out.shape)

    @staticmethod
    def _backward(ctx, grad_out):
        x, hidden, lora_a, lora_b, weight, norm, scale, combined = ctx.saved_tensors
        keep, dropped = ctx.masks.in_backward(x, *ctx.mask)
        g = grad_out.reshape(-1, grad_out.shape[-1])  # (N, out)
        shape, dtype = ctx.magnitude
        grad_m = ((g * combined).sum(0) / norm).reshape(shape).to(dtype)
        g_lora = g * scale
        grad_b = (g_lora.t() @ hidden).mul_(ctx.scaling)
        grad_hidden = (g_lora @ lora_b).mul_(ctx.scaling * ctx.rescale)  # w.r.t. the un-rescaled projection
        grad_a = grad_hidden.t() @ dropped
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_hidden @ lora_a
            if keep is not None:  # x~ also feeds W x~
                grad_x = (grad_x + ((g * (scale - 1)) @ weight.to(g.dtype)).mul_(ctx.rescale)).mul_(keep)
            grad_x = grad_x.view(x.shape)
        grad_base = grad_out if keep is not None else g_lora.view(grad_out.shape)
        return grad_x, grad_base, None, None, grad_a, grad_b, grad_m, None, None, None


def linear_path(x: torch.Tensor, base_out: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                magnitude: torch.Tensor, dropout: float) -> str:
    """Which fast path `dora_linear` takes (names of lora_reference.FAST_PATHS)."""
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, base_out, lora_a, lora_b, magnitude))
    return "dora_no_grad" if dropout == 0 and not grad else "dora_autograd"


def dora_linear(x: torch.Tensor, base_out: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                lora_a: torch.Tensor, lora_b: torch.Tensor, magnitude: torch.Tensor, scaling: float,
                dropout: float, call: CallContext) -> torch.Tensor:
    """A linear layer's DoRA output (lora_reference.dora); `weight` (out, in) and `bias` are frozen, `call`
    this forward's context (its memo holds the dropout masks). Training goes through DoraLinearFunction (fused
    passes, little memory); a forward that needs no gradient and drops nothing runs `dora_output`, in peft's
    order of operations, so an adapter either library wrote gives the same float32 logits in both (the
    fused order moves SmolLM2's logits by up to 5e-5)."""
    lora_a, lora_b = lora_a.to(x.dtype), lora_b.to(x.dtype)
    if linear_path(x, base_out, lora_a, lora_b, magnitude, dropout) == "dora_no_grad":
        norm = channel_norm(weight + scaling * (lora_b.to(weight.dtype) @ lora_a.to(weight.dtype)))
        base_result = base_out if bias is None else base_out - bias
        lora_result = F.linear(F.linear(x, lora_a), lora_b).to(base_out.dtype)  # B A x, (..., out)
        scale = magnitude.reshape(-1) / norm
        return dora_output(base_out, base_result, lora_result, scale, -1, scaling).to(base_out.dtype)
    out = DoraLinearFunction.apply(x, base_out.to(x.dtype), weight.detach(), None if bias is None else bias.detach(),
                                   lora_a, lora_b, magnitude, scaling, dropout, dropout_masks(call))
    return out.to(base_out.dtype)
