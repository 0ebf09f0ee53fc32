"""The LoRA linear branch as one autograd function: out = base_out + s * dropout(x) @ A^T @ B^T.

Why not plain modules: nn.Dropout keeps a float copy of the dropped input (4 bytes an element) for A's
gradient in every adapted layer. This keeps the input x itself (already alive for the other layers
that read it) plus the seed its dropout mask was drawn from (backward draws the mask again), and only
rank-sized intermediates; the scaled up-projection is folded into one addmm on the base output. The
plain formulas are in lora_reference.py; tests/test_fast_paths.py holds every fast path here to them.

Dropout masks: drawing them is most of dropout's cost on a CPU (a Bernoulli draw per input element costs
about ten times the rank-16 matmul it feeds), so
- by default (`call.share_dropout`, DeltaModel.share_dropout_masks) layers that read the same input tensor
  in one call (q/k/v of one attention block, gate/up of one MLP) share one mask and one masked input, drawn
  for the first of them: each branch still sees dropout p, like one `nn.Dropout` placed before a fused
  down-projection of the siblings. share_dropout=False draws an independent mask per layer, as peft does;
- a mask is 16-bit uniforms compared with round((1 - p) * 2^16), four per 64-bit draw, and the
  rescale is 2^16 / that threshold, so the kept inputs are scaled by exactly 1 / P(keep);
- masks are uint8 0/1 and applied by multiplication (about five times faster than torch.where on a CPU);
- a call's masks live in its memo (`DropoutMasks`), never in globals or tensor attributes.

Shapes: x (..., in), base_out (..., out), A (r, in), B (out, r); N = prod(...) tokens.
"""

from __future__ import annotations

import math
import weakref

import torch
import torch.nn.functional as F

from ..core.call import CallContext
from . import lora_triton
from .lora_common import (  # noqa: F401  (also read from here by dora.py and the tests)
    KEEP_LEVELS,
    ReplaysAutocast,
    add_up_projection,
    autocast_state,
    keep_probability,
    keep_threshold,
    new_mask_seed,
    replay_autocast,
)


def draw_keep_mask(shape: torch.Size, dropout: float, device: torch.device, seed: int) -> torch.Tensor:
    """Keep-mask of `shape` as uint8 0/1 (P(keep) = keep_probability(dropout) per entry, independent), a
    function of `seed`: forward draws it, backward draws it again instead of storing it. A kernel's mask for
    input x is draw_keep_mask((N, in), p, x.device, new_mask_seed()) drawn when it met x (tests rebuild it so).
    uint8, not bool: a float tensor times a uint8 mask runs faster on a CPU than torch.where on a bool mask."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    count = math.prod(shape)
    # random_ over the whole int64 range fills all 64 bits: four uniform (signed) 16-bit chunks per draw
    draws = torch.empty(-(-count // 4), dtype=torch.int64, device=device)
    draws.random_(-(2**63), None, generator=generator)
    chunks = draws.view(torch.int16)[:count]  # uniform over [-2^15, 2^15)
    return (chunks < keep_threshold(dropout) - KEEP_LEVELS // 2).view(torch.uint8).view(shape)


class DropoutMasks:
    """One call's dropout masks (in `call.memo`, see `dropout_masks`); at most one masked input alive per call
    (a new draw, forward or backward, drops the previous one first). forward: (weakref to the input, key,
    seed, masked flat input) of the last input met; backward: (key, keep-mask, masked flat input) of the last
    mask drawn again. The autograd functions keep this object and the seed, so backward draws a mask once for
    all the siblings that shared it (they run back to back). Nothing is kept when not shared."""

    def __init__(self, share: bool) -> None:
        self.share = share
        self.forward: tuple | None = None
        self.backward: tuple | None = None

    def dropped(self, x: torch.Tensor, flat: torch.Tensor, dropout: float) -> tuple[int, torch.Tensor]:
        """(mask seed, masked flat input) for `x`: when shared, drawn once per input tensor object (by identity,
        no private version counter: an input changed in place between two readers would give the second the
        first's masked input; under autograd, x is saved for backward, so autograd refuses that step). No-grad
        forwards share too: a reentrant checkpoint's no-grad forward must draw what its recompute draws."""
        key = (dropout, x.shape, x.dtype, x.device)
        entry = self.forward
        if entry is not None and entry[0]() is x and entry[1] == key:
            return entry[2], entry[3]
        seed = new_mask_seed()
        self.forward = self.backward = None  # free the previous masked input before making this one
        masked = flat * draw_keep_mask(flat.shape, dropout, flat.device, seed)
        if self.share:
            self.forward = (weakref.ref(x), key, seed, masked)
        return seed, masked

    def in_backward(self, x: torch.Tensor, seed: int | None, dropout: float) -> tuple:
        """(keep-mask or None, masked flat input (N, in)) in backward: the forward's mask drawn again from its
        seed, once for the sibling layers that shared it (a seed belongs to one input tensor)."""
        flat = x.reshape(-1, x.shape[-1])
        if seed is None:
            return None, flat
        key = (seed, dropout, flat.shape, flat.dtype, flat.device)
        entry = self.backward
        if entry is None or entry[0] != key:
            self.forward = self.backward = None
            keep = draw_keep_mask(flat.shape, dropout, flat.device, seed)
            entry = (key, keep, flat * keep)
            if self.share:
                self.backward = entry
        return entry[1], entry[2]


def dropout_masks(call: CallContext) -> DropoutMasks:
    """This call's DropoutMasks, made on first use (one dict lookup per adapted layer afterwards)."""
    masks = call.memo.get("lora_dropout")
    if masks is None:
        masks = call.memo["lora_dropout"] = DropoutMasks(call.share_dropout)
    return masks


def dropped_projection(x: torch.Tensor, lora_a: torch.Tensor, dropout: float, masks: DropoutMasks) -> tuple:
    """(mask seed or None, dropped flat input (N, in), rescale 1 / P(keep), hidden = dropout(x) @ A^T (N, r)).
    The rescale is applied to `hidden`, in rank space, not to the (N, in) input."""
    flat = x.reshape(-1, x.shape[-1])
    if dropout <= 0:
        return None, flat, 1.0, flat @ lora_a.t()
    seed, dropped = masks.dropped(x, flat, dropout)
    rescale = 1 / keep_probability(dropout)
    return seed, dropped, rescale, (dropped @ lora_a.t()).mul_(rescale)


class LoraLinearFunction(ReplaysAutocast):
    """base_out comes first: when it is added into in place (mark_dirty) and is a view (nn.Linear's output
    for a 3-D input when it has a bias), autograd rebases the view's history through this function taking
    its first input as the changed tensor, as for torch's own in-place ops; in another position the
    gradients come out wrong."""

    @staticmethod
    def forward(ctx, base_out, x, lora_a, lora_b, scaling: float, dropout: float, inplace: bool,
                masks: DropoutMasks):
        seed, _, rescale, hidden = dropped_projection(x, lora_a, dropout, masks)
        out = add_up_projection(base_out, hidden, lora_b, scaling, inplace)
        ctx.save_for_backward(x, hidden, lora_a, lora_b)
        ctx.scaling, ctx.rescale, ctx.mask, ctx.masks = scaling, rescale, (seed, dropout), masks
        ctx.autocast = autocast_state(x)
        if inplace:
            ctx.mark_dirty(base_out)
        return out

    @staticmethod
    def _backward(ctx, grad_out):
        x, hidden, lora_a, lora_b = ctx.saved_tensors
        keep, dropped = ctx.masks.in_backward(x, *ctx.mask)
        grad_flat = grad_out.reshape(-1, grad_out.shape[-1])  # (N, out)
        grad_b = (grad_flat.t() @ hidden).mul_(ctx.scaling)  # (out, r)
        # gradient w.r.t. the dropped, un-rescaled input's projection: s * (1/(1-p)) * g @ B, (N, r)
        grad_hidden = (grad_flat @ lora_b).mul_(ctx.scaling * ctx.rescale)
        grad_a = grad_hidden.t() @ dropped  # (r, in)
        grad_x = None
        if ctx.needs_input_grad[1]:  # x
            grad_x = grad_hidden @ lora_a  # (N, in)
            if keep is not None:
                grad_x.mul_(keep)
            grad_x = grad_x.view(x.shape)
        return grad_out, grad_x, grad_a, grad_b, None, None, None, None


def in_place(owns_base_out: bool, base_out: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether the up-projection adds into base_out (or its copy in x's dtype) itself: when the caller hands
    it over (`owns_base_out`: core passes it when nothing else holds the base output, BaseLayer.output_is_fresh;
    it may be a view of a temporary, see LoraLinearFunction), it is contiguous (else reshape copies and the add
    is lost) and no autocast changes the projection's dtype. Saves copying base_out (~4% of a forward)."""
    return owns_base_out and base_out.is_contiguous() and not torch.is_autocast_enabled(x.device.type)


def linear_path(x: torch.Tensor, base_out: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                owns_base_out: bool, dropout: float = 0.0) -> str:
    """Which fast path `lora_linear` takes (names of lora_reference.FAST_PATHS), factors already in x's dtype."""
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, base_out, lora_a, lora_b))
    if grad and dropout > 0 and lora_triton.usable(x):  # CUDA: the mask drawn inside the down-projection
        return "lora_triton"
    name = "lora_autograd" if grad else "lora_no_grad"
    return name + "_in_place" if in_place(owns_base_out, base_out, x) else name


def lora_linear(x: torch.Tensor, base_out: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                scaling: float, dropout: float, call: CallContext, owns_base_out: bool = False) -> torch.Tensor:
    """base_out + scaling * dropout(x) @ lora_a.T @ lora_b.T, in the activation dtype (lora_reference.lora).

    `call`: this forward's context (its memo holds the dropout masks siblings share). `owns_base_out`: base_out
    is the caller's own fresh tensor (the base layer's output, which nothing saves for backward); the
    up-projection then adds into it instead of into a copy of it."""
    lora_a, lora_b = lora_a.to(x.dtype), lora_b.to(x.dtype)
    path = linear_path(x, base_out, lora_a, lora_b, owns_base_out, dropout)
    if path == "lora_triton":
        return lora_triton.fused_lora_linear(base_out, x, lora_a, lora_b, scaling, dropout, call)
    inplace = path.endswith("_in_place")
    if path.startswith("lora_autograd"):
        out = LoraLinearFunction.apply(base_out.to(x.dtype), x, lora_a, lora_b, scaling, dropout, inplace,
                                       dropout_masks(call))
        return out.to(base_out.dtype)
    hidden = dropped_projection(x, lora_a, dropout, dropout_masks(call))[3]
    return add_up_projection(base_out.to(hidden.dtype), hidden, lora_b, scaling, inplace).to(base_out.dtype)


# Below this many (tokens per sample x adapters), projecting every row through every adapter and masking
# the others beats gathering per-sample factors (decode steps: one token per sample); measured on CPU, r=16.
DENSE_BELOW = 32


def mixed_path(x: torch.Tensor, slots: int) -> str:
    """Which mixed-batch fast path `mixed_lora_linear` takes for x (batch, ..., in) and `slots` adapters."""
    return "mixed_dense" if math.prod(x.shape[1:-1]) * slots < DENSE_BELOW else "mixed_gather"


def stack_slots(factors: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A^T stacked (slots + 1, in, r_max), B^T stacked (slots + 1, r_max, out) and the scalings (slots + 1,),
    the last slot the base model (zeros, scaling 0): the layout the batched matmuls read fastest. One copy
    each (torch.stack); an empty slot is zeros, a smaller rank zero-padded."""
    present = [f for f in factors if f is not None]
    (ref, ref_b, _), r_max = present[0], max(a.shape[0] for a, _, _ in present)
    empty = (ref.new_zeros(r_max, ref.shape[1]), ref_b.new_zeros(ref_b.shape[0], r_max), 0.0)
    slots = [empty if f is None else f for f in factors] + [empty]
    a_t = torch.stack([F.pad(a.t(), (0, r_max - a.shape[0])) if a.shape[0] < r_max else a.t() for a, _, _ in slots])
    b_t = torch.stack([F.pad(b.t(), (0, 0, 0, r_max - b.shape[1])) if b.shape[1] < r_max else b.t()
                       for _, b, _ in slots])
    return a_t, b_t, torch.tensor([s for _, _, s in slots], dtype=a_t.dtype, device=a_t.device)


def stacked_factors(factors: list, memo: dict | None, key: object, dense: bool) -> list:
    """[A^T stacked, B^T stacked, scalings (stack_slots), A^T side by side (in, slots * r_max) when `dense`,
    else None] for `factors`. Cached in the call's `memo` under `key` (one per base layer) when no gradient is
    wanted: the factors cannot change within one call, and a generate() call is one call for all its decode
    steps, so they stack once per layer for the whole generation. Cost per layer and call: copying (slots + 1)
    * (in + out) * r_max floats (the dense path copies A once more): for SmolLM2 (30 blocks; in + out summed
    over a block's 7 linears = 10,176) with 8 adapters of r=16, 30 * 10,176 * 16 * 9 = 44M floats, 0.18 GB,
    against a forward over 32 x 128 tokens of about 0.9 TFLOP whose gather step alone copies 32 / 9 times as
    much. A single forward per call of one token per sample (a decode step outside generate()) pays it each
    time."""
    tensors = tuple(t for f in factors if f is not None for t in f[:2])
    cacheable = memo is not None and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
    hit = memo.get(key) if cacheable else None
    if hit is not None and len(hit[0]) == len(tensors) and all(a is b for a, b in zip(hit[0], tensors)):
        stacks = hit[1]
    else:
        stacks = [*stack_slots(factors), None]
        if cacheable:
            memo[key] = (tensors, stacks)
    if dense and stacks[3] is None:  # built on first need: a prefill (gather) step does not pay for it
        a_t, slots = stacks[0], len(factors)
        stacks[3] = a_t[:slots].permute(1, 0, 2).reshape(a_t.shape[1], -1)  # (in, slots * r_max)
    return stacks


def mixed_lora_linear(factors: list, x: torch.Tensor, base_out: torch.Tensor, index: torch.Tensor,
                      memo: dict | None = None, key: object = None) -> torch.Tensor:
    """One LoRA per sample (lora_reference.mixed_lora): `factors[slot]` is (A, B, scaling) or None, `index`
    (batch,) a slot per sample (-1: the base model); `memo`/`key`: where the call caches the stacked factors.
    No loop over samples or adapters: long samples gather their stacked factors, one bmm down and one baddbmm
    up; short ones (decode) go through all adapters' A side by side, other ranks masked (and scaled), one addmm."""
    dense = mixed_path(x, len(factors)) == "mixed_dense"
    a_t, b_t, scales, a_cat = stacked_factors(factors, memo, key, dense)
    batch, slots, in_f, r_max, out_f = x.shape[0], len(factors), a_t.shape[1], a_t.shape[2], b_t.shape[2]
    flat = x.reshape(batch, -1, in_f).to(a_t.dtype)  # (batch, tokens, in)
    tokens = flat.shape[1]
    if dense:
        hidden = flat.reshape(-1, in_f) @ a_cat  # (batch * tokens, slots * r_max)
        own = (torch.arange(slots, device=index.device) == index[:, None]) * scales[:slots]  # (batch, slots)
        hidden = hidden.view(batch, tokens, slots, r_max) * own[:, None, :, None].to(hidden.dtype)
        b_cat = b_t[:slots].reshape(slots * r_max, out_f)  # a view: B^T side by side
        out = torch.addmm(base_out.reshape(-1, out_f).to(a_t.dtype), hidden.view(batch * tokens, -1), b_cat)
        return out.reshape(base_out.shape).to(base_out.dtype)
    rows = torch.where(index < 0, slots, index)
    hidden = torch.bmm(flat, a_t[rows]).mul_(scales[rows][:, None, None])  # (batch, tokens, r_max)
    out = torch.baddbmm(base_out.reshape(batch, -1, out_f).to(a_t.dtype), hidden, b_t[rows])
    return out.reshape(base_out.shape).to(base_out.dtype)

