"""LoHa: low-rank Hadamard product (FedPara, Hyeon-Woo et al. 2021, arXiv:2108.06098; LyCORIS,
Yeh et al. 2023, arXiv:2309.14859).

Update rule: delta W = s * (W1a @ W1b) ⊙ (W2a @ W2b), s = alpha / r. The Hadamard product of two rank-r
matrices has rank up to r², so LoHa reaches more of weight space than LoRA for the same parameters.
Init rule: W1a, W1b, W2a ~ kaiming-uniform(a=sqrt(5)), W2b = 0, so delta W = 0 at start
(init_weights=False: W2b is random too, for tests).

Shapes (PEFT's names and layouts, so files interchange):
  Linear (out, in), and conv flattened to (out, in/groups * k...):
      hada_w1_a, hada_w2_a (out, r)     hada_w1_b, hada_w2_b (r, in * k...)
  Conv with use_effective_conv2d and a kernel wider than 1 (CP form of each product):
      hada_t1, hada_t2 (r, r, k1, k2)   (Conv1d: (r, r, k, 1))
      hada_w1_a, hada_w2_a (r, out)     hada_w1_b, hada_w2_b (r, in/groups)
      W1a @ W1b is replaced by einsum(t1, w1_a, w1_b) -> (out, in, k1, k2), likewise for W2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..core.base import BaseLayer
from ..core.config import register_method, require
from ._lycoris import LycorisAdapter, LycorisConfig, cp_weight, effective_conv


class LoHaAdapter(LycorisAdapter):
    """One LoHa adapter for one nn.Linear / nn.Conv1d / nn.Conv2d."""

    def __init__(self, base: BaseLayer, r: int, scaling: float, config: LoHaConfig, effective: bool) -> None:
        # PEFT always rescales LoHa's rank dropout
        super().__init__(base, scaling, config.rank_dropout, config.module_dropout, rank_dropout_scale=True)
        self.r, self.effective = r, effective
        out_f, in_f, *kernel = self.weight_shape
        factory = base.factory  # the base's device and dtype

        def param(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.empty(*shape, **factory))

        if effective:
            core = (r, r, *kernel) if len(kernel) == 2 else (r, r, kernel[0], 1)
            self.hada_t1, self.hada_t2 = param(*core), param(*core)
            self.hada_w1_a, self.hada_w2_a = param(r, out_f), param(r, out_f)
            self.hada_w1_b, self.hada_w2_b = param(r, in_f), param(r, in_f)
        else:
            flat_in = in_f * math.prod(kernel)
            self.hada_w1_a, self.hada_w2_a = param(out_f, r), param(out_f, r)
            self.hada_w1_b, self.hada_w2_b = param(r, flat_in), param(r, flat_in)
        for p in self.parameters():
            nn.init.kaiming_uniform_(p, a=math.sqrt(5))
        if config.init_weights:
            nn.init.zeros_(self.hada_w2_b)  # one zero factor makes delta W = 0

    def make_delta(self) -> torch.Tensor:
        if self.effective:
            first = cp_weight(self.hada_t1, self.hada_w1_a, self.hada_w1_b)  # (out, in, k1, k2)
            second = cp_weight(self.hada_t2, self.hada_w2_a, self.hada_w2_b)
        else:
            first = self.hada_w1_a @ self.hada_w1_b  # (out, in * k...)
            second = self.hada_w2_a @ self.hada_w2_b
        return (first * second * self.scaling).reshape(self.weight_shape)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, r={self.r}, scaling={self.scaling:g}, effective_conv={self.effective}"


@register_method
@dataclass
class LoHaConfig(LycorisConfig):
    """LoHa settings; field names as in Hugging Face PEFT's LoHaConfig."""

    peft_type = "LOHA"
    adapter_types = (LoHaAdapter,)
    init_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        require(isinstance(self.init_weights, bool), "init_weights", self.init_weights, "must be true or false")

    def make_adapter(self, base: BaseLayer, module_name: str, shared: nn.Module | None = None) -> LoHaAdapter:
        r, scaling = self.rank_and_scaling(module_name)
        return LoHaAdapter(base, r, scaling, self, effective_conv(base, self.use_effective_conv2d))
