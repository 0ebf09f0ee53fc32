"""DeltaLayer: one wrapped base module holding any number of named adapters.

All multi-adapter bookkeeping lives here, once: which adapters are active, which are merged into the
base weight, mixed-adapter batches (one adapter per sample), and the merge/unmerge arithmetic. A method
only provides a single-adapter module that follows the protocols in core/protocols.py; it gets the base
module as its view (core/base.py) and this call's context (core/call.py) as arguments.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from ..errors import MergeError
from .base import BaseLayer, read_weight, write_weight  # noqa: F401  (re-exported)
from .call import CallContext, CallSlot
from .merging import check_merge, merge_order, merge_rule
from .protocols import Additive, Batched, LayerAdapter, Reparameterizing, declares

BASE_ADAPTER = "__base__"  # the name that selects the plain model for a sample in a mixed batch


class DeltaLayer(nn.Module):
    """Wraps one base module (`base_layer`) and routes its forward through active adapters."""

    def __init__(self, base_layer: nn.Module, calls: CallSlot, module_name: str) -> None:
        super().__init__()
        self.base_layer = base_layer
        self._view = BaseLayer(base_layer)  # built here, not on first forward: a compiled model would retrace
        self.adapters = nn.ModuleDict()
        self.active: list[str] = []
        self.merged: list[str] = []
        self._merged_deltas: dict[str, torch.Tensor] = {}  # f(W0) - W0 of reads_base adapters not merged first
        self._planned_deltas: dict[str, torch.Tensor] = {}
        # the base's other parameters as the current plan found them (discard_plan); None: no plan
        self._planned_restore: dict | None = None
        # (original base module,) while a merge writes into a private copy; a tuple, so it is no submodule
        self._tied: tuple[nn.Module] | None = None
        self.module_name = module_name
        self.calls = calls
        self.train(base_layer.training)

    @property
    def base(self) -> BaseLayer:
        """The view of the base module the adapters get (rebuilt when the module is replaced: quantize, untie)."""
        view = self._view
        if view is None or view.module is not self.base_layer:
            view = self._view = BaseLayer(self.base_layer)
        return view

    @property
    def weight(self) -> torch.Tensor:
        """The base module's weight: model code that reads `module.weight` (dtype checks) keeps working."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    # ---------------------------------------------------------------- forward
    def forward(self, *args, **kwargs):
        out = self.base_layer(*args, **kwargs)
        call = self.calls.current
        if call.disabled or not self.adapters:
            return out
        x = args[0] if args else next(iter(kwargs.values()))  # blocks are often called with keywords
        if isinstance(out, tuple):  # e.g. an attention block's (hidden, weights)
            return (self._run_adapters(x, out[0], call, owned=False), *out[1:])
        return self._run_adapters(x, out, call, owned=True)

    def _run_adapters(self, x: torch.Tensor, out: torch.Tensor, call: CallContext, owned: bool) -> torch.Tensor:
        """`owned`: out is the base module's own output; adapters may add into it in place when the view says
        that output is a whole fresh tensor (core/base.py)."""
        if call.mixed:
            return self._mixed_forward(x, out, call)
        base = self.base
        owned = owned and base.output_is_fresh
        for name in self.active:
            if name not in self.merged and name in self.adapters:
                out = self.adapters[name](x, out, base, call, owns_base_out=owned)
        return out

    def _mixed_forward(self, x: torch.Tensor, base_out: torch.Tensor, call: CallContext) -> torch.Tensor:
        """One adapter per sample. Batched methods (core/protocols.py) get every sample in one call; others
        run once per distinct adapter on its rows. Never a loop over samples."""
        if self.merged:
            raise RuntimeError(f"{self.module_name}: mixed-adapter batches need unmerged adapters; "
                               f"call unmerge_adapter() first (merged: {self.merged})")
        index = call.index_for(x.shape[0])
        adapters = [self.adapters[n] if n in self.adapters else None for n in call.adapter_names]
        present = [a for a in adapters if a is not None]
        if not present:
            return base_out
        base = self.base
        kind = type(present[0])
        if declares(kind, Batched) and all(type(a) is kind for a in present):
            out = kind.mixed_forward(adapters, x, base_out, base, index, call)
            if out is not None:
                return out
        out = base_out.clone()
        for slot, adapter in enumerate(adapters):
            if adapter is None:
                continue
            rows = (index == slot).nonzero().flatten()
            if rows.numel():
                out[rows] = adapter(x[rows], base_out[rows], base, call.rows(rows, x.shape[0]))
        return out

    # ---------------------------------------------------------------- merge (order and rules: merging.py)
    def check_merge(self, names: list[str], shared: dict[str, list[str]] | None = None) -> None:
        """Raise MergeError if merging `names` cannot equal the unmerged forward; writes nothing.
        `shared`: this base module's parameters other modules hold (merging.shared_parameters)."""
        todo = self._todo(names)
        if not todo:
            return
        check_merge(self, todo)
        if shared and "weight" in shared and self._tied is None and self.base.is_quantized:
            raise MergeError(f"{self.module_name}.weight is quantized and shared with {shared['weight']}: merging "
                             f"{todo} would change those too, and a quantized weight cannot be copied to untie "
                             "it; nothing was written")

    def _todo(self, names: list[str]) -> list[str]:
        return [n for n in dict.fromkeys(names) if n not in self.merged and n in self.adapters]

    @torch.no_grad()
    def plan_merge(self, names: list[str], shared: dict[str, list[str]] | None = None
                   ) -> tuple[list[str], torch.Tensor | None]:
        """The adapters still to merge, in the order they merge, and the float32 base weight with them
        merged. Already merged adapters are skipped, so merging twice is a no-op. Parameters other
        modules hold (`shared`, see merging.shared_parameters) are untied first: this layer gets its own
        copies, and unmerging ties them again."""
        todo = self._todo(names)
        if not todo:
            return todo, None
        self.check_merge(todo, shared)
        if shared and self._tied is None:
            self._untie(shared)
        # BitFit, IA3 and LN tuning write the bias / norm parameters while planning: kept so a refused
        # plan (discard_plan) puts back every bit
        self._planned_restore = {name: (param, None if param is None else param.detach().clone())
                                 for name, param in self.base_layer._parameters.items() if name != "weight"}
        todo = merge_order(self, todo)
        reference = self.base.merge_reference()
        weight = reference["weight"].clone()
        self._planned_deltas = {}
        for position, name in enumerate(todo):
            adapter = self.adapters[name]
            if merge_rule(adapter) == "reads_base" and position > 0:  # its forward adds f(W0) - W0
                delta = self._merged_weight(adapter, reference["weight"].clone(), reference) - reference["weight"]
                self._planned_deltas[name] = delta
                weight = weight + delta
            else:
                weight = self._merged_weight(adapter, weight, reference)
        return todo, weight

    @torch.no_grad()
    def discard_plan(self) -> None:
        """Undo what `plan_merge` wrote without merging: the base's other parameters (biases, norms) get
        their exact values back, a bias a plan created is removed, and untied parameters are tied again."""
        restore, self._planned_restore, self._planned_deltas = self._planned_restore, None, {}
        if restore is not None:
            for name in [n for n in self.base_layer._parameters if n != "weight" and n not in restore]:
                del self.base_layer._parameters[name]  # created by the plan (BitFit on a bias-free layer)
            for name, (param, value) in restore.items():
                self.base_layer._parameters[name] = param
                if param is not None:
                    param.data.copy_(value)
        self.unmerge(keep=len(self.merged))  # nothing merged: only ties again what planning untied

    def apply_merge(self, todo: list[str], weight: torch.Tensor) -> None:
        """Write a planned merge. The update was computed in float32 and is rounded to the base dtype once."""
        self.base.write_weight(weight)
        self._planned_restore = None
        self.merged.extend(todo)
        self._merged_deltas.update(self._planned_deltas)
        self._planned_deltas = {}

    def merge(self, names: list[str], shared: dict[str, list[str]] | None = None) -> None:
        try:
            todo, weight = self.plan_merge(names, shared)
            if todo:
                self.apply_merge(todo, weight)
        except MergeError:
            self.discard_plan()
            raise

    @torch.no_grad()
    def unmerge(self, keep: int = 0) -> None:
        """Undo merges newest first, leaving the first `keep` merged."""
        base = self.base
        while len(self.merged) > keep:
            name = self.merged.pop()
            adapter = self.adapters[name]
            weight = base.read_weight()
            if name in self._merged_deltas:
                weight = weight - self._merged_deltas.pop(name)
            elif declares(adapter, Reparameterizing):
                weight = adapter.unmerged_weight(base, weight)
            else:
                weight = weight - adapter.delta_weight(base).to(weight.dtype)
            base.write_weight(weight)
        if not self.merged and self._tied is not None:
            self._retie()

    def _merged_weight(self, adapter: LayerAdapter, weight: torch.Tensor, reference: dict) -> torch.Tensor:
        """`weight` with `adapter` merged: a reparameterizing adapter's own merge, else W + delta_weight (an
        unmergeable adapter was refused by check_merge before planning)."""
        if declares(adapter, Reparameterizing):
            return adapter.merged_weight(self.base, weight, reference)
        if not declares(adapter, Additive):
            raise MergeError(f"{self.module_name}: adapter {type(adapter).__name__} cannot be merged")
        return weight + adapter.delta_weight(self.base).to(weight.dtype)

    def _untie(self, shared: dict[str, list[str]]) -> None:
        """Give the base module its own copies of the parameters other modules hold (`shared`: name ->
        their paths), so a merge leaves those modules alone. `_retie` undoes it exactly: the shared
        parameters are never written."""
        module = self.base_layer
        held = "; ".join(f"{self.module_name}.{name} is also {', '.join(paths)}" for name, paths in shared.items())
        warnings.warn(f"{held}: merging gives {self.module_name} its own copy (untied), so the others keep "
                      "the base values; unmerging ties them again", stacklevel=4)
        private = copy.copy(module)  # shallow: a module used at several places stays shared elsewhere
        private._parameters = dict(module._parameters)
        for name in shared:
            param = module._parameters[name]
            private._parameters[name] = nn.Parameter(param.detach().clone(), requires_grad=param.requires_grad)
        self._tied = (module,)
        self.base_layer = private

    @property
    def untied(self) -> bool:
        """Whether a merge gave this layer its own copy of parameters other modules share."""
        return self._tied is not None

    def _retie(self) -> None:
        self.base_layer, self._tied = self._tied[0], None  # the original module, with the shared parameters

    # ---------------------------------------------------------------- bookkeeping
    def add(self, name: str, adapter: nn.Module) -> None:
        self.adapters[name] = adapter.train(self.base_layer.training)  # an eval model stays in eval

    def remove(self, name: str) -> None:
        if name in self.merged:
            raise RuntimeError(f"{self.module_name}: unmerge adapter {name!r} before deleting it")
        if name in self.adapters:
            del self.adapters[name]
        self.active = [n for n in self.active if n != name]

    def extra_repr(self) -> str:
        return f"active={self.active}, merged={self.merged}"


class ModulesToSave(nn.Module):
    """A module trained in full (a classifier head, say): one trainable copy per adapter; the original
    stays untouched and serves the base model and disabled adapters."""

    def __init__(self, original_module: nn.Module, calls: CallSlot, module_name: str) -> None:
        super().__init__()
        self.original_module = original_module
        self.copies = nn.ModuleDict()
        self.active: list[str] = []
        self.module_name = module_name
        self.calls = calls
        self.copies.train(original_module.training)
        self.training = original_module.training

    def add(self, name: str, copy: nn.Module) -> None:
        self.copies[name] = copy

    def remove(self, name: str) -> None:
        if name in self.copies:
            del self.copies[name]
        self.active = [n for n in self.active if n != name]

    def current(self, call: CallContext | None = None) -> nn.Module:
        """The module this call runs: the active adapter's copy, or the original when adapters are off."""
        if not (call or self.calls.current).disabled:
            for name in self.active:
                if name in self.copies:
                    return self.copies[name]
        return self.original_module

    def forward(self, x: torch.Tensor, *args, **kwargs):
        call = self.calls.current
        if call.disabled or not call.mixed:
            return self.current(call)(x, *args, **kwargs)
        index = call.index_for(x.shape[0])
        out = self.original_module(x, *args, **kwargs).clone()
        for slot, name in enumerate(call.adapter_names):
            rows = (index == slot).nonzero().flatten()
            if name in self.copies and rows.numel():
                out[rows] = self.copies[name](x[rows], *args, **kwargs)
        return out
