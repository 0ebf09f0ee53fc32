"""Stacking and AdapterFusion of bottleneck adapters.

AdapterFusion: Non-Destructive Task Composition for Transfer Learning (Pfeiffer et al. 2021,
arXiv:2005.00247). Several trained bottleneck adapters stay frozen; at every place where all of them
sit, a fusion layer attends over their outputs and only the fusion layer trains:

    h = block(x)                          (the frozen block's output, the query)
    u_i = adapter_i(x, h) - h             (..., n, d)   each adapter's update s * W_up act(W_down .)
    a = softmax_i( (Q h) . (K u_i) / T )  (..., n)
    out = h + sum_i a_i * (V u_i)         (..., d)      V has no bias

This is the `adapters` package's (AdapterHub's) BertFusion with its default "dynamic" config: keys and
values are the adapters' up-projections (`bottleneck_up`), the residual is added after the attention
(`residual_before: false`), so io/adapterhub.py maps a fusion layer both ways weight for weight.
Init rule: Q = 0, K ~ N(0, 0.02^2), V = identity, Q and K biases 0, so the fused model starts at the
plain average of its adapters' outputs (the paper initialises V to the identity for the same reason; Q = 0
makes the start exact while K still receives gradient through Q's first step).

Stacking needs no new module: several bottleneck adapters active at once apply one after the other
(`stack_adapters(model, ["lang", "task"])`: out = task(lang(h))).

Files: the fusion is an adapter of its own (`peft_type` "BOTTLENECK_FUSION", keys `fusion_query.*`,
`fusion_key.*`, `fusion_value.weight` per layer); `adapter_names` in its config names the adapters it fuses,
which must be loaded first. Not mergeable, like the adapters it fuses.

    add_fusion(model, ["a", "b"], "ab")         # adds and activates the fusion; only it trains
    model.save_pretrained(d)                    # a, b and ab, each in its subfolder
    model = DeltaModel.from_pretrained(base, d / "a", adapter_name="a")
    model.load_adapter(d / "b", "b"); model.load_adapter(d / "ab", "ab"); model.set_adapter("ab")
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..core.base import BaseLayer
from ..core.call import CallContext
from ..core.config import DeltaConfig, DeltaConfigError, register_method, require
from ..core.layer import DeltaLayer
from ..core.protocols import LayerAdapter, ModelLevel

BOTTLENECK = "BOTTLENECK"


def _check_bottlenecks(model, adapter_names: list[str]) -> None:
    for name in adapter_names:
        if name not in model.peft_config:
            raise ValueError(f"unknown adapter {name!r}; adapters: {list(model.peft_config)}")
        if model.peft_config[name].peft_type != BOTTLENECK:
            raise DeltaConfigError(f"adapter {name!r} is {model.peft_config[name].peft_type}; stacking and "
                                   f"fusion take {BOTTLENECK} adapters")


def stack_adapters(model, adapter_names: list[str]) -> None:
    """Activate bottleneck adapters as a stack: each applies to the output of the one before, in order."""
    _check_bottlenecks(model, adapter_names)
    model.set_adapter(list(adapter_names))


def add_fusion(model, adapter_names: list[str], fusion_name: str, temperature: float = 1.0,
               activate: bool = True) -> None:
    """Add an AdapterFusion layer over `adapter_names` wherever all of them sit, named `fusion_name`.

    Args:
        model: a DeltaModel holding the bottleneck adapters.
        adapter_names: the adapters to fuse (they stay frozen while the fusion is active).
        fusion_name: the new adapter's name.
        temperature: T in the attention softmax.
        activate: make the fusion the active (and only trainable) adapter.
    """
    _check_bottlenecks(model, adapter_names)
    targets = [name for name, layer in model.delta_layers()
               if isinstance(layer, DeltaLayer) and all(n in layer.adapters for n in adapter_names)]
    if not targets:
        raise DeltaConfigError(f"adapters {adapter_names} share no layer, so there is nothing to fuse")
    model.add_adapter(fusion_name, AdapterFusionConfig(adapter_names=list(adapter_names), target_modules=targets,
                                                       temperature=temperature))
    if activate:
        model.set_adapter(fusion_name)


class FusionModelState(nn.Module, ModelLevel):
    """Model-level part of a fusion: no tensors (so nothing is saved under its `disk_prefix`); keeps a
    reference to the model (outside the module tree) so each layer can find the adapters it fuses."""

    disk_prefix = ""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self._model = [model]  # a list, so the model is not registered as a submodule

    @property
    def model(self) -> nn.Module:
        return self._model[0]


class FusionAdapter(nn.Module, LayerAdapter):
    """Attention over the outputs of several bottleneck adapters at one layer. Neither Additive nor
    Reparameterizing (core/protocols.py): the attention weights depend on the input, so no weight holds it."""

    merge_rule = "unmergeable"

    def __init__(self, width: int, adapter_names: list[str], layer: DeltaLayer, temperature: float) -> None:
        super().__init__()
        like = layer.adapters[adapter_names[0]].adapter_up.weight
        factory = {"device": like.device, "dtype": like.dtype}
        self.fusion_query = nn.Linear(width, width, **factory)
        self.fusion_key = nn.Linear(width, width, **factory)
        self.fusion_value = nn.Linear(width, width, bias=False, **factory)  # as in `adapters`
        with torch.no_grad():
            self.fusion_query.weight.zero_()
            nn.init.normal_(self.fusion_key.weight, std=0.02)
            self.fusion_value.weight.copy_(torch.eye(width, **factory))
            for linear in (self.fusion_query, self.fusion_key):
                linear.bias.zero_()
        self.adapter_names = list(adapter_names)
        self.temperature = temperature
        self._layer = [layer]  # the DeltaLayer holding the fused adapters, outside the module tree

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base: BaseLayer, call: CallContext,
                owns_base_out: bool = False) -> torch.Tensor:
        adapters = self._layer[0].adapters
        missing = [n for n in self.adapter_names if n not in adapters]
        if missing:
            raise RuntimeError(f"fusion over {self.adapter_names}: adapter(s) {missing} were deleted")
        updates = torch.stack([adapters[n].update(x, base_out) for n in self.adapter_names], dim=-2)  # (..., n, d)
        updates = updates.to(self.fusion_key.weight.dtype)
        query = self.fusion_query(base_out.to(updates.dtype)).unsqueeze(-1)  # (..., d, 1)
        scores = (self.fusion_key(updates) @ query).squeeze(-1) / self.temperature  # (..., n)
        weights = torch.softmax(scores, dim=-1).unsqueeze(-1)  # (..., n, 1)
        fused = (weights * self.fusion_value(updates)).sum(dim=-2)  # (..., d)
        return base_out + fused.to(base_out.dtype)

    def merge_refusal(self) -> str:
        return "AdapterFusion's attention over adapter outputs depends on the input"

    def extra_repr(self) -> str:
        return f"adapters={self.adapter_names}, temperature={self.temperature:g}"


@register_method
@dataclass
class AdapterFusionConfig(DeltaConfig):
    """An AdapterFusion layer over the bottleneck adapters `adapter_names` (see `add_fusion`)."""

    peft_type = "BOTTLENECK_FUSION"
    adapter_types = (FusionAdapter,)
    model_adapter_type = FusionModelState
    adapter_names: list[str] = field(default_factory=list)
    temperature: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        names = self.adapter_names
        require(isinstance(names, (list, tuple)) and len(names) >= 2 and all(isinstance(n, str) for n in names)
                and len(set(names)) == len(names), "adapter_names", names,
                "must list two or more distinct adapter names")
        self.adapter_names = list(names)
        require(isinstance(self.temperature, (int, float)) and self.temperature > 0, "temperature",
                self.temperature, "must be a number > 0")

    def supports(self, base: BaseLayer) -> bool:
        return True  # what matters is the adapters at the layer, checked in make_adapter

    def make_model_adapter(self, model: nn.Module, adapter_name: str) -> FusionModelState:
        return FusionModelState(model)

    def make_adapter(self, base: BaseLayer, module_name: str, shared: FusionModelState | None = None
                     ) -> FusionAdapter:
        layer = shared.model.get_submodule(module_name)
        missing = [n for n in self.adapter_names if not isinstance(layer, DeltaLayer) or n not in layer.adapters]
        if missing:
            raise DeltaConfigError(f"fusion over {self.adapter_names}: adapter(s) {missing} have no module at "
                                   f"{module_name!r}; add or load them before the fusion")
        width = layer.adapters[self.adapter_names[0]].adapter_up.out_features
        return FusionAdapter(width, self.adapter_names, layer, self.temperature)
