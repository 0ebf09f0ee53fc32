"""LoKr: low-rank Kronecker product (LyCORIS, Yeh et al. 2023, arXiv:2309.14859; KronA, Edalati et al.
2022, arXiv:2212.10650).

Update rule: delta W = s * W1 ⊗ W2 (Kronecker product), s = alpha / r. The dimensions are factorised,
out = a * b and in = c * d, with W1 (a, c) small and W2 (b, d[, k...]) the rest; either factor may itself
be low-rank, W1 = W1a @ W1b, W2 = W2a @ W2b. `decompose_factor` picks the split (-1: the divisor pair
nearest the square root; f > 0: f and dim / f when f divides dim). W2 is low-rank when r < max(b, d) / 2;
W1 only with `decompose_both` and r < max(a, c) / 2. For a conv with `use_effective_conv2d` and a low-rank
W2, W2 = einsum(t2, w2_a, w2_b) (CP form). The Kronecker product and the reshape to the base weight's
shape are PEFT's (torch.kron, then reshape), so files interchange with identical numbers.
Init rule: W1 = 0 (or W1a = 0), everything else kaiming-uniform(a=sqrt(5)), so delta W = 0;
init_weights="lycoris": W2 = 0 (or W2b = 0) instead; False: all random.

Shapes (PEFT's names):
  lokr_w1 (a, c)               or  lokr_w1_a (a, r), lokr_w1_b (r, c)
  lokr_w2 (b, d, *kernel)      or  lokr_w2_a (b, r), lokr_w2_b (r, d * k...)
                               or  lokr_t2 (r, r, k1, k2 | k, 1), lokr_w2_a (r, b), lokr_w2_b (r, d)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..core.base import BaseLayer
from ..core.config import register_method, require
from ._lycoris import LycorisAdapter, LycorisConfig, cp_weight, effective_conv

INIT_MODES = (True, False, "lycoris")


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """Split `dimension` into (m, n), m * n = dimension, as LyCORIS/PEFT do: (factor, dimension / factor)
    when factor > 0 divides it; otherwise the largest divisor m <= min(factor, sqrt-ish) found by walking
    divisors upward while m < n (factor -1: no limit). The smaller number comes first."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    limit = dimension if factor == -1 else factor
    m = 1
    for candidate in range(2, dimension + 1):
        if dimension % candidate:
            continue
        if m >= dimension // m or candidate > limit:
            break
        m = candidate
    n = dimension // m
    return (m, n) if m <= n else (n, m)


class LoKrAdapter(LycorisAdapter):
    """One LoKr adapter for one nn.Linear / nn.Conv1d / nn.Conv2d."""

    def __init__(self, base: BaseLayer, r: int, scaling: float, config: LoKrConfig, effective: bool) -> None:
        super().__init__(base, scaling, config.rank_dropout, config.module_dropout, config.rank_dropout_scale)
        self.r = r
        out_f, in_f, *kernel = self.weight_shape
        a, b = factorization(out_f, config.decompose_factor)  # out = a * b
        c, d = factorization(in_f, config.decompose_factor)  # in = c * d
        full_w1 = not (config.decompose_both and r < max(a, c) / 2)
        full_w2 = r >= max(b, d) / 2
        factory = base.factory  # the base's device and dtype

        def param(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.empty(*shape, **factory))

        if full_w1:
            self.lokr_w1 = param(a, c)
        else:
            self.lokr_w1_a, self.lokr_w1_b = param(a, r), param(r, c)
        if full_w2:
            self.lokr_w2 = param(b, d, *kernel)
        elif effective:
            self.lokr_t2 = param(r, r, *kernel) if len(kernel) == 2 else param(r, r, kernel[0], 1)
            self.lokr_w2_a, self.lokr_w2_b = param(r, b), param(r, d)
        else:
            self.lokr_w2_a, self.lokr_w2_b = param(b, r), param(r, d * math.prod(kernel))
        self._init(config.init_weights)

    def _init(self, init: bool | str) -> None:
        for p in self.parameters():
            nn.init.kaiming_uniform_(p, a=math.sqrt(5))
        if init is True:  # W1 (or its left factor) = 0
            nn.init.zeros_(self.lokr_w1 if hasattr(self, "lokr_w1") else self.lokr_w1_a)
        elif init == "lycoris":  # W2 (or its right factor) = 0
            nn.init.zeros_(self.lokr_w2 if hasattr(self, "lokr_w2") else self.lokr_w2_b)

    def make_delta(self) -> torch.Tensor:
        w1 = self.lokr_w1 if hasattr(self, "lokr_w1") else self.lokr_w1_a @ self.lokr_w1_b  # (a, c)
        if hasattr(self, "lokr_w2"):
            w2 = self.lokr_w2  # (b, d, *kernel)
        elif hasattr(self, "lokr_t2"):
            w2 = cp_weight(self.lokr_t2, self.lokr_w2_a, self.lokr_w2_b)  # (b, d, k1, k2)
        else:
            w2 = self.lokr_w2_a @ self.lokr_w2_b  # (b, d * k...)
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        # Rebuild plain strides: torch.kron fails on the odd stride einsum leaves on a size-1 dim
        # (PEFT 0.21.2 fails there, e.g. LoKr on Conv1d with use_effective_conv2d).
        w2 = w2.flatten().view(w2.shape)
        return (torch.kron(w1, w2) * self.scaling).reshape(self.weight_shape)

    def extra_repr(self) -> str:
        shapes = {n: tuple(p.shape) for n, p in self.named_parameters()}
        return f"kind={self.kind}, r={self.r}, scaling={self.scaling:g}, factors={shapes}"


@register_method
@dataclass
class LoKrConfig(LycorisConfig):
    """LoKr settings; field names as in Hugging Face PEFT's LoKrConfig."""

    peft_type = "LOKR"
    adapter_types = (LoKrAdapter,)
    decompose_both: bool = False
    decompose_factor: int = -1
    rank_dropout_scale: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        require(isinstance(self.init_weights, bool) or self.init_weights == "lycoris", "init_weights",
                self.init_weights, f"must be one of {INIT_MODES}")
        require(isinstance(self.decompose_factor, int) and (self.decompose_factor == -1 or self.decompose_factor > 0),
                "decompose_factor", self.decompose_factor, "must be -1 (near square root) or a positive integer")

    def make_adapter(self, base: BaseLayer, module_name: str, shared: nn.Module | None = None) -> LoKrAdapter:
        r, scaling = self.rank_and_scaling(module_name)
        return LoKrAdapter(base, r, scaling, self, effective_conv(base, self.use_effective_conv2d))
