"""BOFT: Parameter-Efficient Orthogonal Finetuning via Butterfly Factorization (Liu et al. 2024,
arXiv:2311.06243).

Update rule: W' = diag(s) W B^T with B = M_(m-1) ... M_1 M_0 a product of m = boft_n_butterfly_factor
orthogonal factors, M_i = P_i D_i P_i^T: D_i is block-diagonal (boft_block_num blocks of boft_block_size,
each the Cayley transform (I - Q)(I + Q)^-1 of Q = (A - A^T) / 2 of a free (b, b) matrix A), P_i the
butterfly permutation that pairs blocks 2^i apart, so m factors mix 2^m blocks (m = 1: OFT with one
scale per output channel). s rescales output channels. Give one of boft_block_size / boft_block_num; the
other follows from in = block_size * block_num (in * kh * kw for a conv: the rotation acts on the
flattened filter). `boft_dropout` (training only): in one random factor, a random int(p * n) of its n
blocks act as the identity.
Init rule: A = 0, s = 1, so B = I and W' = W (init_weights=False: A ~ N(0, 0.1), s ~ N(1, 0.1)).

The update is applied on the weight side, out = base(x) + x (W' - W)^T (conv: conv(x, W' - W)), which
equals the merged layer. PEFT 0.21.2 ignores boft_n_butterfly_factor (uses 1) unless its CUDA extension
builds, so a factor > 1 interchanges only with PEFT on a machine where it does.

Saved tensors (PEFT's names): boft_R (m, block_num, b, b), boft_s (out, 1) for Linear, (1, out) for Conv2d.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..core.base import BaseLayer
from ..core.call import CallContext
from ..core.config import DeltaConfig, DeltaConfigError, register_method, require
from ..core.protocols import Reparameterizing
from .oft import (
    BIAS_MODES,
    cayley,
    filter_dim,
    multiplicative_dropout,
    no_fan_in_fan_out,
    oft_kind,
    validate_rotation_target,
)


def butterfly_permutation(dim: int, blocks: int, half: int, factors: int) -> torch.Tensor:
    """P_i as an index vector (P_i = I[perm]): inside each group of dim / blocks entries, reorder its
    half-block chunks evens first, then odds, so the next block-diagonal factor pairs distant blocks."""
    if factors == 0:
        return torch.arange(dim)
    size = dim // blocks
    chunks = torch.cat([torch.arange(0, size // half, 2), torch.arange(1, size // half, 2)])
    within = torch.cat([torch.arange(c * half, (c + 1) * half) for c in chunks.tolist()])  # (size,)
    return torch.cat([start + within for start in range(0, dim, size)])


def butterfly_layout(dim: int, config: BOFTConfig, module_name: str) -> tuple[int, int, int]:
    """(block_num, block_size, extra factors) for a layer whose rotation acts on `dim` numbers; PEFT's rules."""
    extra = config.boft_n_butterfly_factor - 1

    def fail(why: str) -> None:
        raise DeltaConfigError(f"target module {module_name!r} (rotation size {dim}): {why}")

    if config.boft_block_num:
        block_num = config.boft_block_num
        if dim % block_num:
            fail(f"boft_block_num={block_num} must divide {dim}")
        if extra and (extra > int(math.log2(block_num)) or block_num % 2**extra):
            fail(f"boft_block_num={block_num} must be a multiple of 2**(boft_n_butterfly_factor - 1) = {2**extra}")
        block_size = dim // block_num
    else:
        block_size = config.boft_block_size
        if dim % (block_size * 2**extra):
            fail(f"boft_block_size={block_size} * 2**(boft_n_butterfly_factor - 1) must divide {dim}")
        block_num = dim // block_size
    if extra and (block_num % 2 or block_size % 2):
        fail(f"with boft_n_butterfly_factor > 1, block count ({block_num}) and block size ({block_size}) must be even")
    return block_num, block_size, extra


class BOFTAdapter(nn.Module, Reparameterizing):
    """One BOFT adapter for one nn.Linear / nn.Conv2d."""
    merge_rule = "reads_base"  # the forward adds f(W) x - W x, W the base weight (core/merging.py)

    def __init__(self, base: BaseLayer, block_num: int, block_size: int, extra: int,
                 config: BOFTConfig) -> None:
        super().__init__()
        self.kind = oft_kind(base)
        self.block_num, self.block_size, self.dropout = block_num, block_size, config.boft_dropout
        factory = base.factory  # the base's device and dtype
        out_f, dim = base.weight.shape[0], filter_dim(base)
        self.boft_R = nn.Parameter(torch.zeros(extra + 1, block_num, block_size, block_size, **factory))
        scale_shape = (out_f, 1) if self.kind == "linear" else (1, out_f)
        self.boft_s = nn.Parameter(torch.ones(scale_shape, **factory))
        if not config.init_weights:
            nn.init.normal_(self.boft_R, mean=0.0, std=0.1)
            nn.init.normal_(self.boft_s, mean=1.0, std=0.1)
        perms = [butterfly_permutation(dim, block_num // 2**i, block_size // 2, extra) for i in range(extra + 1)]
        self.register_buffer("perms", torch.stack(perms).to(base.device), persistent=False)  # (m, dim)

    # ---------------------------------------------------------------- the rotation
    def factor_blocks(self, dropout: bool = True) -> torch.Tensor:
        """Orthogonal blocks of every factor, (m, block_num, b, b)."""
        free = self.boft_R.flatten(0, 1)  # (m * block_num, b, b)
        blocks = cayley(0.5 * (free - free.transpose(1, 2))).view_as(self.boft_R)
        if dropout and self.training and self.dropout > 0:
            chosen = int(torch.randint(0, blocks.shape[0], (1,)))
            dropped = multiplicative_dropout(blocks[chosen], self.dropout, True)
            blocks = torch.cat([blocks[:chosen], dropped[None], blocks[chosen + 1:]])
        return blocks

    def butterfly(self, blocks: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        """B = M_(m-1) ... M_0 (dim, dim), or B^-1 = M_0^-1 ... M_(m-1)^-1 from inverted blocks."""
        factors = []
        for i in range(blocks.shape[0]):
            perm = self.perms[i]
            factors.append(torch.block_diag(*blocks[i])[perm][:, perm])  # P_i D_i P_i^T
        matrix = factors[-1] if inverse else factors[0]
        for factor in (reversed(factors[:-1]) if inverse else factors[1:]):
            matrix = factor @ matrix
        return matrix

    def scale(self) -> torch.Tensor:
        """s as a column, (out, 1)."""
        return self.boft_s if self.kind == "linear" else self.boft_s.T

    # ---------------------------------------------------------------- forward and merge
    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base: BaseLayer, call: CallContext,
                owns_base_out: bool = False) -> torch.Tensor:
        weight = base.read_weight(copy=False).to(self.boft_R.dtype)
        rotated = self.scale() * (weight.flatten(1) @ self.butterfly(self.factor_blocks()).T)  # (out, dim)
        delta = rotated.reshape(weight.shape) - weight
        x = x.to(delta.dtype)
        update = nn.functional.linear(x, delta) if self.kind == "linear" else base._conv_forward(x, delta, None)
        return base_out + update.to(base_out.dtype)

    def merge_refusal(self) -> str | None:
        return None

    def merged_weight(self, base: BaseLayer, weight: torch.Tensor, reference: dict) -> torch.Tensor:
        """W' = diag(s) W B^T."""
        rotation = self.butterfly(self.factor_blocks(dropout=False).float())
        return (self.scale().float() * (weight.flatten(1) @ rotation.T)).reshape(weight.shape)

    def unmerged_weight(self, base: BaseLayer, weight: torch.Tensor) -> torch.Tensor:
        """W = diag(1/s) W' B^-T, with B^-1 built from inverted blocks (exact, not a transpose)."""
        inverse_blocks = torch.linalg.inv(self.factor_blocks(dropout=False).double()).float()
        inverse = self.butterfly(inverse_blocks, inverse=True)
        return ((weight.flatten(1) / self.scale().float()) @ inverse.T).reshape(weight.shape)

    def extra_repr(self) -> str:
        factors, blocks, size, _ = self.boft_R.shape
        return f"kind={self.kind}, factors={factors}, block_num={blocks}, block_size={size}"


@register_method
@dataclass
class BOFTConfig(DeltaConfig):
    """BOFT settings; field names as in Hugging Face PEFT's BOFTConfig."""

    peft_type = "BOFT"
    adapter_types = (BOFTAdapter,)
    supports_quantized = False  # reads the full base weight
    boft_block_size: int = 4
    boft_block_num: int = 0
    boft_n_butterfly_factor: int = 1
    boft_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    init_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("boft_block_size", "boft_block_num"):
            value = getattr(self, name)
            require(isinstance(value, int) and not isinstance(value, bool) and value >= 0, name, value,
                    "must be an integer >= 0")
        require((self.boft_block_size == 0) != (self.boft_block_num == 0), "boft_block_size", self.boft_block_size,
                f"give exactly one of boft_block_size and boft_block_num (boft_block_num={self.boft_block_num})")
        require(isinstance(self.boft_n_butterfly_factor, int) and self.boft_n_butterfly_factor >= 1,
                "boft_n_butterfly_factor", self.boft_n_butterfly_factor, "must be an integer >= 1")
        require(isinstance(self.boft_dropout, (int, float)) and 0 <= self.boft_dropout < 1, "boft_dropout",
                self.boft_dropout, "must be in [0, 1)")
        require(self.bias in BIAS_MODES, "bias", self.bias, f"must be one of {BIAS_MODES} ('boft_only' is not "
                "supported yet)")
        require(isinstance(self.init_weights, bool), "init_weights", self.init_weights, "must be true or false")
        self.fan_in_fan_out = no_fan_in_fan_out(self.fan_in_fan_out, "BOFT")

    def supports(self, base: BaseLayer) -> bool:
        return oft_kind(base) is not None

    def validate_target(self, base: BaseLayer, module_name: str) -> None:
        validate_rotation_target(base, module_name, "BOFT")
        super().validate_target(base, module_name)
        butterfly_layout(filter_dim(base), self, module_name)

    def make_adapter(self, base: BaseLayer, module_name: str, shared: nn.Module | None = None) -> BOFTAdapter:
        return BOFTAdapter(base, *butterfly_layout(filter_dim(base), self, module_name), self)
