"""BitFit: Simple Parameter-efficient Fine-tuning for Transformer-based Masked Language-models
(Ben Zaken et al. 2021, arXiv:2106.10199).

Update rule: only bias terms train. Each adapted layer gets its own delta bias d (one per output
channel) added to the layer's output:  out = base(x) + d  =  W x + (b + d).
Init rule: d = 0, so the adapted model starts equal to the base.

Keeping the trained part as a delta (rather than training b in place) lets several BitFit adapters live
on one model, switch, mix per sample and be disabled like any other adapter. Merging adds d into the
base layer's bias; a layer without one (Llama's linear layers, `add_missing_bias=True`) gets a new bias
parameter at merge time, removed again on unmerge. A plain model saved after `merge_and_unload` then
carries `*.bias` tensors its Transformers config does not expect (`attention_bias=False`, ...).

Shapes: linear layers (any weight layout): d (out_features,); LayerNorm: d (normalized_shape); Conv{1,2,3}d:
d (out_channels,), added along the channel axis. The task head trains in full through `modules_to_save`
(or `task_type="SEQ_CLS"`, which adds the classifier head).
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
from ..errors import MergeError


def out_shape(base: BaseLayer) -> tuple[int, ...] | None:
    """The shape of `base`'s bias, or None when BitFit cannot adapt this kind of layer."""
    if base.kind == "linear":  # any layout or storage: the view knows the output width
        return (base.out_features,)
    if base.kind == "conv":
        return (base.out_channels,)
    # LayerNorm only among the norms: its forward adds its `bias`, so a merge into it holds (RMSNorm has none)
    if isinstance(base.module, nn.LayerNorm) and base.weight is not None:
        return tuple(base.normalized_shape)
    return None


class BitFitAdapter(nn.Module, Reparameterizing):
    """One delta bias for one layer. Reparameterizing, not Additive: its merge writes the base's bias and
    leaves the weight as it is (a weight delta of zero would not be its update)."""

    merge_rule = "additive"  # adds to the bias, whatever came before (core/merging.py)
    merge_refusal = nonfinite_refusal  # NaN/inf refused before any layer is merged (core/merging.py)

    def __init__(self, base: BaseLayer) -> None:
        super().__init__()
        self.channel_dim = 1 if base.kind == "conv" else -1
        self.bitfit_bias = nn.Parameter(torch.zeros(out_shape(base), **base.factory))
        self._created_bias = False  # whether a merge gave the base its bias (removed again on unmerge)

    def _broadcast(self, out: torch.Tensor) -> torch.Tensor:
        if self.channel_dim == -1:
            return self.bitfit_bias
        shape = [1] * out.dim()
        shape[1] = -1  # (out_channels, 1, ...) for a conv's (batch, channels, *spatial) output
        return self.bitfit_bias.view(shape)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base: BaseLayer, call: CallContext,
                owns_base_out: bool = False) -> torch.Tensor:
        return base_out + self._broadcast(base_out).to(base_out.dtype)

    # ------------------------------------------------------------ merge: into the base bias
    # The core plans and writes `weight` only: the weight is returned unchanged and the bias is written
    # here, after a finiteness check (core restores it exactly if the merge is refused).
    def merged_weight(self, base: BaseLayer, weight: torch.Tensor, reference: dict[str, torch.Tensor]
                      ) -> torch.Tensor:
        delta = self.bitfit_bias.detach()
        if not torch.isfinite(delta).all():
            raise MergeError("BitFit merge would write a NaN/inf bias; nothing was written")
        if base.bias is None:  # a bias-free layer gets one, in the dtype it computes in
            base.module.bias = nn.Parameter(torch.zeros_like(delta, dtype=base.factory["dtype"]),
                                            requires_grad=False)
            self._created_bias = True
        base.bias.data.copy_((base.bias.detach().float() + delta.float()).to(base.bias.dtype))
        return weight

    def unmerged_weight(self, base: BaseLayer, weight: torch.Tensor) -> torch.Tensor:
        if self._created_bias:
            base.module.bias = None
            self._created_bias = False
        else:
            restored = base.bias.detach().float() - self.bitfit_bias.detach().float()
            base.bias.data.copy_(restored.to(base.bias.dtype))
        return weight

    def extra_repr(self) -> str:
        return f"shape={tuple(self.bitfit_bias.shape)}"


@register_method
@dataclass
class BitFitConfig(DeltaConfig):
    """BitFit with per-adapter delta biases.

    Args:
        target_modules: layers whose bias trains. Default "all-linear" (every linear layer but the
            output head); list names to include norm layers too, e.g. BERT's
            ["query", "key", "value", "dense", "LayerNorm"].
        add_missing_bias: give layers without a bias a zero-initialised trainable one; when False such a
            target is an error that names it.
    """

    peft_type = "BITFIT"
    adapter_types = (BitFitAdapter,)
    add_missing_bias: bool = False

    def __post_init__(self) -> None:
        if self.target_modules is None:
            self.target_modules = "all-linear"
        super().__post_init__()
        require(isinstance(self.add_missing_bias, bool), "add_missing_bias", self.add_missing_bias, "must be a bool")

    def supports(self, base: BaseLayer) -> bool:
        return out_shape(base) is not None

    def validate_target(self, base: BaseLayer, module_name: str) -> None:
        if not self.supports(base):
            raise DeltaConfigError(f"target module {module_name!r} is a {type(base.module).__name__}; BitFit "
                                   "adapts linear layers (any layout), LayerNorm and Conv1d/2d/3d layers")
        if base.bias is None and not self.add_missing_bias:
            raise DeltaConfigError(f"target module {module_name!r} has no bias; set add_missing_bias=True to give "
                                   "it a zero-initialised trainable one, or leave it out of target_modules")

    def make_adapter(self, base: BaseLayer, module_name: str, shared: nn.Module | None = None) -> BitFitAdapter:
        return BitFitAdapter(base)
