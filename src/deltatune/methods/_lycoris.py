"""What LoHa (loha.py) and LoKr (lokr.py) share, the LyCORIS family (arXiv:2309.14859): the config
fields, which base layers they adapt, and how an additive weight update reaches the layer output.

Both build a full-size update delta W (the base weight's shape) from small factors and add
F.linear(x, delta W) or conv(x, delta W) to the base output, exactly as Hugging Face PEFT does. Training
extras, as in PEFT: `module_dropout` skips the whole adapter for a step with that probability;
`rank_dropout` zeroes whole output channels of delta W (and, optionally, rescales the survivors).

Supported bases (core's view, core/base.py): linear layers stored (out, in), nn.Conv1d, nn.Conv2d (grouped
convs too). A linear layer stored (in, out) (fan_in_fan_out: GPT-2's) is refused: PEFT cannot load LoHa/LoKr
files for it, and these files must move both ways.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..core.base import BaseLayer
from ..core.call import CallContext
from ..core.config import DeltaConfig, DeltaConfigError, require
from ..core.protocols import Additive
from ..core.targeting import pattern_value


def lycoris_kind(base: BaseLayer) -> str | None:
    """'linear', 'conv1d', 'conv2d', or None when LoHa/LoKr cannot adapt `base` (a layer stored (in, out)
    has kind 'linear' too: validate_target refuses it by name)."""
    if base.kind == "linear":
        return "linear"
    if base.kind == "conv" and len(base.kernel_size) in (1, 2):
        return f"conv{len(base.kernel_size)}d"
    return None


def effective_conv(base: BaseLayer, use_effective_conv2d: bool) -> bool:
    """Whether the conv kernel gets its own CP core (FedPara "Proposition 3"); never for 1-wide kernels."""
    return use_effective_conv2d and lycoris_kind(base) != "linear" and any(k != 1 for k in base.kernel_size)


def cp_weight(core: torch.Tensor, out_factor: torch.Tensor, in_factor: torch.Tensor) -> torch.Tensor:
    """Tucker/CP rebuild of a conv kernel: core (r, r, k1, k2), out_factor (r, out), in_factor (r, in)
    -> (out, in, k1, k2)."""
    return torch.einsum("ijkl,ip,jr->prkl", core, out_factor, in_factor)


@dataclass
class LycorisConfig(DeltaConfig):
    """Fields LoHa and LoKr share (PEFT's names)."""

    supports_quantized = False  # LoHa and LoKr read the full base weight

    r: int = 8
    alpha: float = 8
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_effective_conv2d: bool = False
    init_weights: bool | str = True
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        require(isinstance(self.r, int) and not isinstance(self.r, bool) and self.r > 0, "r", self.r,
                "must be a positive integer")
        require(isinstance(self.alpha, (int, float)) and not isinstance(self.alpha, bool), "alpha", self.alpha,
                "must be a number")
        for name in ("rank_dropout", "module_dropout"):
            value = getattr(self, name)
            require(isinstance(value, (int, float)) and 0 <= value < 1, name, value, "must be in [0, 1)")
        require(isinstance(self.use_effective_conv2d, bool), "use_effective_conv2d", self.use_effective_conv2d,
                "must be true or false")
        for name in ("rank_pattern", "alpha_pattern"):
            require(isinstance(getattr(self, name), dict), name, getattr(self, name), "must be a dict")
        for key, value in self.rank_pattern.items():
            require(isinstance(value, int) and value > 0, f"rank_pattern[{key!r}]", value, "must be > 0")

    def supports(self, base: BaseLayer) -> bool:
        return lycoris_kind(base) is not None and not base.fan_in_fan_out

    def validate_target(self, base: BaseLayer, module_name: str) -> None:
        if base.fan_in_fan_out:
            raise DeltaConfigError(f"target module {module_name!r} is a {type(base.module).__name__} that "
                                   "stores its weight (in, out) (fan_in_fan_out, GPT-2 style); "
                                   f"{self.peft_type} adapts nn.Linear, nn.Conv1d and nn.Conv2d only, as PEFT does")
        super().validate_target(base, module_name)

    def rank_and_scaling(self, module_name: str) -> tuple[int, float]:
        r = pattern_value(self.rank_pattern, module_name, self.r)
        return r, pattern_value(self.alpha_pattern, module_name, self.alpha) / r


class LycorisAdapter(nn.Module, Additive):
    """An additive update built from factors; subclasses define `make_delta()` (base weight's shape)."""

    merge_rule = "additive"

    def __init__(self, base: BaseLayer, scaling: float, rank_dropout: float, module_dropout: float,
                 rank_dropout_scale: bool) -> None:
        super().__init__()
        self.kind = lycoris_kind(base)
        self.weight_shape = tuple(base.weight.shape)  # (out, in/groups, *kernel)
        self.scaling = scaling
        self.rank_dropout, self.module_dropout = rank_dropout, module_dropout
        self.rank_dropout_scale = rank_dropout_scale

    def make_delta(self) -> torch.Tensor:
        raise NotImplementedError

    def delta_weight(self, base: BaseLayer) -> torch.Tensor:
        """scaling * (the method's product of factors), in the base weight's shape: the whole update (the
        dropouts act in training forwards only)."""
        return self.make_delta()

    def merge_refusal(self) -> str | None:
        return None

    def call_delta(self, call: CallContext) -> torch.Tensor:
        """make_delta(), built once per layer for a whole generate() call (`call.repeated`, no gradient): the
        factors cannot change between its decode steps, and rebuilding a weight-sized update for every token
        made LoHa/LoKr decoding several times slower than LoRA's. Costs one weight-sized tensor per adapted
        layer while the call runs."""
        if not call.repeated or self.training or torch.is_grad_enabled():
            return self.make_delta()
        key = ("lycoris_delta", id(self))
        if key not in call.memo:
            call.memo[key] = self.make_delta()
        return call.memo[key]

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base: BaseLayer, call: CallContext,
                owns_base_out: bool = False) -> torch.Tensor:
        if self.training and self.module_dropout and torch.rand(1).item() <= self.module_dropout:
            return base_out  # the whole adapter sits this step out
        delta = self.call_delta(call)
        if self.training and self.rank_dropout:
            keep = (torch.rand(delta.shape[0], device=delta.device) > self.rank_dropout).to(delta.dtype)
            if self.rank_dropout_scale:
                keep = keep / keep.mean().clamp_min(1e-12)
            delta = delta * keep.view(-1, *[1] * (delta.dim() - 1))
        x = x.to(delta.dtype)
        if self.kind == "linear":
            update = F.linear(x, delta)
        else:  # the base's own conv (stride, padding mode, dilation, groups), without its bias
            update = base._conv_forward(x, delta, None)
        return base_out + update.to(base_out.dtype)
