"""The LoRA linear branch as one autograd function: out = base_out + s * dropout(x) @ A^T @ B^T.

Why not plain modules: nn.Dropout keeps a float copy of the dropped input (4 bytes an element) for A's
gradient in every adapted layer. This keeps the input x itself (already alive for the other layers
that read it) plus the seed its dropout mask was drawn from (backward draws the mask again), and only
rank-sized intermediates; the scaled up-projection is folded into one addmm on the base output.

The same formulas in plain torch are in lora_reference.py; every fast path here (FAST_PATHS there) is
held to them by tests/test_fast_paths.py.

Dropout masks: drawing them is most of dropout's cost on a CPU (a Bernoulli draw per input element costs
about ten times the rank-16 matmul it feeds), so
- by default (`call.share_dropout`, DeltaModel.share_dropout_masks) layers that read the same input tensor
  in one call (q/k/v of one attention block, gate/up of one MLP) share one mask and one masked input, drawn
  for the first of them: each branch still sees dropout p, like one `nn.Dropout` placed before a fused
  down-projection of the siblings. share_dropout=False draws an independent mask per layer, as peft does;
- a mask is 16-bit uniforms compared with round((1 - p) * 2^16), four per 64-bit draw, and the
  rescale is 2^16 / that threshold, so the kept inputs are scaled by exactly 1 / P(keep);
- masks are uint8 0/1 and applied by multiplication (about five times faster than torch.where on a CPU).
The masks of one call live in that call's memo (`DropoutMasks`), never in globals or tensor attributes.

Shapes: x (..., in), base_out (..., out), A (r, in), B (out, r); N = prod(...) tokens.
"""

from __future__ import annotations

import math
import weakref

import torch

from ..core.call import CallContext

KEEP_LEVELS = 2**16  # a mask entry is a 16-bit uniform compared with a threshold


def keep_threshold(dropout: float) -> int:
    """Entries whose 16-bit uniform is below this are kept; P(keep) = threshold / 2^16."""
    return max(1, round((1 - dropout) * KEEP_LEVELS))


def keep_probability(dropout: float) -> float:
    """P(keep) of a mask drawn by `draw_keep_mask`: kept inputs are divided by it."""
    return keep_threshold(dropout) / KEEP_LEVELS


def new_mask_seed() -> int:
    """A seed for one dropout mask, drawn from the global CPU generator (so torch.manual_seed and
    gradient checkpointing's RNG replay reproduce it)."""
    return int(torch.randint(0, 2**62, (), dtype=torch.int64))


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
    """One call's dropout masks (in `call.memo`, see `dropout_masks`). At most one masked input is alive per
    call: drawing a new mask, in forward or backward, drops the previous one first.

    forward: (weakref to the input, key, seed, masked flat input) of the last input met, when shared;
    backward: (key, keep-mask, masked flat input) of the last mask drawn again in backward. The autograd
    functions keep this object and the seed, so backward draws a mask once for all the siblings that shared
    it (they run back to back)."""

    def __init__(self, share: bool) -> None:
        self.share = share
        self.forward: tuple | None = None
        self.backward: tuple | None = None

    def dropped(self, x: torch.Tensor, flat: torch.Tensor, dropout: float) -> tuple[int, torch.Tensor]:
        """(mask seed, masked flat input) for input `x`: with sharing, drawn once per input tensor object.

        Sharing is by tensor identity (no private version counter): an input changed in place between two
        of its readers would give the second the first one's masked input. Under autograd that cannot pass
        unnoticed (x is saved for backward, so autograd's version check refuses the step); a no-gradient
        forward in training mode shares too, so that a reentrant checkpoint's no-grad forward draws what its
        recompute draws."""
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


def autocast_state(x: torch.Tensor) -> tuple:
    """The forward's autocast state: backward may run outside the autocast block (Hugging Face Trainer
    does), so the functions here replay it."""
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


def add_up_projection(base_out: torch.Tensor, hidden: torch.Tensor, lora_b: torch.Tensor, scaling: float,
                      inplace: bool) -> torch.Tensor:
    """base_out + scaling * hidden @ B^T shaped as base_out; added into base_out itself when `inplace`
    (see `in_place`)."""
    flat = base_out.reshape(-1, base_out.shape[-1])
    if inplace:
        flat.addmm_(hidden, lora_b.t(), alpha=scaling)
        return base_out
    return torch.addmm(flat, hidden, lora_b.t(), alpha=scaling).view(base_out.shape)


def in_place(owns_base_out: bool, base_out: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether the up-projection adds into base_out (or its copy in x's dtype) itself: only when the caller
    hands it over (`owns_base_out`: core passes it for a base whose output nothing else holds,
    BaseLayer.output_is_fresh; it may be a view of a temporary, see LoraLinearFunction), it is contiguous
    (a reshape would copy it and the add would be lost) and no autocast changes the projection's dtype
    (addmm_ cannot). Saves copying base_out: about 4% of an unmerged forward."""
    return owns_base_out and base_out.is_contiguous() and not torch.is_autocast_enabled(x.device.type)


def linear_path(x: torch.Tensor, base_out: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                owns_base_out: bool) -> str:
    """Which fast path `lora_linear` takes (names of lora_reference.FAST_PATHS), factors already in x's dtype."""
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, base_out, lora_a, lora_b))
    name = "lora_autograd" if grad else "lora_no_grad"
    return name + "_in_place" if in_place(owns_base_out, base_out, x) else name


def lora_linear(x: torch.Tensor, base_out: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                scaling: float, dropout: float, call: CallContext, owns_base_out: bool = False) -> torch.Tensor:
    """base_out + scaling * dropout(x) @ lora_a.T @ lora_b.T, in the activation dtype (lora_reference.lora).

    `call`: this forward's context (its memo holds the dropout masks siblings share). `owns_base_out`: base_out
    is the caller's own fresh tensor (the base layer's output, which nothing saves for backward); the
    up-projection then adds into it instead of into a copy of it."""
    lora_a, lora_b = lora_a.to(x.dtype), lora_b.to(x.dtype)
    path = linear_path(x, base_out, lora_a, lora_b, owns_base_out)
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
    tokens = math.prod(x.shape[1:-1])
    return "mixed_dense" if tokens * slots < DENSE_BELOW else "mixed_gather"


def stacked_factors(factors: list, memo: dict | None, key: object, dense: bool) -> tuple:
    """A^T stacked (slots + 1, in, r_max) and s * B^T stacked (slots + 1, r_max, out), the last slot the
    base model (zeros); with `dense` also the same side by side, (in, slots * r_max) and (slots * r_max, out).

    Cached in the call's `memo` under `key` (one per base layer) when no gradient is wanted: the factors
    cannot change within one call, and a generate() call is one call for all its decode steps, so they
    stack once. Cost per layer and call: writing (slots + 1) * (in + out) * r_max floats (twice that for the
    dense side-by-side copy): for SmolLM2 (30 blocks, in + out summed over a block's 7 linears = 10,176),
    8 adapters of r=16 make 30 * 10,176 * 16 * 9 = 44M floats, about 0.2 GB written per call: some tens of
    ms on a CPU, against about 10 s for a 32 x 128-token forward (under 1%), and paid once per generate()."""
    cacheable = memo is not None and not (
        torch.is_grad_enabled() and any(f[0].requires_grad or f[1].requires_grad for f in factors if f is not None))
    tensors = tuple(t for f in factors if f is not None for t in f[:2])
    hit = memo.get(key) if cacheable else None
    if hit is not None and len(hit[0]) == len(tensors) and all(a is b for a, b in zip(hit[0], tensors)):
        stacks = hit[1]
    else:
        present = [f for f in factors if f is not None]
        ref = present[0][0]
        r_max = max(a.shape[0] for a, _, _ in present)
        a_t = ref.new_zeros(len(factors) + 1, ref.shape[1], r_max)
        b_t = ref.new_zeros(len(factors) + 1, r_max, present[0][1].shape[0])
        for slot, found in enumerate(factors):
            if found is not None:
                a, b, scaling = found
                a_t[slot, :, : a.shape[0]] = a.t()
                b_t[slot, : a.shape[0]] = b.t() * scaling
        stacks = [a_t, b_t, None, None]
        if cacheable:
            memo[key] = (tensors, stacks)
    if dense and stacks[2] is None:  # built on first need: a prefill (gather) step does not pay for it
        a_t, b_t = stacks[:2]
        slots, in_f, r_max = len(factors), a_t.shape[1], a_t.shape[2]
        stacks[2] = a_t[:slots].permute(1, 0, 2).reshape(in_f, slots * r_max)
        stacks[3] = b_t[:slots].reshape(slots * r_max, b_t.shape[2])
    return tuple(stacks)


def mixed_lora_linear(factors: list, x: torch.Tensor, base_out: torch.Tensor, index: torch.Tensor,
                      memo: dict | None = None, key: object = None) -> torch.Tensor:
    """One LoRA per sample (lora_reference.mixed_lora): `factors[slot]` is (A, B, scaling) or None, `index`
    (batch,) a slot per sample (-1: the base model); `memo`/`key`: where the call caches the stacked factors
    (stacked_factors). No loop over samples or adapters: long samples gather their stacked factors and
    take one bmm down and one baddbmm up into the base output; short ones (decode) go through every
    adapter's A side by side with the other adapters' ranks masked to zero, then one addmm up."""
    dense = mixed_path(x, len(factors)) == "mixed_dense"
    a_t, b_t, a_cat, b_cat = stacked_factors(factors, memo, key, dense)
    batch, in_f, r_max, out_f = x.shape[0], a_t.shape[1], a_t.shape[2], b_t.shape[2]
    flat = x.reshape(batch, -1, in_f).to(a_t.dtype)  # (batch, tokens, in)
    tokens = flat.shape[1]
    if dense:
        hidden = flat.reshape(-1, in_f) @ a_cat  # (batch * tokens, slots * r_max)
        own = torch.arange(len(factors), device=index.device) == index[:, None]  # (batch, slots); base: none
        hidden = hidden.view(batch, tokens, len(factors), r_max) * own[:, None, :, None].to(hidden.dtype)
        out = torch.addmm(base_out.reshape(-1, out_f).to(a_t.dtype), hidden.view(batch * tokens, -1), b_cat)
        return out.reshape(base_out.shape).to(base_out.dtype)
    slots = torch.where(index < 0, len(factors), index)
    hidden = torch.bmm(flat, a_t[slots])  # (batch, tokens, r_max)
    out = torch.baddbmm(base_out.reshape(batch, -1, out_f).to(a_t.dtype), hidden, b_t[slots])
    return out.reshape(base_out.shape).to(base_out.dtype)
