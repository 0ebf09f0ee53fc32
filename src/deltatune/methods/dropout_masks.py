"""LoRA/DoRA dropout masks: drawn in forward from a seed, drawn again in backward instead of being stored.

A keep-mask entry is a 16-bit uniform compared with round((1 - p) * 2^16) (lora_common.keep_threshold);
the kept inputs are scaled by exactly 1 / P(keep) in rank space by the kernels. Two ways to make the
uniforms, chosen per model (`DeltaModel.fused_dropout_masks`, copied into each call as
`call.fused_dropout`), one way for the whole forward and backward of a call:

- generator (default): torch's CPU/CUDA generator seeded with the mask's seed, `random_` over int64, four
  16-bit uniforms per draw; the mask is uint8 0/1 and applied by multiplication (about five times faster
  than torch.where on a CPU). Drawing and applying are three memory passes over the (N, in) input.
- fused (`training.compile: true` on a CPU): a counter-based hash of (seed, flat index), three rounds of a
  32-bit integer mix (x ^= x >> 16; x *= 0x45d9f3b, the "lowbias" finaliser family), low 16 bits as
  the uniform, compared and multiplied in the same loop; Inductor compiles it into one pass that reads
  the input and writes the masked input (about 4x faster than the generator way at (1024, 576) here,
  `benchmarks/lora_step.py --compile`). Compiling costs 5-25 s once per process, so it is opt-in. The
  same function run eagerly (`hashed_keep_mask`) is the reference the tests hold the compiled one to.

Shapes: a mask has the (N, in) shape of the flat input it masks.
"""

from __future__ import annotations

import functools
import math
import weakref
from collections.abc import Callable

import torch

from ..core.call import CallContext
from .lora_common import KEEP_LEVELS, keep_threshold, new_mask_seed

MIX = 0x45D9F3B  # odd 27-bit multiplier: the products of 32-bit values stay inside int64
MASK32 = 0xFFFFFFFF


def draw_keep_mask(shape: torch.Size, dropout: float, device: torch.device, seed: int,
                   fused: bool = False) -> torch.Tensor:
    """Keep-mask of `shape` as uint8 0/1 (P(keep) = keep_probability(dropout) per entry, independent), a
    function of `seed` (and of `fused`: which way the uniforms are made, module docstring). A kernel's
    mask for input x is draw_keep_mask((N, in), p, x.device, seed) for the seed it drew when it met x."""
    if fused:
        return hashed_keep_mask(torch.zeros(shape, dtype=torch.uint8, device=device), *_keys(seed),
                                keep_threshold(dropout)).view(torch.uint8)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    count = math.prod(shape)
    # random_ over the whole int64 range fills all 64 bits: four uniform (signed) 16-bit chunks per draw
    draws = torch.empty(-(-count // 4), dtype=torch.int64, device=device)
    draws.random_(-(2**63), None, generator=generator)
    chunks = draws.view(torch.int16)[:count]  # uniform over [-2^15, 2^15)
    return (chunks < keep_threshold(dropout) - KEEP_LEVELS // 2).view(torch.uint8).view(shape)


def _mix(h: torch.Tensor) -> torch.Tensor:
    return (((h >> 16) ^ h) * MIX) & MASK32


def hashed_keep_mask(t: torch.Tensor, key_a: torch.Tensor, key_b: torch.Tensor, threshold: int) -> torch.Tensor:
    """The fused way's keep-mask (bool, t's shape) for a tensor of t's shape; keys are 0-d int64 < 2^32."""
    index = torch.arange(t.numel(), dtype=torch.int64, device=t.device).view(t.shape)
    h = _mix(_mix((index ^ key_a) & MASK32) ^ key_b)
    h = _mix(h)
    return ((h >> 16) ^ h) & (KEEP_LEVELS - 1) < threshold


def _hashed_masked(t: torch.Tensor, key_a: torch.Tensor, key_b: torch.Tensor, threshold: int) -> torch.Tensor:
    return t * hashed_keep_mask(t, key_a, key_b, threshold)


@functools.cache
def compiled_masking() -> Callable:
    """t * hashed_keep_mask(t, ...) compiled by Inductor (dynamic shapes: one compilation per dtype)."""
    return torch.compile(_hashed_masked, dynamic=True)


def warm_up_fused_masks(dtype: torch.dtype = torch.float32) -> None:
    """Compile the fused masking now (before training starts), checked against its eager reference.

    Raises:
        RuntimeError: Inductor cannot compile here (no C++ compiler): the error names `training.compile`.
    """
    sample = torch.randn(7, 5, dtype=dtype)
    keys, threshold = _keys(12345), keep_threshold(0.3)
    try:
        got = compiled_masking()(sample, *keys, threshold)
    except Exception as exc:  # Inductor's failures have many types (missing compiler, codegen)
        raise RuntimeError(f"training.compile: Inductor could not compile the fused dropout masks here ({exc}); "
                           "set training.compile: false") from exc
    if not torch.equal(got, _hashed_masked(sample, *keys, threshold)):
        raise RuntimeError("training.compile: the compiled dropout masking differs from its eager reference")


def _keys(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(seed & MASK32), torch.tensor((seed >> 32) & MASK32)


def masked(t: torch.Tensor, dropout: float, seed: int, fused: bool) -> torch.Tensor:
    """t (N, in) times its keep-mask for `seed`, as a new tensor."""
    if fused:
        return compiled_masking()(t, *_keys(seed), keep_threshold(dropout))
    return t * draw_keep_mask(t.shape, dropout, t.device, seed)


class DropoutMasks:
    """One call's dropout masks (in `call.memo`, see `dropout_masks`); at most one masked input alive per call
    (a new draw, forward or backward, drops the previous one first). forward: (weakref to the input, key,
    seed, masked flat input) of the last input met; backward: (key, apply-mask, masked flat input) of the
    last mask drawn again. The autograd functions keep this object and the seed, so backward draws a mask
    once for all the siblings that shared it (they run back to back). Nothing is kept when not shared."""

    def __init__(self, share: bool, fused: bool = False) -> None:
        self.share, self.fused = share, fused
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
        dropped = masked(flat, dropout, seed, self.fused)
        if self.share:
            self.forward = (weakref.ref(x), key, seed, dropped)
        return seed, dropped

    def in_backward(self, x: torch.Tensor, seed: int | None, dropout: float) -> tuple:
        """(apply-mask or None, masked flat input (N, in)) in backward: the forward's mask drawn again from its
        seed, once for the sibling layers that shared it (a seed belongs to one input tensor). apply-mask
        takes a (N, in) tensor and returns it masked (in place or new)."""
        flat = x.reshape(-1, x.shape[-1])
        if seed is None:
            return None, flat
        key = (seed, dropout, flat.shape, flat.dtype, flat.device)
        entry = self.backward
        if entry is None or entry[0] != key:
            self.forward = self.backward = None
            if self.fused:
                entry = (key, functools.partial(masked, dropout=dropout, seed=seed, fused=True),
                         masked(flat, dropout, seed, True))
            else:
                keep = draw_keep_mask(flat.shape, dropout, flat.device, seed)
                entry = (key, _multiply_by(keep), flat * keep)
            if self.share:
                self.backward = entry
        return entry[1], entry[2]


def _multiply_by(keep: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda t: t.mul_(keep)


def dropout_masks(call: CallContext) -> DropoutMasks:
    """This call's DropoutMasks, made on first use (one dict lookup per adapted layer afterwards)."""
    masks = call.memo.get("lora_dropout")
    if masks is None:
        masks = call.memo["lora_dropout"] = DropoutMasks(call.share_dropout, call.fused_dropout)
    return masks
