"""IA3: Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning
(Liu et al. 2022, arXiv:2205.05638), "(IA)^3: Infused Adapter by Inhibiting and Amplifying Inner Activations".

Update rule: a learned vector l rescales activations elementwise.
    attention keys / values (and any other target):  out = l * (W x + b)      l: (out, 1)
    feed-forward modules (`feedforward_modules`):    out = W (l * x) + b      l: (1, in)
Init rule: l = 1, so the adapted model starts equal to the base (`init_ia3_weights=False`: l ~ N(0, 1)).

Merge is multiplicative, not additive: W' = W * l on the output rows (and b' = b * l) or on the input
columns for feed-forward modules; unmerge divides. Files interchange with Hugging Face PEFT: one tensor
`ia3_l` per module, shaped as above; a weight stored (in, out) is known from the base-layer view
(core/base.py), as PEFT knows it from the layer's type (`fan_in_fan_out` is kept for its files). Layers:
linear layers of any layout and storage (quantized ones too). Feed-forward modules are matched with
PEFT's rule (a list entry matches a name that ends with it, no dot needed), so both libraries give each
tensor the same shape.

Several IA3 adapters active on one layer: output scalings multiply; input scalings of feed-forward
modules add their terms, W((l1 + l2 - 1) x), since each adapter only sees the output of the one before
it. The merged weight is the same (core/merging.py plans merges from what the forward computes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..core.base import BaseLayer
from ..core.call import CallContext
from ..core.config import DeltaConfig, DeltaConfigError, register_method, require
from ..core.merging import nonfinite_refusal
from ..core.protocols import Reparameterizing
from ..core.targeting import fullmatch
from ..errors import MergeError

# Hugging Face PEFT's default IA3 targets for Llama, GPT-2, BERT and T5 in one list: a name only
# matches in the architecture that has it, so the union works on each of them unchanged.
DEFAULT_TARGETS = ["k_proj", "v_proj", "down_proj", "c_attn", "mlp.c_proj", "key", "value", "output.dense",
                   "k", "v", "wo"]
DEFAULT_FEEDFORWARD = ["down_proj", "mlp.c_proj", "output.dense", "wo"]


def is_feedforward(patterns: list[str] | str | None, module_name: str) -> bool:
    """PEFT's rule, kept so that files agree on each tensor's shape: a regex must match the whole name
    (time-bounded, core/targeting.py); a list entry matches when the name ends with it."""
    if not patterns:
        return False
    if isinstance(patterns, str):
        return fullmatch(patterns, module_name, f"feedforward_modules={patterns!r}")
    return any(module_name.endswith(p) for p in patterns)


class IA3Adapter(nn.Module, Reparameterizing):
    """One IA3 scaling vector for one linear layer. Reparameterizing, not Additive: its merge multiplies the
    weight and (output scaling) the bias, which no weight delta alone carries."""

    merge_refusal = nonfinite_refusal  # NaN/inf refused before any layer is merged (core/merging.py)

    @property
    def merge_rule(self) -> str:
        """Output scaling rescales the output so far; input scaling adds W ((l - 1) x) (core/merging.py)."""
        return "reads_base" if self.feedforward else "sequential"

    def __init__(self, base: BaseLayer, feedforward: bool, init_ones: bool) -> None:
        super().__init__()
        self.feedforward = feedforward
        # a quantized base's weight is packed: the view gives the widths and the dtype it computes in
        factory = base.factory
        shape = (1, base.in_features) if feedforward else (base.out_features, 1)
        self.ia3_l = nn.Parameter(torch.ones(shape, **factory) if init_ones else torch.randn(shape, **factory))

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base: BaseLayer, call: CallContext,
                owns_base_out: bool = False) -> torch.Tensor:
        scale = self.ia3_l.flatten()
        if not self.feedforward:
            return (base_out * scale).to(base_out.dtype)
        # W (l * x) + b = base_out + W ((l - 1) * x): the base layer's own forward (so a quantized base
        # works as it is), minus the bias it adds a second time.
        extra = base(((scale - 1) * x.to(scale.dtype)).to(x.dtype))
        if base.bias is not None:
            extra = extra - base.bias
        return base_out + extra.to(base_out.dtype)

    # ------------------------------------------------------------ merge: multiply in, divide out
    def _weight_scale(self) -> torch.Tensor:
        """l shaped to multiply the out-first (out, in) weight."""
        return self.ia3_l.detach().float().reshape(1, -1) if self.feedforward else \
            self.ia3_l.detach().float().reshape(-1, 1)

    def _scale_bias(self, base: BaseLayer, factor: torch.Tensor) -> None:
        # The core plans and writes `weight` only, so the bias is scaled here, once the merged weight
        # is known to be finite; it is checked before it is written (core restores it on a refusal).
        if self.feedforward or base.bias is None:
            return
        bias = base.bias.detach().float() * factor.reshape(-1)
        if not torch.isfinite(bias).all():
            raise MergeError("IA3 merge gives a NaN/inf bias; nothing was written")
        base.bias.data.copy_(bias.to(base.bias.dtype))

    def merged_weight(self, base: BaseLayer, weight: torch.Tensor, reference: dict[str, torch.Tensor]
                      ) -> torch.Tensor:
        merged = base.from_out_first(base.to_out_first(weight) * self._weight_scale())
        if torch.isfinite(merged).all():
            self._scale_bias(base, self._weight_scale())
        return merged

    def unmerged_weight(self, base: BaseLayer, weight: torch.Tensor) -> torch.Tensor:
        self._scale_bias(base, 1 / self._weight_scale())
        return base.from_out_first(base.to_out_first(weight) / self._weight_scale())

    def extra_repr(self) -> str:
        return f"feedforward={self.feedforward}, shape={tuple(self.ia3_l.shape)}"


@register_method
@dataclass
class IA3Config(DeltaConfig):
    """IA3 learned scaling vectors; field names as in Hugging Face PEFT's IA3Config."""

    peft_type = "IA3"
    adapter_types = (IA3Adapter,)
    saves_layer_selection = False
    default_target_modules = tuple(DEFAULT_TARGETS)
    feedforward_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False
    init_ia3_weights: bool = True

    def __post_init__(self) -> None:
        if self.target_modules is None:
            self.target_modules = list(DEFAULT_TARGETS)
            if self.feedforward_modules is None:
                self.feedforward_modules = list(DEFAULT_FEEDFORWARD)
        super().__post_init__()
        ff = self.feedforward_modules
        require(ff is None or isinstance(ff, str) or all(isinstance(p, str) for p in ff),
                "feedforward_modules", ff, "must be a string (regex) or a list of strings")
        if ff is not None and not isinstance(ff, str):
            self.feedforward_modules = list(ff)
        # PEFT's rule: with both given as lists, every feed-forward module must also be a target
        if isinstance(self.target_modules, list) and isinstance(self.feedforward_modules, list):
            extra = sorted(set(self.feedforward_modules) - set(self.target_modules))
            require(not extra, "feedforward_modules", self.feedforward_modules,
                    f"must be a subset of target_modules; not targeted: {extra}")
        require(isinstance(self.init_ia3_weights, bool), "init_ia3_weights", self.init_ia3_weights, "must be a bool")

    def supports(self, base: BaseLayer) -> bool:
        return base.kind == "linear"  # nn.Linear, a weight stored (in, out), quantized linear layers

    def validate_target(self, base: BaseLayer, module_name: str) -> None:
        if not self.supports(base):
            raise DeltaConfigError(f"target module {module_name!r} is a {type(base.module).__name__}; IA3 "
                                   "adapts linear layers (nn.Linear, Transformers' (in, out) layout, "
                                   "quantized)")

    def module_keys(self) -> dict:
        ff = self.feedforward_modules
        if not ff or ff == list(DEFAULT_FEEDFORWARD):  # the default names modules of several architectures
            return {}
        entries = [ff] if isinstance(ff, str) else ff
        return {"feedforward_modules": (entries, lambda entry, name: is_feedforward(
            entry if isinstance(ff, str) else [entry], name))}

    def make_adapter(self, base: BaseLayer, module_name: str, shared: nn.Module | None = None) -> IA3Adapter:
        return IA3Adapter(base, is_feedforward(self.feedforward_modules, module_name), self.init_ia3_weights)
