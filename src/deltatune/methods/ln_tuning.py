"""LN tuning: Tuning LayerNorm in Attention: Towards Efficient Multi-Modal LLM Finetuning
(Zhao et al. 2023, arXiv:2312.11420).

Update rule: only the normalisation layers' own parameters train (gain and, where the layer has one,
bias). Each adapter holds a full trainable copy of its norm layer, `ln_tuning_layers`, and the layer's
output is the copy's output: out = LN_copy(x).
Init rule: the copy starts equal to the base layer, so the adapted model starts equal to the base.

Keys and semantics match Hugging Face PEFT's LN_TUNING (`<module>.ln_tuning_layers.weight` / `.bias`),
so files interchange. Merging copies the adapter's parameters into the base layer and keeps the
originals to restore them exactly on unmerge. With several LN-tuning adapters active on one layer the
last one wins (PEFT refuses more than one), in forward and in merge alike.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from ..core.base import BaseLayer
from ..core.call import CallContext
from ..core.config import DeltaConfig, DeltaConfigError, register_method
from ..core.merging import nonfinite_refusal
from ..core.protocols import Reparameterizing
from ..errors import MergeError

# Hugging Face PEFT's default LN-tuning targets for Llama, GPT-2, T5 (and BERT's "LayerNorm") in one list;
# each name only matches in the architecture that has it.
DEFAULT_TARGETS = ["input_layernorm", "post_attention_layernorm", "norm", "ln_1", "ln_2", "ln_f",
                   "layer_norm", "final_layer_norm", "LayerNorm"]


class LNTuningAdapter(nn.Module, Reparameterizing):
    """A trainable copy of one normalisation layer. Reparameterizing: its merge writes the copy's values
    (weight and bias) into the base layer, which replaces the output rather than adding to it."""

    merge_rule = "sequential"  # the copy's output replaces what came before (core/merging.py)
    merge_refusal = nonfinite_refusal  # NaN/inf refused before any layer is merged (core/merging.py)

    def __init__(self, base: BaseLayer) -> None:
        super().__init__()
        self.ln_tuning_layers = copy.deepcopy(base.module)  # a module of the same type, with its values
        self._originals: dict[str, torch.Tensor] = {}  # base parameters while merged (exact unmerge)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base: BaseLayer, call: CallContext,
                owns_base_out: bool = False) -> torch.Tensor:
        return self.ln_tuning_layers(x)

    # ------------------------------------------------------------ merge: the copy's values go into the base
    def _others(self, base: BaseLayer) -> dict[str, nn.Parameter]:
        """Direct parameters besides `weight` (the core writes the weight; these are written here)."""
        return {n: p for n, p in base.named_parameters(recurse=False) if n != "weight"}

    def merged_weight(self, base: BaseLayer, weight: torch.Tensor, reference: dict[str, torch.Tensor]
                      ) -> torch.Tensor:
        own = dict(self.ln_tuning_layers.named_parameters(recurse=False))
        if not all(torch.isfinite(p).all() for p in own.values()):
            raise MergeError("LN-tuning merge would write NaN/inf parameters; nothing was written")
        self._originals = {"weight": weight.clone()}
        for name, param in self._others(base).items():
            self._originals[name] = param.detach().clone()
            param.data.copy_(own[name].detach())
        return own["weight"].detach().float().clone()

    def unmerged_weight(self, base: BaseLayer, weight: torch.Tensor) -> torch.Tensor:
        for name, param in self._others(base).items():
            param.data.copy_(self._originals[name])
        original = self._originals.pop("weight")
        self._originals = {}
        return original


@register_method
@dataclass
class LNTuningConfig(DeltaConfig):
    """Train only normalisation layers; field names as in Hugging Face PEFT's LNTuningConfig."""

    peft_type = "LN_TUNING"
    adapter_types = (LNTuningAdapter,)
    saves_layer_selection = False
    default_target_modules = tuple(DEFAULT_TARGETS)

    def __post_init__(self) -> None:
        if self.target_modules is None:
            self.target_modules = list(DEFAULT_TARGETS)
        super().__post_init__()

    def supports(self, base: BaseLayer) -> bool:
        # A leaf layer with a `weight`: norm layers of any kind (LayerNorm, RMSNorm, T5LayerNorm, ...)
        return isinstance(getattr(base, "weight", None), nn.Parameter) and not list(base.children())

    def validate_target(self, base: BaseLayer, module_name: str) -> None:
        if not self.supports(base):
            raise DeltaConfigError(f"target module {module_name!r} is a {type(base.module).__name__}; LN tuning "
                                   "adapts leaf layers with a `weight` parameter (normalisation layers)")

    def make_adapter(self, base: BaseLayer, module_name: str, shared: nn.Module | None = None) -> LNTuningAdapter:
        return LNTuningAdapter(base)
