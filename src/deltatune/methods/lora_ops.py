"""The LoRA linear branch as one autograd function: out = base_out + s * dropout(x) @ A^T @ B^T.

Why not plain modules: nn.Dropout keeps a float copy of the dropped input (4 bytes an element) for A's
gradient in every adapted layer. This keeps the input x itself (already alive for the other layers
that read it) plus the seed its dropout mask was drawn from (backward draws the mask again), and only
rank-sized intermediates; the scaled up-projection is folded into one addmm on the base output.

Dropout masks: drawing them is most of dropout's cost on a CPU (a Bernoulli draw per input element costs
about ten times the rank-16 matmul it feeds), so
- layers that read the same input tensor (q/k/v of one attention block, gate/up of one MLP) share one
  mask and one masked input, drawn for the first of them: each branch still sees dropout p, like one
  `nn.Dropout` placed before a fused down-projection of the siblings;
- a mask is 16-bit uniforms compared with round((1 - p) * 2^16), four per 64-bit draw, and the
  rescale is 2^16 / that threshold, so the kept inputs are scaled by exactly 1 / P(keep);
- masks are uint8 0/1 and applied by multiplication (about five times faster than torch.where on a CPU).

Shapes: x (..., in), base_out (..., out), A (r, in), B (out, r); N = prod(...) tokens.
"""

from __future__ import annotations

import math
import threading
import weakref

import torch

KEEP_LEVELS = 2**16  # a mask entry is a 16-bit uniform compared with a threshold


def keep_threshold(dropout: float) -> int:
    """Entries whose 16-bit uniform is below this are kept; P(keep) = threshold / 2^16."""
    return max(1, round((1 - dropout) * KEEP_LEVELS))


def new_mask_seed() -> int:
    """A seed for one dropout mask, drawn from the global CPU generator (so torch.manual_seed and
    gradient checkpointing's RNG replay reproduce it)."""
    return int(torch.randint(0, 2**62, (), dtype=torch.int64))


def draw_keep_mask(shape: torch.Size, dropout: float, device: torch.device, seed: int) -> torch.Tensor:
    """Keep-mask of `shape` as uint8 0/1 (P(keep) = keep_threshold(dropout) / 2^16 per entry, independent),
    a function of `seed`: forward draws it, backward draws the same mask again instead of storing it.

    uint8 rather than bool: multiplying a float tensor by a uint8 mask runs faster on a CPU than
    torch.where on a bool mask."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    count = math.prod(shape)
    # random_ over the whole int64 range fills all 64 bits: four uniform (signed) 16-bit chunks per draw
    draws = torch.empty(-(-count // 4), dtype=torch.int64, device=device)
    draws.random_(-(2**63), None, generator=generator)
    chunks = draws.view(torch.int16)[:count]  # uniform over [-2^15, 2^15)
    return (chunks < keep_threshold(dropout) - KEEP_LEVELS // 2).view(torch.uint8).view(shape)


_SHARED = threading.local()  # .forward: (weakref to the input, its key, seed, masked flat input)
#                               .backward: (key, keep-mask, masked flat input)


def shared_dropout(x: torch.Tensor, flat: torch.Tensor, dropout: float) -> tuple[int, torch.Tensor]:
    """(mask seed, masked flat input) for input `x`: drawn once per input tensor object, shared by the
    layers that read it (per thread)."""
    key = (x._version, dropout, x.shape, x.dtype, x.device)
    entry = getattr(_SHARED, "forward", None)
    if entry is not None and entry[0]() is x and entry[1] == key:
        return entry[2], entry[3]
    seed = new_mask_seed()
    _SHARED.forward = _SHARED.backward = None  # free the previous masked input before making this one
    masked = flat * draw_keep_mask(flat.shape, dropout, flat.device, seed)
    _SHARED.forward = (weakref.ref(x), key, seed, masked)
    return seed, masked


def dropout_in_backward(x: torch.Tensor, seed: int | None, dropout: float) -> tuple:
    """(keep-mask or None, masked flat input (N, in)) in backward: the forward's mask drawn again from its
    seed, once for the sibling layers that shared it (a seed belongs to one input tensor)."""
    flat = x.reshape(-1, x.shape[-1])
    if seed is None:
        return None, flat
    key = (seed, dropout, flat.shape, flat.dtype, flat.device)
    entry = getattr(_SHARED, "backward", None)
    if entry is None or entry[0] != key:
        _SHARED.forward = _SHARED.backward = None
        keep = draw_keep_mask(flat.shape, dropout, flat.device, seed)
        entry = _SHARED.backward = (key, keep, flat * keep)
    return entry[1], entry[2]


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


def dropped_projection(x: torch.Tensor, lora_a: torch.Tensor, dropout: float) -> tuple:
    """(mask seed or None, dropped flat input (N, in), rescale 1 / P(keep), hidden = dropout(x) @ A^T (N, r)).
    The rescale is applied to `hidden`, in rank space, not to the (N, in) input."""
    flat = x.reshape(-1, x.shape[-1])
    if dropout <= 0:
        return None, flat, 1.0, flat @ lora_a.t()
    seed, dropped = shared_dropout(x, flat, dropout)
    rescale = KEEP_LEVELS / keep_threshold(dropout)
    return seed, dropped, rescale, (dropped @ lora_a.t()).mul_(rescale)


class LoraLinearFunction(ReplaysAutocast):
    @staticmethod
    def forward(ctx, x, base_out, lora_a, lora_b, scaling: float, dropout: float, inplace: bool):
        seed, _, rescale, hidden = dropped_projection(x, lora_a, dropout)
        out, added_in_place = add_up_projection(base_out, hidden, lora_b, scaling, inplace)
        ctx.save_for_backward(x, hidden, lora_a, lora_b)
        ctx.scaling, ctx.rescale, ctx.mask = scaling, rescale, (seed, dropout)
        ctx.autocast = autocast_state(x)
        if added_in_place:
            ctx.mark_dirty(base_out)
            return base_out
        return out

    @staticmethod
    def _backward(ctx, grad_out):
        x, hidden, lora_a, lora_b = ctx.saved_tensors
        keep, dropped = dropout_in_backward(x, *ctx.mask)
        grad_flat = grad_out.reshape(-1, grad_out.shape[-1])  # (N, out)
        grad_b = (grad_flat.t() @ hidden).mul_(ctx.scaling)  # (out, r)
        # gradient w.r.t. the dropped, un-rescaled input's projection: s * (1/(1-p)) * g @ B, (N, r)
        grad_hidden = (grad_flat @ lora_b).mul_(ctx.scaling * ctx.rescale)
        grad_a = grad_hidden.t() @ dropped  # (r, in)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_hidden @ lora_a  # (N, in)
            if keep is not None:
                grad_x.mul_(keep)
            grad_x = grad_x.view(x.shape)
        return grad_x, grad_out, grad_a, grad_b, None, None, None


def add_up_projection(base_out: torch.Tensor, hidden: torch.Tensor, lora_b: torch.Tensor, scaling: float,
                      inplace: bool) -> tuple[torch.Tensor, bool]:
    """(base_out + scaling * hidden @ B^T shaped as base_out, whether it was added into base_out itself).
    In place only when allowed and possible: one dtype, and a whole contiguous tensor (autograd rebases
    in-place changes of views, such as Conv1D's output, wrongly through a custom function)."""
    flat = base_out.reshape(-1, base_out.shape[-1])
    whole = base_out._base is None and base_out.is_contiguous()
    if inplace and whole and flat.dtype == hidden.dtype == lora_b.dtype:
        flat.addmm_(hidden, lora_b.t(), alpha=scaling)
        return base_out, True
    return torch.addmm(flat, hidden, lora_b.t(), alpha=scaling).view(base_out.shape), False


def lora_linear(x: torch.Tensor, base_out: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                scaling: float, dropout: float, inplace: bool = False) -> torch.Tensor:
    """base_out + scaling * dropout(x) @ lora_a.T @ lora_b.T, in the activation dtype.

    `inplace`: base_out is the caller's own fresh tensor (the base layer's output, which nothing saves
    for backward); the up-projection then adds into it instead of into a copy of it (the copy cost about
    4% of an unmerged forward)."""
    lora_a, lora_b = lora_a.to(x.dtype), lora_b.to(x.dtype)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, base_out, lora_a, lora_b)):
        out = LoraLinearFunction.apply(x, base_out.to(x.dtype), lora_a, lora_b, scaling, dropout, inplace)
        return out.to(base_out.dtype)
    hidden = dropped_projection(x, lora_a, dropout)[3]
    return add_up_projection(base_out.to(hidden.dtype), hidden, lora_b, scaling, inplace)[0].to(base_out.dtype)


# Below this many (tokens per sample x adapters), projecting every row through every adapter and masking
# the others beats gathering per-sample factors (decode steps: one token per sample); measured on CPU, r=16.
DENSE_BELOW = 32
_STACKS: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _stack_key(factors: list) -> tuple:
    """Changes whenever a factor is updated in place (optimizer step, hotswap, load); replaced tensors are
    caught by the weak references stored beside it."""
    return tuple(None if f is None else (f[0]._version, f[1]._version, f[2], f[0].shape, f[1].shape)
                 for f in factors)


def _same_tensors(refs: list, factors: list) -> bool:
    tensors = [t for f in factors if f is not None for t in f[:2]]
    return len(refs) == len(tensors) and all(ref() is t for ref, t in zip(refs, tensors))


def stacked_factors(factors: list, owner: torch.nn.Module | None) -> tuple[torch.Tensor, ...]:
    """A^T stacked (slots + 1, in, r_max) and s * B^T stacked (slots + 1, r_max, out), the last slot the
    base model (zeros), plus the same side by side, (in, slots * r_max) and (slots * r_max, out). Cached
    per `owner` (the base layer) while no factor changes and no gradient is wanted."""
    present = [f for f in factors if f is not None]
    cacheable = owner is not None and not (torch.is_grad_enabled()
                                           and any(a.requires_grad or b.requires_grad for a, b, _ in present))
    key = _stack_key(factors)
    if cacheable:
        hit = _STACKS.get(owner)
        if hit is not None and hit[0] == key and _same_tensors(hit[1], factors):
            return hit[2:]
    ref = present[0][0]
    r_max = max(a.shape[0] for a, _, _ in present)
    in_f, out_f = ref.shape[1], present[0][1].shape[0]
    a_t = ref.new_zeros(len(factors) + 1, in_f, r_max)
    b_t = ref.new_zeros(len(factors) + 1, r_max, out_f)
    for slot, found in enumerate(factors):
        if found is not None:
            a, b, scaling = found
            a_t[slot, :, : a.shape[0]] = a.t()
            b_t[slot, : a.shape[0]] = b.t() * scaling
    slots = len(factors)
    a_cat = a_t[:slots].permute(1, 0, 2).reshape(in_f, slots * r_max)
    b_cat = b_t[:slots].reshape(slots * r_max, out_f)
    if cacheable:
        refs = [weakref.ref(t) for f in factors if f is not None for t in f[:2]]
        _STACKS[owner] = (key, refs, a_t, b_t, a_cat, b_cat)
    return a_t, b_t, a_cat, b_cat


def mixed_lora_linear(factors: list, x: torch.Tensor, base_out: torch.Tensor, index: torch.Tensor,
                      owner: torch.nn.Module | None = None) -> torch.Tensor:
    """One LoRA per sample: `factors[slot]` is (A, B, scaling) or None, `index` (batch,) a slot per sample
    (-1: the base model). No loop over samples or adapters: long samples gather their stacked factors and
    take one bmm down and one baddbmm up into the base output; short ones (decode) go through every
    adapter's A side by side with the other adapters' ranks masked to zero, then one addmm up."""
    a_t, b_t, a_cat, b_cat = stacked_factors(factors, owner)
    batch, in_f, r_max, out_f = x.shape[0], a_t.shape[1], a_t.shape[2], b_t.shape[2]
    flat = x.reshape(batch, -1, in_f).to(a_t.dtype)  # (batch, tokens, in)
    tokens = flat.shape[1]
    if tokens * len(factors) < DENSE_BELOW:
        hidden = flat.reshape(-1, in_f) @ a_cat  # (batch * tokens, slots * r_max)
        own = torch.arange(len(factors), device=index.device) == index[:, None]  # (batch, slots); base: none
        hidden = hidden.view(batch, tokens, len(factors), r_max) * own[:, None, :, None].to(hidden.dtype)
        out = torch.addmm(base_out.reshape(-1, out_f).to(a_t.dtype), hidden.view(batch * tokens, -1), b_cat)
        return out.reshape(base_out.shape).to(base_out.dtype)
    slots = torch.where(index < 0, len(factors), index)
    hidden = torch.bmm(flat, a_t[slots])  # (batch, tokens, r_max)
    out = torch.baddbmm(base_out.reshape(batch, -1, out_f).to(a_t.dtype), hidden, b_t[slots])
    return out.reshape(base_out.shape).to(base_out.dtype)
